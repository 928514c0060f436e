"""The warm pool: a spare agent started ahead serves the next session (bwrap, and the
process runtime with its zygote off, `NANOCLAW_ZYGOTE=false`: tests/test_zygote.py),
bwrap's handover leaves the host's mount table as it was and never follows a symlink the
agent planted, spares that keep dying back off, and spares go with their worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import agent_pids, wait_for

from nanoclaw.runtime import mountns
from nanoclaw.runtime.warm import Warm, WarmPool, is_waiting


def spares(h) -> list[int]:
    """Top-level processes of the pool waiting for a session."""
    from nanoclaw.runtime.bwrap import _ppid

    pids = set(agent_pids(h.data))
    return sorted(p for p in pids if _ppid(p) not in pids and is_waiting(p))


def staged_mounts(h) -> list[str]:
    root = (h.data / "run" / "warm").resolve()
    return [p for p in mountns.mounted_under(root) if p != str(root)]


@pytest.fixture(params=["process", "bwrap"])
def runtime(request):
    if request.param == "bwrap":
        request.getfixturevalue("bwrap_works")
        if not mountns.can_mount():
            pytest.skip("bwrap's warm pool needs root in the host's namespaces")
    return request.param


def test_spare_serves_the_next_session_and_is_replaced(host_factory, runtime):
    h = host_factory(runtime, NANOCLAW_RUNTIME=runtime, NANOCLAW_ZYGOTE="false").start()
    wait_for(lambda: len(spares(h)) == 1, 30, what="a spare agent")
    spare = spares(h)[0]
    c = h.client("alice")
    assert c.wait_reply(c.send("hello warm"), 60)["text"] == "echo: hello warm"
    cid = h.q("SELECT container_id FROM sessions")[0]["container_id"]
    assert int(cid.split(":")[1]) == spare  # the spare took the session, no cold start
    wait_for(lambda: spares(h) and spares(h)[0] != spare, 30, what="a new spare")
    assert "starting cold" not in (h.base / "logs" / "nanoclaw.log").read_text()
    # the session's log is the spare's output, under the session's name
    sid = h.q("SELECT id FROM sessions")[0]["id"]
    assert "batch completed" in "".join(
        p.read_text() for p in (h.base / "logs" / "containers" / sid).glob("*.log"))
    if runtime == "bwrap":
        # the handover left nothing mounted on the host: only the new spare's empty
        # /workspace-to-be waits there
        staged = staged_mounts(h)
        assert len(staged) == 1 and staged[0].endswith("/s"), staged
    bob = h.client("bob")  # a second session: the replacement spare serves it
    assert bob.wait_reply(bob.send("hi"), 60)["text"] == "echo: hi"
    assert h.stop() == 0
    assert agent_pids(h.data) == []
    assert not (h.data / "run" / "warm").exists() or staged_mounts(h) == []


def test_spares_go_with_their_worker(host_factory, runtime):
    h = host_factory(runtime, NANOCLAW_RUNTIME=runtime, NANOCLAW_ZYGOTE="false").start()
    wait_for(lambda: len(spares(h)) == 1, 30, what="a spare agent")
    old = spares(h)[0]
    worker = h.worker_pid("containers")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{old}") or _zombie(old), 15,
             what="the old spare gone")
    wait_for(lambda: h.worker_pid("containers") not in (None, worker), 30, what="restart")
    wait_for(lambda: len(spares(h)) == 1 and spares(h)[0] != old, 30, what="a new spare")
    c = h.client()
    assert c.wait_reply(c.send("after restart"), 60)["text"] == "echo: after restart"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def test_planted_symlink_is_never_followed(host_factory, tmp_path, bwrap_works):
    """An agent may leave `agent -> <host folder>` in its session folder; the next start
    must neither mount over that host folder nor fail."""
    if not mountns.can_mount():
        pytest.skip("bwrap's warm pool needs root in the host's namespaces")
    h = host_factory("sym", NANOCLAW_RUNTIME="bwrap", NANOCLAW_IDLE_CEILING="1").start()
    c = h.client()
    assert c.wait_reply(c.send("one"), 60)["text"] == "echo: one"
    s = h.q("SELECT * FROM sessions")[0]
    wait_for(lambda: h.q("SELECT container_status FROM sessions")[0]["container_status"]
             == "stopped", 30, what="idle agent stopped")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("host file")
    agent = h.data / "sessions" / s["agent_group_id"] / s["id"] / "work" / "agent"
    agent.rmdir()
    agent.symlink_to(victim)
    wait_for(lambda: len(spares(h)) == 1, 30, what="a spare agent")
    assert c.wait_reply(c.send("two"), 60)["text"] == "echo: two"
    assert mountns.mounted_under(victim) == [] and (victim / "keep.txt").read_text() == "host file"
    assert agent.is_dir() and not agent.is_symlink()
    assert "replaced agent" in (h.base / "logs" / "nanoclaw.log").read_text()


def test_bind_into_refuses_symlinks_and_dotdot(tmp_path):
    if not mountns.can_mount():
        pytest.skip("bind mounts on the host need root")
    base, src, victim = tmp_path / "base", tmp_path / "src", tmp_path / "victim"
    for d in (base, src, victim):
        d.mkdir()
    (base / "agent").symlink_to(victim)
    (base / "deep").mkdir()
    (base / "deep" / "link").symlink_to(victim)
    with mountns.opened(base) as fd:
        for rel in ("agent", "deep/link/x", "../escape", "deep/../agent"):
            with pytest.raises(ValueError):
                mountns.bind_into(str(src), fd, rel)
        mountns.bind_into(str(src), fd, "extra/ok", readonly=True)
    try:
        assert mountns.mounted_under(victim) == []
        assert mountns.mounted_under(base) == [str(base / "extra" / "ok")]
        with pytest.raises(OSError):
            (base / "extra" / "ok" / "w").write_text("x")  # read-only as asked
    finally:
        mountns.detach_all(base)
    assert mountns.mounted_under(base) == []


def _dead_spare() -> Warm:
    p = subprocess.Popen([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    p.wait()
    return Warm(p, f"pid:{p.pid}:0", Path("/nonexistent.log"))


def test_pool_backs_off_when_spares_keep_dying():
    now = [100.0]
    started, discarded = [], []

    def start() -> Warm:
        w = _dead_spare()
        started.append(w)
        return w

    pool = WarmPool(1, start, discarded.append, clock=lambda: now[0])
    pool.maintain()
    assert len(started) == 1
    gaps = []
    for _ in range(5):
        pool.maintain()  # reaps the dead one; waits before the next
        assert len(discarded) == len(started)
        n = len(started)
        t0 = now[0]
        while len(started) == n:
            now[0] += 0.5
            pool.maintain()
        gaps.append(now[0] - t0)
    assert gaps == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert pool.take() is None  # a dead spare is never handed out
    pool.close()


def test_pool_hands_out_live_spares_and_closes_them():
    procs = []

    def start() -> Warm:
        p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"],
                             stdin=subprocess.PIPE)
        procs.append(p)
        return Warm(p, f"pid:{p.pid}:0", Path("/nonexistent.log"))

    def discard(w: Warm) -> None:
        w.proc.stdin.close()  # EOF: a waiting spare leaves on its own
        w.proc.wait(10)

    pool = WarmPool(2, start, discard)
    pool.maintain()
    assert len(pool.ready) == 2
    w = pool.take()
    assert w is not None and w.proc is procs[0]
    pool.maintain()
    assert len(pool.ready) == 2 and len(procs) == 3
    pool.close()
    assert all(p.poll() is not None for p in procs[1:])
    w.proc.stdin.close()
    w.proc.wait(10)


def test_bwrap_without_staging_starts_cold(tmp_path, bwrap_works):
    """If the host cannot stage mounts (here: its staging path is taken by a file), the
    pool is off with a warning and spawns still work, cold."""
    from nanoclaw.config import Settings
    from nanoclaw.runtime.base import SpawnSpec
    from nanoclaw.runtime.bwrap import BwrapRuntime
    from nanoclaw.runtime.warm import WarmSpec

    settings = Settings(data_dir=tmp_path / "data", logs_dir=tmp_path / "logs")
    (tmp_path / "data" / "run").mkdir(parents=True)
    (tmp_path / "data" / "run" / "warm").write_text("not a folder")
    runner = Path(__file__).resolve().parent.parent / "container"
    rt = BwrapRuntime(settings)
    rt.prewarm(WarmSpec(runner, "cold" + str(os.getpid())[-6:], settings.logs_dir, []))
    assert rt.pool is None
    from nanoclaw.db import session as sessiondb

    sessiondb.create(str(tmp_path / "s"), settings.agent_owner())
    (tmp_path / "g").mkdir()
    cid = rt.spawn(SpawnSpec(session_id="s1", agent_group_id="ag", session_dir=tmp_path / "s",
                             group_dir=tmp_path / "g", global_dir=tmp_path / "global",
                             runner_dir=runner, log_path=tmp_path / "1.log",
                             install_id="x", command=["true"]))
    codes: list = []
    wait_for(lambda: codes.append(rt.exit_code(cid)) or codes[-1] is not None, 10,
             what="the sandbox ran")
    assert codes[-1] == 0
