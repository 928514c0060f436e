"""The spine end to end: a real host (all workers as processes), the process runtime,
the real `anthropic` client inside the agent, the fake model on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SECRET, agent_pids, wait_for

WORKERS = ["router", "delivery", "sweep", "containers", "broker", "channel:cli"]


def test_send_prints_reply(host):
    r = host.cli("send", "hello", "--wait", "30")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "echo: hello"
    st = host.cli("status")
    assert "host: running" in st.stdout
    for w in WORKERS:
        assert w in st.stdout


def test_send_without_host_is_a_clear_error(host_factory):
    h = host_factory("nohost")
    h.base.mkdir(parents=True)
    r = h.cli("send", "hello", "--wait", "1")
    assert r.returncode != 0
    assert r.stderr.strip().startswith("nanoclaw: no host is running")
    assert len(r.stderr.strip().splitlines()) == 1


def test_no_secret_in_any_worker_or_agent_environment(host):
    host.cli("send", "hi", "--wait", "30")
    pids = [w["pid"] for w in host.workers()] + agent_pids(host.data)
    pids.append(host.proc.pid)
    assert len(pids) >= len(WORKERS) + 2
    for pid in pids:
        env = Path(f"/proc/{pid}/environ").read_bytes()
        assert SECRET.encode() not in env, f"secret in environment of pid {pid}"


def test_broker_refuses_unknown_token(host):
    import urllib.error
    import urllib.request

    host.cli("send", "hi", "--wait", "30")
    url = host.q("SELECT value FROM host_state WHERE key='broker_url'")[0]["value"]
    req = urllib.request.Request(url + "/v1/messages", data=b"{}", method="POST",
                                 headers={"x-api-key": "not-a-session-token"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401


@pytest.mark.parametrize("victim", WORKERS)
def test_kill9_of_a_worker_loses_and_duplicates_nothing(host, victim):
    c = host.client()
    sent = []
    for i in range(6):
        if i == 2:
            old = host.worker_pid(victim)
            os.kill(old, signal.SIGKILL)
        mid = c.send(f"message {i}")
        sent.append(mid)
        reply = c.wait_reply(mid, 60)
        assert reply["text"] == f"echo: message {i}"
    wait_for(lambda: host.worker_pid(victim) not in (None, old), 30, what="restart")
    for mid in sent:  # exactly once: one send row and one distinct reply frame each
        assert len({f["id"] for f in c.replies_to(mid)}) == 1
    rows = host.q("SELECT in_reply_to, COUNT(*) AS n FROM channel_outbox GROUP BY in_reply_to")
    assert all(r["n"] == 1 for r in rows)
    assert len(rows) == len(sent)
    others = {w["name"]: w["restarts"] for w in host.workers() if w["name"] != victim}
    assert all(n == 0 for n in others.values()), others


def test_kill9_of_whole_host_then_restart(host_factory):
    h = host_factory().start()
    chats = [f"c{i}" for i in range(4)]
    clients = {ch: h.client(ch) for ch in chats}
    first = {ch: clients[ch].send(f"before {ch}") for ch in chats}
    for ch in chats:
        clients[ch].wait_reply(first[ch], 60)
    # mid-stream: messages stored (acked) but not yet answered when the host dies
    second = {ch: clients[ch].send(f"during {ch}") for ch in chats}
    h.kill9()
    time.sleep(0.5)
    assert not any(w for w in h.workers() if _alive(w["pid"]))  # workers died with it
    h.start()
    for ch in chats:
        r = clients[ch].wait_reply(second[ch], 60)
        assert r["text"] == f"echo: during {ch}"
    for ch in chats:
        for mid in (first[ch], second[ch]):
            assert len({f["id"] for f in clients[ch].replies_to(mid)}) == 1
    counts = h.q("SELECT in_reply_to, COUNT(*) AS n FROM channel_outbox GROUP BY in_reply_to")
    assert len(counts) == 8 and all(r["n"] == 1 for r in counts)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_sigterm_stops_everything_without_orphans(host):
    host.cli("send", "hi", "--wait", "30")
    pids = [w["pid"] for w in host.workers()] + agent_pids(host.data)
    t0 = time.time()
    assert host.stop(timeout=12) == 0
    assert time.time() - t0 < 10
    wait_for(lambda: not any(_alive(p) for p in pids), 5, what="all processes gone")
    assert not (host.data / "circuit-breaker.json").exists()
    assert all(w["attempt"] == 0 and w["state"] == "STOPPED" for w in host.workers())


def test_workers_restart_by_name(host):
    old = host.worker_pid("router")
    r = host.cli("workers", "restart", "router")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: host.worker_pid("router") not in (None, old), 15, what="router restart")
    assert host.cli("send", "still there?", "--wait", "30").stdout.strip() == "echo: still there?"
    listing = host.cli("workers").stdout
    assert "router" in listing and "RUNNING" in listing or "STARTING" in listing


def test_unknown_worker_name_is_one_clear_line(host):
    r = host.cli("workers", "restart", "nope")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        r.stderr.strip()] and "unknown worker 'nope'" in r.stderr


def test_malformed_frames_get_errors_and_kill_nothing(host):
    c = host.client()
    pid = host.worker_pid("channel:cli")
    for bad in (b"{not json\n", b"[1,2]\n", b'{"type":"message"}\n', b'{"type":"zap"}\n',
                b'{"text":"x","chat":"../../etc"}\n', b'{"text":"x","id":"a b"}\n',
                b"\xff\xfe\n"):
        c.raw(bad)
    wait_for(lambda: len([f for f in c.snapshot() if f.get("type") == "error"]) >= 7, 10,
             what="7 error frames")
    errors = [f["error"] for f in c.snapshot() if f.get("type") == "error"]
    assert all(isinstance(e, str) and "\n" not in e for e in errors)
    mid = c.send("after the garbage")
    assert c.wait_reply(mid)["text"] == "echo: after the garbage"
    assert host.worker_pid("channel:cli") == pid
    assert all(w["restarts"] == 0 for w in host.workers())


def test_malformed_rows_do_not_kill_router_or_delivery(host):
    host.cli("send", "warm", "--wait", "30")
    conn = host.db()
    conn.execute("INSERT INTO inbound_events (channel_type, platform_id, message_id, payload,"
                 " received_at) VALUES ('cli','local','bad1','{broken','2026-01-01T00:00:00.000Z')")
    conn.execute("INSERT INTO inbound_events (channel_type, platform_id, message_id, payload,"
                 " received_at) VALUES ('cli','local','bad2','[1]','2026-01-01T00:00:00.000Z')")
    conn.commit()
    conn.close()
    wait_for(lambda: len(host.q("SELECT * FROM inbound_events WHERE status='failed'")) == 2, 15,
             what="bad events marked failed")
    assert host.cli("send", "next", "--wait", "30").stdout.strip() == "echo: next"
    assert all(w["restarts"] == 0 for w in host.workers())


def test_second_host_on_same_data_is_refused(host):
    r = subprocess.run([sys.executable, "-m", "nanoclaw", "run"], cwd=host.base, env=host.env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "another host is already running" in r.stdout + r.stderr
