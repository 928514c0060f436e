"""The docker runtime's warm pool against a real engine and real mounts: a spare container
serves the next session (under the session's name, seeing that session's folders and no
other's, with the same restrictions as a cold one, cut off from the host's mounts
afterwards), the pool refills, a spare that died is discarded and the wake starts cold,
a restarted worker stops the spares it finds and leaves a live session's container
alone, a second spawn for a session adopts its container and keeps the spare, a symlink
an agent planted in its folder is never followed by the hand-over, and with the pool off
(size 0, or no root in the host's namespaces) a spawn is the cold path as it always was."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SECRET, clean_env, install_label, install_of, wait_for

from nanoclaw.config import Settings
from nanoclaw.runtime import mountns, sandbox
from nanoclaw.runtime.docker import spare_prefix

PROBE = (Path(__file__).parent / "sandbox_probe.py").read_text()
ENCODED = base64.b64encode(SECRET.encode()).decode()[::-1]
WARM_LABEL = "nanoclaw.warm"


def needs_root() -> None:
    if not mountns.can_mount():
        pytest.skip("docker's warm pool needs root in the host's namespaces")


@pytest.fixture
def dhost(host_factory, docker_client, agent_image):
    needs_root()
    made = []

    def make(name="w", **env):
        h = host_factory(name, NANOCLAW_RUNTIME="docker", **env)
        made.append(h)
        return h

    yield make
    for h in made:
        h.cleanup()
        for c in docker_client.api.containers(all=True, filters={"label": install_label(h.data)}):
            docker_client.api.remove_container(c["Id"], force=True)
        mountns.detach_all((h.data / "run" / "docker-warm").resolve())


def remove_install(client, install: str, data_dir: Path) -> None:
    """Whatever a test's runtimes left: the install's containers and staging mounts."""
    for x in client.api.containers(all=True, filters={"label": f"{sandbox.LABEL}={install}"}):
        client.api.remove_container(x["Id"], force=True)
    mountns.detach_all((data_dir / "run" / "docker-warm").resolve())


@pytest.fixture
def engine(docker_client, agent_image, tmp_path):
    """Settings for the runtimes a test makes itself, and an install id of its own."""
    needs_root()
    settings = Settings(data_dir=tmp_path / "data", logs_dir=tmp_path / "logs",
                        image=agent_image)
    install = f"w{time.time_ns() % 10**9}"
    yield settings, install
    remove_install(docker_client, install, settings.data_dir)


def spares(client, data: Path) -> list[str]:
    """Ids of the install's running containers still waiting for a session."""
    prefix = "/" + spare_prefix(install_of(data))  # the engine's names start with "/"
    return [c["Id"] for c in client.api.containers(filters={"label": install_label(data)})
            if c["Names"][0].startswith(prefix)]


def staged(data: Path) -> list[str]:
    """Mounts on the host below the staging root, the root's own excepted."""
    root = (data / "run" / "docker-warm").resolve()
    return [p for p in mountns.mounted_under(root) if p != str(root)]


def probe(container, *forbidden: str) -> dict:
    r = container.exec_run(["python", "-c", PROBE, ENCODED, *forbidden])
    assert r.exit_code == 0, r.output.decode()
    return json.loads(r.output.decode().strip().splitlines()[-1])


def workspace_mounts(container) -> list[str]:
    """The container's own mountinfo lines for /workspace and below."""
    r = container.exec_run(["cat", "/proc/self/mountinfo"])
    return [line for line in r.output.decode().splitlines()
            if line.split()[4] == "/workspace" or line.split()[4].startswith("/workspace/")]


