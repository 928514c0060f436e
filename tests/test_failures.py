"""Failures are never silent: bad settings and broken data stop start-up with one line;
an agent killed mid-turn is retried; one that keeps failing is reported to the user."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

from conftest import agent_pids, wait_for


def _run(h, timeout=30) -> subprocess.CompletedProcess:
    h.base.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "nanoclaw", "run"], cwd=h.base, env=h.env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_setting_names_the_setting(host_factory):
    for var, value in (("NANOCLAW_RUNTIME", "banana"), ("NANOCLAW_POLL_MIN", "-1"),
                       ("ANTHROPIC_BASE_URL", "ftp://x"), ("TZ", "Mars/Olympus")):
        h = host_factory(f"bad-{var.lower()}", **{var: value})
        r = _run(h)
        assert r.returncode == 2
        line = _one_line(r)
        assert var in line and "bad setting" in line, line


def test_corrupt_database_is_one_clear_line(host_factory):
    h = host_factory("corrupt")
    h.data.mkdir(parents=True)
    (h.data / "nanoclaw.db").write_bytes(b"this is not a database" * 100)
    r = _run(h)
    assert r.returncode == 2
    assert "is unusable" in _one_line(r)
    st = h.cli("status")
    assert st.returncode == 2 and "is unusable" in st.stderr
    assert len(st.stderr.strip().splitlines()) == 1


def test_data_dir_that_is_a_file(host_factory):
    h = host_factory("file")
    h.base.mkdir(parents=True)
    h.data.write_text("oops")
    r = _run(h)
    assert r.returncode == 2
    assert str(h.data) in _one_line(r)


def test_agent_killed_mid_turn_is_retried_and_answered_once(host_factory, fake_model):
    h = host_factory(NANOCLAW_RETRY_BASE="0.05").start()
    c = h.client()
    c.wait_reply(c.send("warm up"))
    fake_model.inject(delay_ms=5000, count=1)
    n_before = len(fake_model.requests)
    mid = c.send("slow one")
    wait_for(lambda: len(fake_model.requests) > n_before or fake_model_pending(fake_model),
             20, what="model request in flight")
    pids = agent_pids(h.data, spares=False)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    reply = c.wait_reply(mid, 60)
    assert reply["text"] == "echo: slow one"
    assert len({f["id"] for f in c.replies_to(mid)}) == 1


def fake_model_pending(fake) -> bool:
    return bool(getattr(fake, "in_flight", 0))


def test_agent_that_keeps_failing_is_reported_to_the_user(host_factory):
    h = host_factory(NANOCLAW_RETRY_BASE="0.02").start()
    c = h.client()
    c.wait_reply(c.send("first"))
    sess = h.q("SELECT * FROM sessions")[0]
    assert h.cli("workers", "stop", "containers").returncode == 0
    wait_for(lambda: not agent_pids(h.data), 15, what="agents stopped")
    group = h.base / "groups" / h.q("SELECT folder FROM agent_groups")[0]["folder"]
    os.rename(group, h.base / "group-aside")
    group.write_text("not a folder")  # every agent start now fails at once
    outbound = h.data / "sessions" / sess["agent_group_id"] / sess["id"] / "db" / "outbound.db"
    assert h.cli("workers", "start", "containers").returncode == 0
    mid = c.send("second")
    reply = c.wait_reply(mid, 90)
    assert "could not be processed" in reply["text"]
    assert sess["id"] in reply["text"]
    errlog = (h.base / "logs" / "nanoclaw.error.log").read_text()
    assert "failed to start 5 times" in errlog
    conn = sqlite3.connect(outbound.parent / "inbound.db")
    status = conn.execute("SELECT status FROM messages_in WHERE id LIKE ?",
                          (mid + ":%",)).fetchone()[0]
    assert status == "failed"
    assert all(w["restarts"] == 0 for w in h.workers())
