"""Delivery reads only what is new (issue 17): each session keeps a floor, the last seq
below which every row of its `outbound.db` was handed on, and a pass reads the rows
above it. A row not yet due holds the floor where it is (the rows after it still go),
and is sent once it is due; a row the agent writes below the floor (it cannot, as its
seqs only grow, but the file is the agent's) hurts no one else; another file (set aside
by the host) starts from 0. On the real databases of one live session (World)."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest
from test_agent_cli import World

from nanoclaw.db import session as sessiondb


@pytest.fixture
def w_world(tmp_path, monkeypatch) -> World:
    return World(tmp_path, monkeypatch)


def _put(w: World, rid: str, seq: int, deliver_after: str | None = None) -> None:
    conn = sqlite3.connect(w.paths.outbound)
    try:
        conn.execute(
            "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, deliver_after,"
            " recurrence, kind, platform_id, channel_type, thread_id, content) VALUES"
            " (?,?,NULL,'t',?,NULL,'chat','local','cli',NULL,'{\"text\": \"x\"}')",
            (rid, seq, deliver_after))
        conn.commit()
    finally:
        conn.close()


def _queued(w: World) -> list[str]:
    return [r[0].split(":", 1)[1] for r in w.store.conn.execute(
        "SELECT idem_key FROM channel_outbox ORDER BY id")]


def _pass(w: World) -> None:
    w.delivery.signals.clear()  # as if the file moved
    w.delivery.pass_once(time.time())


def test_a_pass_reads_above_the_floor_and_a_row_not_yet_due_holds_it(w_world, monkeypatch):
    w = w_world
    reads: list[int] = []
    after = sessiondb.SessionOutbound.after
    monkeypatch.setattr(sessiondb.SessionOutbound, "after",
                        lambda self, floor: reads.append(floor) or after(self, floor))
    _put(w, "a", 1001)
    _pass(w)
    assert _queued(w) == ["a"] and reads[-1] == 0
    soon = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + 1.5))
    _put(w, "later", 1003, deliver_after=soon)
    _put(w, "b", 1005)
    _pass(w)
    assert _queued(w) == ["a", "b"] and reads[-1] == 1001  # `later` waits, `b` does not
    _pass(w)
    assert _queued(w) == ["a", "b"] and reads[-1] == 1001  # the floor stays below `later`
    time.sleep(1.6)
    _pass(w)
    assert _queued(w) == ["a", "b", "later"]
    _pass(w)
    assert reads[-1] == 1005  # everything handed on: the next pass reads nothing old
    # a row below the floor is the agent's own loss: nothing else is held up
    _put(w, "low", 7)
    _put(w, "c", 1007)
    _pass(w)
    assert _queued(w) == ["a", "b", "later", "c"]
    # another file (the host set the old one aside): read from 0 again
    os.replace(w.paths.outbound, w.paths.outbound + ".old")
    sessiondb.create(w.paths.root, w.settings.agent_owner())
    _put(w, "d", 9)
    _pass(w)
    assert reads[-1] == 0 and _queued(w)[-1] == "d"


def test_a_restarted_worker_reads_from_zero_and_sends_nothing_twice(w_world):
    from nanoclaw.delivery.delivery import Delivery

    w = w_world
    _put(w, "a", 1001)
    _pass(w)
    w.delivery = Delivery(w.store, w.settings)  # a new worker: no floor yet
    _put(w, "b", 1003)
    _pass(w)
    assert _queued(w) == ["a", "b"]  # `a` again would be deduped by its key; it is once
    n = w.store.conn.execute("SELECT COUNT(*) FROM channel_outbox").fetchone()[0]
    assert n == 2