def test_spare_serves_the_next_session_and_the_pool_refills(dhost, docker_client):
    h = dhost().start()
    first = wait_for(lambda: spares(docker_client, h.data), 60, what="a spare container")[0]
    alice = h.client("alice")
    assert alice.wait_reply(alice.send("hello warm"), 60)["text"] == "echo: hello warm"
    a = h.q("SELECT * FROM sessions")[0]
    assert a["container_id"] == first  # the spare took the session: no cold start
    c_a = docker_client.containers.get(first)
    assert c_a.name == sandbox.name(install_of(h.data), a["id"])
    second = wait_for(lambda: [s for s in spares(docker_client, h.data) if s != first], 60,
                      what="the pool refilled")[0]
    bob = h.client("bob")
    assert bob.wait_reply(bob.send("hi"), 60)["text"] == "echo: hi"
    b = h.q("SELECT * FROM sessions WHERE id != ?", (a["id"],))[0]
    assert b["container_id"] == second
    log = (h.base / "logs" / "nanoclaw.log").read_text()
    assert "starting cold" not in log and "ended before use" not in log
    # the session's log is the container's output, under the session's name
    assert "batch completed" in "".join(
        p.read_text() for p in (h.base / "logs" / "containers" / a["id"]).glob("*.log"))

    # each sees its own session's folder at /workspace, and nothing of the other's
    for s, c in ((a, c_a), (b, docker_client.containers.get(second))):
        work = h.data / "sessions" / s["agent_group_id"] / s["id"] / "work"
        (work / "whose.txt").write_text(s["id"])
        assert c.exec_run(["cat", "/workspace/whose.txt"]).output.decode() == s["id"]
        other = b if s is a else a
        seen = probe(c, other["id"], str(h.data))
        assert seen["scanned"] > 10
        assert seen["forbidden_paths"] == [] and seen["forbidden_exist"] == []
        assert not seen["env_has_secret"] and seen["proc_hits"] == [] and seen["file_hits"] == []
        # what `exec` sees is the spare's environment: no session token in the container's
        # configuration (the runner got it down its stdin)
        assert seen["warm"] and seen["token"] == ""
        assert seen["uid"] == 61000 and seen["cap_eff"] == "0000000000000000"
        assert seen["net"] == ["lo"]
        assert not seen["root_writable"] and not seen["etc_writable"]
        assert seen["workspace_writable"]
        # the same restrictions as a cold container
        hc = c.attrs["HostConfig"]
        assert hc["ReadonlyRootfs"] and hc["CapDrop"] == ["ALL"] and hc["NetworkMode"] == "none"
        assert "no-new-privileges" in hc["SecurityOpt"] and c.attrs["Config"]["User"] == \
            "61000:61000"
        # the link to the host's staging is cut: nothing more can be pushed in
        lines = workspace_mounts(c)
        assert len(lines) >= 5 and not [x for x in lines if "master:" in x], lines
    # the handovers left nothing mounted on the host: only the new spare's empty
    # /workspace-to-be waits there, and no session folder is mounted anywhere
    wait_for(lambda: len(spares(docker_client, h.data)) == 1, 60, what="the pool refilled")
    left = staged(h.data)
    assert len(left) == 1 and left[0].endswith("/s"), left
    assert mountns.mounted_under(h.data / "sessions") == []
    assert mountns.mounted_under(h.base / "groups") == []
    assert h.stop() == 0
    assert docker_client.api.containers(all=True, filters={"label": install_label(h.data)}) == []
    assert staged(h.data) == [] and not (h.data / "run" / "docker-warm").exists()


def test_a_spare_that_died_is_discarded_and_the_wake_starts_cold(dhost, docker_client):
    h = dhost().start()
    dead = wait_for(lambda: spares(docker_client, h.data), 60, what="a spare container")[0]
    stage = Path(docker_client.containers.get(dead).labels[WARM_LABEL])
    docker_client.containers.get(dead).kill()
    docker_client.api.wait(dead, timeout=30)
    c = h.client()
    assert c.wait_reply(c.send("after a death"), 60)["text"] == "echo: after a death"
    s = h.q("SELECT * FROM sessions")[0]
    ct = docker_client.containers.get(s["container_id"])
    assert ct.id != dead and ct.labels["nanoclaw.session"] == s["id"]  # a cold container
    assert WARM_LABEL not in ct.labels
    assert "a warm agent ended before use" in (h.base / "logs" / "nanoclaw.log").read_text()
    wait_for(lambda: dead not in {x["Id"] for x in docker_client.api.containers(all=True)}, 30,
             what="the dead spare removed")
    assert not stage.exists() and str(stage) not in "".join(staged(h.data))
    # the pool starts again after its back-off
    wait_for(lambda: spares(docker_client, h.data), 60, what="a new spare")


def _spec(tmp: Path, settings: Settings, install: str, sid: str, **kw):
    from nanoclaw.db import session as sessiondb
    from nanoclaw.runtime.base import SpawnSpec

    sessiondb.create(str(tmp / sid), settings.agent_owner())
    (tmp / f"g-{sid}").mkdir()
    return SpawnSpec(session_id=sid, agent_group_id="ag", session_dir=tmp / sid,
                     group_dir=tmp / f"g-{sid}", global_dir=tmp / "global",
                     runner_dir=ROOT / "container", log_path=tmp / "logs" / sid / "1.log",
                     install_id=install, **kw)


