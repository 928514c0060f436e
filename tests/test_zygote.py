"""The agent zygote (process runtime): every agent is forked from one process that
imported the runner once; the containers worker keeps each agent's real exit code; a
killed agent, zygote or worker loses and doubles nothing; a zygote that cannot serve
only makes starts cold.

The protocol tests drive `sandbox_entry`'s zygote with the host's real `Zygote` class
and a stand-in `agent_runner` package (in a temp folder on its PYTHONPATH) that reports
what a forked child sees — its environment, folder, output, randomness, process
session — and exits as told. The real runner behind the zygote is covered through a
real host below and by every process-runtime test of the suite (the zygote is on by
default)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import agent_pids, wait_for

from nanoclaw.runtime import procfs
from nanoclaw.runtime.zygote import Zygote, ZygoteGone, ZygoteKeeper

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = '''
import json, os, random, sys, time
mode = os.environ.get("STAND_IN_MODE", "report")
print(json.dumps({"pid": os.getpid(), "sid": os.getsid(0), "cwd": os.getcwd(),
                  "who": os.environ.get("WHO"), "random": random.random(),
                  "stdin": sys.stdin.read(), "fds": sorted(os.listdir("/proc/self/fd"))}),
      flush=True)
if mode == "sleep":
    time.sleep(60)
raise SystemExit(int(os.environ.get("STAND_IN_EXIT", "0")))
'''


def _zygote(tmp_path: Path, extra: str = "") -> Zygote:
    pkg = tmp_path / "runner" / "agent_runner"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(extra)
    (pkg / "__main__.py").write_text(STAND_IN)
    (pkg / "providers").mkdir()
    (pkg / "providers" / "__init__.py").write_text("REGISTRY = None\n")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{tmp_path / 'runner'}:{ROOT / 'container'}",
           "NANOCLAW_ZYGOTE": "1", "NANOCLAW_WARM_PRELOAD": ""}
    return Zygote([sys.executable, "-m", "sandbox_entry"], env, tmp_path / "zygote.log")


def _report(log: Path) -> dict:
    wait_for(lambda: log.exists() and log.read_text().strip(), 10, what=f"output in {log}")
    return json.loads(log.read_text().splitlines()[0])


def _exit(z: Zygote, pid: int) -> int:
    wait_for(lambda: z.poll() or pid in z.exits, 10, what=f"exit of {pid}")
    return z.exits.pop(pid)


def test_each_child_is_its_own_agent_and_its_exit_code_is_kept(tmp_path):
    z = _zygote(tmp_path)
    try:
        folders = []
        kids = []
        for i, code in enumerate((0, 7, 0)):
            folder = tmp_path / f"g{i}"
            folder.mkdir()
            folders.append(folder)
            pid = z.fork({"WHO": f"agent{i}", "STAND_IN_EXIT": str(code)}, str(folder),
                         tmp_path / f"{i}.log")
            kids.append((pid, code))
        reports = [_report(tmp_path / f"{i}.log") for i in range(3)]
        for i, (r, (pid, code)) in enumerate(zip(reports, kids)):
            assert r["pid"] == pid and r["who"] == f"agent{i}" and r["cwd"] == str(folders[i])
            assert r["sid"] == pid  # a process session of its own: the host's killpg is its
            assert r["stdin"] == ""  # nothing of the zygote's request pipe
            # nothing of the zygote's inherited: only stdio and the listing's own fd
            assert len(set(r["fds"]) - {"0", "1", "2"}) == 1, r["fds"]
            assert _exit(z, pid) == code
        assert len({r["random"] for r in reports}) == 3  # re-seeded in each child
        assert z.alive() and procfs.ppid(kids[0][0]) is None  # reaped by the zygote
        # killed from outside: the signal is the code, as a Popen would say
        pid = z.fork({"STAND_IN_MODE": "sleep"}, str(tmp_path), tmp_path / "s.log")
        _report(tmp_path / "s.log")
        os.kill(pid, signal.SIGKILL)
        assert _exit(z, pid) == -signal.SIGKILL
    finally:
        z.stop()
    assert not z.alive()


def test_children_outlive_their_zygote(tmp_path):
    z = _zygote(tmp_path)
    pid = z.fork({"STAND_IN_MODE": "sleep"}, str(tmp_path), tmp_path / "s.log")
    _report(tmp_path / "s.log")
    z.stop()  # EOF: the zygote leaves, its agent works on
    assert z.proc.returncode == 0
    assert os.path.exists(f"/proc/{pid}") and procfs.ppid(pid) != z.pid
    os.kill(pid, signal.SIGKILL)


def test_a_zygote_with_a_thread_refuses_to_fork(tmp_path):
    """A preload that left a thread running would fork half-copied locks: the zygote says
    so and ends; the keeper logs it and backs off, and starts go cold meanwhile."""
    z = _zygote(tmp_path, extra="import threading, time\n"
                               "threading.Thread(target=time.sleep, args=(60,), daemon=True)"
                               ".start()\n")
    wait_for(lambda: not z.alive(), 10, what="the zygote refused")
    assert z.proc.returncode == 3 and "thread" in (tmp_path / "zygote.log").read_text()
    with pytest.raises(ZygoteGone):
        z.fork({}, str(tmp_path), tmp_path / "x.log")
    z.stop()


def test_the_keeper_backs_off_while_zygotes_keep_dying(tmp_path):
    now = [100.0]
    started: list[Zygote] = []

    def start() -> Zygote:
        z = _zygote(tmp_path / str(len(started)),
                    extra="import threading, time\nthreading.Thread(target=time.sleep,"
                          " args=(60,), daemon=True).start()\n")
        started.append(z)
        wait_for(lambda: not z.alive(), 10, what="it ended")
        return z

    keeper = ZygoteKeeper(start, clock=lambda: now[0])
    keeper.maintain()
    gaps = []
    for _ in range(3):
        n, t0 = len(started), now[0]
        keeper.maintain()  # finds it dead, backs off
        assert keeper.get() is None
        while len(started) == n:
            now[0] += 0.5
            keeper.maintain()
        gaps.append(now[0] - t0)
    assert gaps == [1.0, 2.0, 4.0]
    keeper.close()


# ---- through a real host -----------------------------------------------------------------

def _zygote_pid(h) -> int | None:
    """The one zygote of this host; None while there is none."""
    from nanoclaw.runtime.warm import is_waiting

    pids = set(agent_pids(h.data))
    tops = [p for p in pids if procfs.ppid(p) not in pids and is_waiting(p)]
    assert len(tops) <= 1, tops
    return tops[0] if tops else None


def test_every_agent_is_a_child_of_one_zygote(host_factory):
    h = host_factory("z").start()
    zpid = wait_for(lambda: _zygote_pid(h), 30, what="the zygote")
    clients = [h.client(f"chat{i}") for i in range(4)]
    mids = [c.send(f"hello {i}") for i, c in enumerate(clients)]  # four sessions at once
    for i, (c, mid) in enumerate(zip(clients, mids)):
        assert c.wait_reply(mid, 60)["text"] == f"echo: hello {i}"
    rows = h.q("SELECT id, container_id FROM sessions")
    assert len(rows) == 4
    for r in rows:
        pid = int(r["container_id"].split(":")[1])
        assert procfs.ppid(pid) == zpid
        assert "batch completed" in "".join(
            p.read_text() for p in (h.base / "logs" / "containers" / r["id"]).glob("*.log"))
    log = (h.base / "logs" / "nanoclaw.log").read_text()
    assert "starting cold" not in log and "zygote:" not in log
    assert h.stop() == 0
    assert agent_pids(h.data) == []  # the zygote went with its worker, agents were stopped


def test_killed_agent_and_killed_zygote_lose_and_double_nothing(host_factory):
    h = host_factory("zk").start()
    c = h.client()
    assert c.wait_reply(c.send("one"), 60)["text"] == "echo: one"
    zpid = wait_for(lambda: _zygote_pid(h), 30, what="the zygote")
    sid = h.q("SELECT id FROM sessions")[0]["id"]
    agent = int(h.q("SELECT container_id FROM sessions")[0]["container_id"].split(":")[1])
    os.kill(agent, signal.SIGKILL)  # the zygote reaps it and reports -9
    wait_for(lambda: "exited (-9)" in (h.base / "logs" / "nanoclaw.log").read_text()
             or h.q("SELECT container_status FROM sessions")[0]["container_status"] == "stopped",
             30, what="the worker saw the agent end")
    assert c.wait_reply(c.send("two"), 60)["text"] == "echo: two"  # a new child serves it
    new = int(h.q("SELECT container_id FROM sessions")[0]["container_id"].split(":")[1])
    assert new != agent and procfs.ppid(new) == zpid
    # the zygote itself killed: the running agent lives on; a new session starts cold
    # while it is down, then the restarted zygote serves the next ones
    os.kill(zpid, signal.SIGKILL)
    wait_for(lambda: "the zygote ended" in (h.base / "logs" / "nanoclaw.log").read_text(),
             30, what="the keeper noticed")
    assert os.path.exists(f"/proc/{new}")
    assert c.wait_reply(c.send("three"), 60)["text"] == "echo: three"  # the same agent
    bob = h.client("bob")
    assert bob.wait_reply(bob.send("hi"), 60)["text"] == "echo: hi"
    wait_for(lambda: _zygote_pid(h) not in (None, zpid), 30, what="a new zygote")
    carol = h.client("carol")
    assert carol.wait_reply(carol.send("hey"), 60)["text"] == "echo: hey"
    carol_sid = [r for r in h.q("SELECT id, container_id FROM sessions")
                 if r["id"] not in (sid,)]
    assert any(procfs.ppid(int(r["container_id"].split(":")[1])) == _zygote_pid(h)
               for r in carol_sid)
    for client, sent in ((c, ["one", "two", "three"]), (bob, ["hi"]), (carol, ["hey"])):
        texts = [f["text"] for f in client.snapshot() if f.get("type") == "reply"]
        assert texts == [f"echo: {t}" for t in sent], texts  # each answered once
    assert h.stop() == 0


def test_a_killed_worker_leaves_agents_to_the_next_one(host_factory):
    """kill -9 of the containers worker: its zygote ends with its pipe, the agents it
    forked live on and are re-attached, and the next worker starts a zygote of its own."""
    h = host_factory("zw").start()
    c = h.client()
    assert c.wait_reply(c.send("before"), 60)["text"] == "echo: before"
    zpid = wait_for(lambda: _zygote_pid(h), 30, what="the zygote")
    cid = h.q("SELECT container_id FROM sessions")[0]["container_id"]
    worker = h.worker_pid("containers")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: h.worker_pid("containers") not in (None, worker), 30, what="restart")
    wait_for(lambda: not os.path.exists(f"/proc/{zpid}"), 15, what="the old zygote gone")
    wait_for(lambda: "re-attached" in (h.base / "logs" / "nanoclaw.log").read_text(), 30,
             what="re-attached")
    assert h.q("SELECT container_id FROM sessions")[0]["container_id"] == cid
    assert c.wait_reply(c.send("after"), 60)["text"] == "echo: after"
    assert h.q("SELECT container_id FROM sessions")[0]["container_id"] == cid  # same agent
    wait_for(lambda: _zygote_pid(h) not in (None, zpid), 30, what="a new zygote")
    time.sleep(0.2)
    assert h.stop() == 0
