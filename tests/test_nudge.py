"""Wake-up nudges (nanoclaw/nudge.py, container/agent_runner/nudge.py): real processes,
real unix sockets. A nudge must end a long sleep at once; a missing, stale, full or
hostile socket must never raise; and a host whose pollers sleep for seconds still
answers a message at once, because every hop of a turn is nudged."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, wait_for

from nanoclaw import nudge

# A worker run by the real runner: nothing is due for 30 s (loop_once returns the seconds
# to its next due time), so only a nudge or a signal can wake it before then. It notes
# each pass in `passes` and does its "work" (a file appearing) when it wakes.
WORKER = """
import sys, time
from pathlib import Path
from nanoclaw.config import Settings
from nanoclaw.host.runner import Worker, run

base = Path(sys.argv[1])

class W(Worker):
    name = "router"

    def loop_once(self, now):
        with open(base / "passes", "a") as f:
            f.write(f"{time.time()}\\n")
        if (base / "work").exists() and not (base / "done").exists():
            (base / "done").write_text(str(time.time()))
        return 30.0

sys.exit(run(W(Settings(data_dir=base / "data", logs_dir=base / "logs"))))
"""


def start_worker(base: Path) -> subprocess.Popen:
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", WORKER, str(base)], env=env, cwd=ROOT,
                         stdout=open(base / "out", "ab"), stderr=subprocess.STDOUT)
    wait_for(lambda: (base / "passes").exists() and nudge.path(base / "data", "router").exists(),
             15, what="worker up")
    return p


def passes(base: Path) -> int:
    return len((base / "passes").read_text().splitlines())


def test_a_nudge_wakes_a_worker_long_before_its_interval(tmp_path):
    p = start_worker(tmp_path)
    try:
        time.sleep(0.5)  # well into its 30 s sleep
        before = passes(tmp_path)
        (tmp_path / "work").touch()
        nudge.send(tmp_path / "data", "router")
        wait_for(lambda: (tmp_path / "done").exists(), 5, what="the nudged pass")
        assert passes(tmp_path) == before + 1  # one pass, woken by the nudge
        assert p.poll() is None
    finally:
        p.terminate()
        p.wait(10)


def test_a_signal_ends_the_long_sleep_and_the_socket_goes_away(tmp_path):
    p = start_worker(tmp_path)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0  # not after the 30 s sleep: the signal pipe woke it
    assert not nudge.path(tmp_path / "data", "router").exists()


def test_a_stale_socket_from_a_killed_worker_is_replaced(tmp_path):
    p = start_worker(tmp_path / "a")
    p.kill()
    p.wait(5)
    sock = nudge.path(tmp_path / "a" / "data", "router")
    assert sock.exists()  # left behind by kill -9
    nudge.send(tmp_path / "a" / "data", "router")  # nobody listening: ECONNREFUSED, ignored
    (tmp_path / "a" / "passes").unlink()
    p = start_worker(tmp_path / "a")
    try:
        time.sleep(0.3)
        (tmp_path / "a" / "work").touch()
        nudge.send(tmp_path / "a" / "data", "router")
        wait_for(lambda: (tmp_path / "a" / "done").exists(), 5, what="the nudged pass")
    finally:
        p.terminate()
        p.wait(10)


def test_sending_never_raises(tmp_path):
    data = tmp_path / "data"
    nudge.send(data, "router", "delivery")  # no data dir at all
    nudge.send(tmp_path / ("x" * 200) / "data", "router")  # longer than sun_path
    listener = nudge.listen(data, "router")
    assert listener is not None
    for _ in range(100):  # nobody reads: the queue fills (EAGAIN), still quiet
        nudge.send(data, "router")
    assert listener.drain() > 0
    listener.sock.close()  # stale: the file stays, nobody is bound (ECONNREFUSED)
    nudge.send(data, "router")
    (data / "run" / "nudge" / "odd.sock").mkdir()
    nudge.send(data, "odd")
    nudge.agent(tmp_path / "no-such-session")
    nudge.host(tmp_path / "no-such-session")
    nudge.advertise(data, tmp_path / "no-such-session")


def test_a_long_path_socket_works(tmp_path):
    data = tmp_path / ("d" * 120) / "data"
    listener = nudge.listen(data, "channel:cli")
    assert listener is not None and len(str(listener.path)) > nudge.SUN_PATH_MAX
    waiter = nudge.Waiter(listener, signals=False)
    try:
        nudge.send(data, "channel:cli")
        assert waiter.wait(5)
    finally:
        waiter.close()
    assert not listener.path.exists()


def test_no_socket_means_polling_not_failing(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "run").write_text("not a folder")
    assert nudge.listen(tmp_path / "data", "router") is None
    waiter = nudge.Waiter(None, signals=False)
    assert waiter.wait(0.01) is False
    waiter.close()


def test_the_host_never_follows_a_link_in_a_session_folder(tmp_path):
    """The session folder is the agent's: a symlink or a file where its socket should be
    gets nothing, so an agent cannot aim the host at another socket."""
    data, session = tmp_path / "data", tmp_path / "session"
    work = session / "work"
    work.mkdir(parents=True)
    victim = nudge.listen(data, "victim")
    assert victim is not None
    os.symlink(victim.path, work / nudge.AGENT_SOCK)
    os.symlink(victim.path, work / nudge.HOST_LINK)
    nudge.agent(session)
    nudge.host(session)
    assert victim.drain() == 0
    os.unlink(work / nudge.AGENT_SOCK)
    (work / nudge.AGENT_SOCK).write_text("a plain file")
    nudge.agent(session)
    assert victim.drain() == 0
    os.rename(work, session / "elsewhere")  # the agent's folder itself a link: refused too
    os.symlink(victim.path.parent, work)
    nudge.agent(session)
    nudge.advertise(data, session)
    assert victim.drain() == 0 and not (victim.path.parent / nudge.HOST_LINK).exists()
    victim.close()


def test_delivery_is_linked_into_a_session_folder(tmp_path):
    data, session = tmp_path / "data", tmp_path / "session"
    work = session / "work"
    work.mkdir(parents=True)
    old = nudge.listen(data, "delivery", 0o666)
    nudge.advertise(data, session)
    old.close()
    new = nudge.listen(data, "delivery", 0o666)  # a restarted delivery: a new inode
    nudge.host(session)  # the old link: refused, quietly
    assert new.drain() == 0
    nudge.advertise(data, session)  # relinked to the live socket
    nudge.host(session)
    assert new.drain() == 1
    (work / nudge.HOST_LINK).unlink()
    (work / nudge.HOST_LINK).mkdir()  # an agent's sabotage only costs its own nudges
    nudge.advertise(data, session)
    new.close()


AGENT = """
import sys, time
sys.path.insert(0, sys.argv[2])
from agent_runner.nudge import Waiter, send_host
w = Waiter(sys.argv[1])
print("nudged" if w.nudged else "polling", flush=True)
t = time.monotonic()
woke = w.wait(30)
print(f"woke={woke} after={time.monotonic() - t:.3f}", flush=True)
send_host(sys.argv[1])
w.close()
"""


def test_host_and_agent_nudge_each_other_through_the_session_folder(tmp_path):
    data, session = tmp_path / "data", tmp_path / "session"
    work = session / "work"
    work.mkdir(parents=True)
    (work / nudge.AGENT_SOCK).write_bytes(b"")  # junk a killed runner might leave
    os.unlink(work / nudge.AGENT_SOCK)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(work / nudge.AGENT_SOCK))
    stale.close()  # a stale socket file, as after kill -9
    delivery = nudge.listen(data, "delivery", 0o666)
    waiter = nudge.Waiter(delivery, signals=False)
    nudge.advertise(data, session)
    p = subprocess.Popen([sys.executable, "-c", AGENT, str(work), str(ROOT / "container")],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "nudged"
        time.sleep(0.3)
        nudge.agent(session)  # host → agent: ends its 30 s wait
        line = p.stdout.readline().strip()
        assert line.startswith("woke=True"), line
        assert waiter.wait(5)  # agent → host, through the link
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
        waiter.close()
    assert not (work / nudge.AGENT_SOCK).exists()  # the runner cleaned up after itself


@pytest.mark.parametrize("runtime", ["process", "bwrap"])
def test_a_host_with_slow_polls_answers_at_once(host_factory, request, runtime):
    """Every poll interval at least 1 s, growing to 30 s when idle: after a 9 s pause
    each worker is in the middle of a sleep of several seconds, so a reply within 3 s
    means every hop of the turn (channel → router → agent → delivery → channel) woke
    by a nudge. Under bwrap the agent's side goes through the sandbox's /workspace."""
    if runtime == "bwrap":
        request.getfixturevalue("bwrap_works")
    h = host_factory(runtime, NANOCLAW_POLL_MIN="1", NANOCLAW_POLL_IDLE="30",
                     NANOCLAW_RUNTIME=runtime).start()
    c = h.client()
    c.wait_reply(c.send("first"), timeout=60)
    c.wait_reply(c.send("warm"), timeout=30)
    time.sleep(9)
    t = time.monotonic()
    reply = c.wait_reply(c.send("after a pause"), timeout=30)
    took = time.monotonic() - t
    assert "after a pause" in reply["text"]
    assert took < 3.0, f"turn took {took:.2f}s: some hop waited for its poll"
    s = h.q("SELECT agent_group_id, id FROM sessions")[0]
    folder = h.data / "sessions" / s["agent_group_id"] / s["id"] / "work"
    for name in (nudge.AGENT_SOCK, nudge.HOST_LINK):  # bound by the agent; linked by the host
        assert stat.S_ISSOCK(os.lstat(folder / name).st_mode), name
    assert os.stat(folder / nudge.HOST_LINK).st_ino == os.stat(
        nudge.path(h.data, "delivery")).st_ino


@pytest.mark.parametrize("value", ["0", "-1", "61", "soon"])
def test_a_bad_idle_interval_is_one_clear_line(host_factory, value):
    h = host_factory(f"bad-idle-{value}", NANOCLAW_POLL_IDLE=value)
    h.base.mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "nanoclaw", "run"], cwd=h.base, env=h.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad setting NANOCLAW_POLL_IDLE" in lines[0], lines