def _same(host: Path, pid: int, inside: str) -> bool:
    a, b = os.stat(host), os.stat(f"/proc/{pid}/root{inside}")
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def test_a_restarted_runtime_stops_spares_and_keeps_live_sessions(docker_client, engine,
                                                                tmp_path):
    import docker.errors

    from nanoclaw.runtime.docker import DockerRuntime
    from nanoclaw.runtime.warm import WarmSpec

    settings, install = engine
    ws = WarmSpec(ROOT / "container", install, settings.logs_dir, [])
    old = DockerRuntime(settings)  # the worker that dies
    old.prewarm(ws)
    assert old.pool is not None
    spare = old.pool.ready[0].proc.ready()
    spec = _spec(tmp_path, settings, install, "sess-live")
    live = old.spawn(spec)  # handed to the spare
    assert live == spare.id
    c = docker_client.containers.get(live)
    assert c.name == sandbox.name(install, "sess-live")
    pid = c.attrs["State"]["Pid"]
    assert _same(spec.group_dir, pid, sandbox.GROUP)
    old.maintain()  # refill: the spare a dying worker leaves behind
    leftover = old.pool.ready[0].proc.ready()
    leftover_stage = Path(leftover.labels[WARM_LABEL])
    assert leftover_stage.is_dir() and staged(settings.data_dir)

    new = DockerRuntime(settings)  # a restarted containers worker
    assert new.cleanup_orphans(install, {live}) == 1
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(leftover.id)
    assert not leftover_stage.exists() and staged(settings.data_dir) == []
    assert new.exit_code(live) is None
    assert _same(spec.group_dir, pid, sandbox.GROUP)  # its session still in place
    new.prewarm(ws)  # its own pool; the live container's staging folder stays
    assert _same(spec.session_dir / "work", pid, sandbox.SESSION)
    assert new.pool is not None and new.pool.ready[0].proc.ready().id != leftover.id
    new.stop(live)
    # the former spare's output went to its session's log (read from its record)
    assert "agent_runner started" in spec.log_path.read_text()
    assert not Path(c.labels[WARM_LABEL]).exists()
    new.close()
    old.close()
    assert docker_client.api.containers(
        all=True, filters={"label": f"{sandbox.LABEL}={install}"}) == []
    assert staged(settings.data_dir) == []


def test_a_namesake_is_adopted_and_the_spare_kept(docker_client, engine, tmp_path):
    """The engine's one container per session holds with the pool: a second spawn for a
    session whose container runs adopts it, and the spare stays for the next session."""
    from nanoclaw.runtime.docker import DockerRuntime
    from nanoclaw.runtime.warm import WarmSpec

    settings, install = engine
    rt = DockerRuntime(settings)
    rt.prewarm(WarmSpec(ROOT / "container", install, settings.logs_dir, []))
    assert rt.pool is not None
    first = rt.pool.ready[0].proc.ready()
    spec = _spec(tmp_path, settings, install, "sess-twice")
    assert rt.spawn(spec) == first.id
    rt.maintain()
    spare = rt.pool.ready[0].proc.ready()
    assert rt.spawn(spec) == first.id  # adopted, not doubled
    assert [w.proc.ready().id for w in rt.pool.ready] == [spare.id]
    assert docker_client.containers.get(spare.id).status == "running"
    ours = docker_client.api.containers(filters={"label": f"{sandbox.LABEL}={install}"})
    assert sorted(c["Id"] for c in ours) == sorted([first.id, spare.id])
    rt.stop(first.id)
    rt.close()


def test_planted_symlink_is_never_followed_by_the_handover(docker_client, engine,
                                                           tmp_path):
    """An agent may leave `agent -> <host folder>` in its session folder; handing the next
    start to a spare must neither mount over that host folder nor fail."""
    from nanoclaw.runtime.docker import DockerRuntime
    from nanoclaw.runtime.warm import WarmSpec

    settings, install = engine
    rt = DockerRuntime(settings)
    rt.prewarm(WarmSpec(ROOT / "container", install, settings.logs_dir, []))
    assert rt.pool is not None
    spare = rt.pool.ready[0].proc.ready()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("host file")
    spec = _spec(tmp_path, settings, install, "sess-sym")
    agent = spec.session_dir / "work" / "agent"
    if agent.exists():
        agent.rmdir()
    agent.symlink_to(victim)
    cid = rt.spawn(spec)
    assert cid == spare.id  # the spare took it, the symlink notwithstanding
    pid = docker_client.containers.get(cid).attrs["State"]["Pid"]
    assert _same(spec.group_dir, pid, sandbox.GROUP)
    assert mountns.mounted_under(victim) == [] and (victim / "keep.txt").read_text() == \
        "host file"
    assert agent.is_dir() and not agent.is_symlink()
    rt.stop(cid)
    rt.close()


