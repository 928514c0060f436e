"""A recurring task fires on schedule across a host restart, once per occurrence."""

from __future__ import annotations

import json
import sqlite3
import time

from conftest import wait_for


def _outbound_write(path, content: dict) -> None:
    """Write a system action the way the agent runner does: odd seq, BEGIN IMMEDIATE."""
    c = sqlite3.connect(path, isolation_level=None, timeout=10)
    c.execute("BEGIN IMMEDIATE")
    inb = sqlite3.connect(path.parent / "inbound.db")
    top = max(c.execute("SELECT COALESCE(MAX(seq),0) FROM messages_out").fetchone()[0],
              inb.execute("SELECT COALESCE(MAX(seq),0) FROM messages_in").fetchone()[0])
    c.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content) VALUES"
              " (?,?,?,?,?)", (f"out-test-{time.time_ns()}", top + 1 if top % 2 == 0 else top + 2,
                               "2026-01-01T00:00:00.000Z", "system", json.dumps(content)))
    c.execute("COMMIT")


def _tasks(inbound) -> list[dict]:
    c = sqlite3.connect(inbound)
    c.row_factory = sqlite3.Row
    return [dict(r) for r in c.execute("SELECT * FROM messages_in WHERE kind='task' ORDER BY seq")]


def test_recurring_task_across_restart(host_factory):
    h = host_factory(NANOCLAW_TIMEZONE="UTC").start()
    c = h.client()
    c.wait_reply(c.send("hello"))
    sess = h.q("SELECT * FROM sessions")[0]
    folder = h.data / "sessions" / sess["agent_group_id"] / sess["id"] / "db"
    _outbound_write(folder / "outbound.db", {"action": "schedule_task", "prompt": "tick",
                                             "recurrence": "* * * * * */3"})

    def done():
        return [t for t in _tasks(folder / "inbound.db") if t["status"] == "completed"]

    wait_for(lambda: len(done()) >= 2, 60, what="two occurrences before the restart")
    assert h.stop() == 0
    stopped_at = time.time()
    time.sleep(4)  # at least one occurrence falls while the host is down
    h.start()
    before = len(done())
    wait_for(lambda: len(done()) >= before + 2, 60, what="two occurrences after the restart")
    completed = {t["id"] for t in done()}
    r = h.cli("tasks", "cancel", _tasks(folder / "inbound.db")[0]["series_id"])
    assert r.returncode == 0, r.stderr
    tasks = _tasks(folder / "inbound.db")
    assert not [t for t in tasks if t["status"] == "pending"]  # cancelled for good
    assert len({t["series_id"] for t in tasks}) == 1
    runs = [t["process_after"] for t in tasks]
    assert len(runs) == len(set(runs))  # each occurrence once
    sends = h.q("SELECT in_reply_to, COUNT(*) AS n FROM channel_outbox WHERE in_reply_to LIKE"
                " 'task-%' GROUP BY in_reply_to")
    assert completed <= {r["in_reply_to"] for r in sends}
    assert all(r["n"] == 1 for r in sends)
    # missed runs are not replayed: nothing was due inside the downtime window twice
    from nanoclaw.util import parse_iso
    late = [parse_iso(t["process_after"]) for t in tasks
            if stopped_at < parse_iso(t["process_after"]) < stopped_at + 4]
    assert len(late) <= 1