# ---- the pool off: a spawn is the cold path ------------------------------------------
COLD = r"""
import json, sys
from pathlib import Path
from nanoclaw.config import Settings
from nanoclaw.db import session as sessiondb
from nanoclaw.log import logger
from nanoclaw.runtime import mountns
from nanoclaw.runtime.base import SpawnSpec
from nanoclaw.runtime.docker import DockerRuntime
from nanoclaw.runtime.warm import WarmSpec

logger.add(sys.stderr, level="INFO")
tmp, image, install, pool, runner = (Path(sys.argv[1]), sys.argv[2], sys.argv[3],
                                     int(sys.argv[4]), Path(sys.argv[5]))
settings = Settings(data_dir=tmp / "data", logs_dir=tmp / "logs", image=image, warm_pool=pool)
rt = DockerRuntime(settings)
rt.prewarm(WarmSpec(runner, install, settings.logs_dir, []))
sessiondb.create(str(tmp / "s"), settings.agent_owner())
(tmp / "g").mkdir()
cid = rt.spawn(SpawnSpec(session_id="sess-cold", agent_group_id="ag", session_dir=tmp / "s",
                         group_dir=tmp / "g", global_dir=tmp / "global", runner_dir=runner,
                         log_path=tmp / "logs" / "1.log", install_id=install,
                         env={"ANTHROPIC_API_KEY": "tok"}))
print(json.dumps({"cid": cid, "pool": rt.pool is not None, "can_mount": mountns.can_mount()}))
"""


UNSHARE = r"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
    sys.exit("no user namespace: " + os.strerror(ctypes.get_errno()))
os.write(1, b"u")
os.read(0, 1)  # the parent has written the maps
sys.argv = sys.argv[1:]
exec(sys.argv[0])
"""


def _unprivileged(argv: list[str]) -> subprocess.CompletedProcess:
    """`python -c <script> args` as root in a user namespace of its own (every uid mapped
    but one, so files can still be given to the sandbox user): root there, without the
    power to change the host's mounts."""
    assert argv[1] == "-c"
    p = subprocess.Popen([argv[0], "-c", UNSHARE, *argv[2:]], env=clean_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.read(1) == b"u", p.communicate(timeout=10)[1]
    for f in ("uid_map", "gid_map"):
        Path(f"/proc/{p.pid}/{f}").write_text("0 0 4294967294\n")
    out, err = p.communicate(b"g", timeout=120)
    return subprocess.CompletedProcess(argv, p.returncode, out.decode(), err.decode())


@pytest.mark.parametrize("why", ["pool-0", "no-root"])
def test_pool_off_spawns_the_cold_container(why, docker_client, agent_image, tmp_path):
    install = f"c{int(time.time() * 1000) % 10**7}"
    argv = [sys.executable, "-c", COLD, str(tmp_path), agent_image, install,
            "0" if why == "pool-0" else "1", str(ROOT / "container")]
    if why == "no-root":
        needs_root()  # to make the user namespace; the runtime inside has no root
        r = _unprivileged(argv)
    else:
        r = subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    try:
        assert out["pool"] is False
        if why == "no-root":
            assert out["can_mount"] is False
            assert "warm pool off for docker" in r.stderr and "needs root" in r.stderr
        ours = docker_client.api.containers(all=True,
                                            filters={"label": f"{sandbox.LABEL}={install}"})
        assert [c["Id"] for c in ours] == [out["cid"]]  # no spare was started
        c = docker_client.containers.get(out["cid"])
        assert c.name == sandbox.name(install, "sess-cold")
        log = tmp_path / "logs" / "1.log"
        image = docker_client.images.get(agent_image).labels or {}
        assert {k: v for k, v in c.labels.items() if k not in image} == {
            sandbox.LABEL: install, "nanoclaw.session": "sess-cold", "nanoclaw.log": str(log)}
        cfg = c.attrs["Config"]
        assert not cfg["OpenStdin"] and not cfg["StdinOnce"]
        assert cfg["WorkingDir"] == sandbox.GROUP and "ANTHROPIC_API_KEY=tok" in cfg["Env"]
        assert cfg["Cmd"] == ["python", "-m", "sandbox_entry"]
        mounts = {m["Destination"]: (m["Source"], m["RW"], m.get("Propagation"))
                  for m in c.attrs["Mounts"]}
        assert mounts["/workspace"][:2] == (str(tmp_path / "s" / "work"), True)
        assert mounts["/workspace/agent"][:2] == (str(tmp_path / "g"), True)
        assert not any(p == "rslave" for _, _, p in mounts.values())
        assert not (tmp_path / "data" / "run" / "docker-warm").exists()
    finally:
        remove_install(docker_client, install, tmp_path / "data")
