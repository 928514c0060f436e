"""The bwrap runtime: inside a running agent's sandbox (entered with nsenter) there is no
credential, no other session, no network but the broker's socket, no root and no
writable root; the sandbox dies with the worker that started it; orphans are found."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SECRET, agent_pids, wait_for

PROBE = (Path(__file__).parent / "sandbox_probe.py").read_text()
ENCODED = base64.b64encode(SECRET.encode()).decode()[::-1]


@pytest.fixture
def bhost(host_factory, bwrap_works):
    def make(name="b", **env):
        return host_factory(name, NANOCLAW_RUNTIME="bwrap", **env)

    return make


def sandboxes(h) -> dict[int, int]:
    """outer bwrap pid → the runner inside (its deepest descendant)."""
    from nanoclaw.runtime.bwrap import _children, _ppid

    pids = set(agent_pids(h.data, spares=False))
    return {p: _children(p)[-1] for p in pids if _ppid(p) not in pids and _children(p)}


def enter(pid: int, *forbidden: str) -> dict:
    """Run the probe in the namespaces and root of a running agent, as its user."""
    if os.geteuid() != 0 or not shutil.which("nsenter"):
        pytest.skip("entering a sandbox needs root and nsenter")
    st = os.stat(f"/proc/{pid}")
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0")
               if "=" in kv)  # the agent's own environment
    r = subprocess.run(["nsenter", "-t", str(pid), "-m", "-p", "-n", "-u", "-i", "-r", "-w",
                        "-S", str(st.st_uid), "-G", str(st.st_gid), "--", sys.executable, "-c",
                        PROBE, ENCODED, *forbidden], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pool", ["0", "1"], ids=["cold", "warm"])
def test_inside_a_running_agent_sandbox(bhost, pool):
    """Both ways in: a sandbox started for its session, and a warm one handed the
    session through the host's mounts (its token comes on a pipe, not in its
    /proc environ)."""
    h = bhost(NANOCLAW_WARM_POOL=pool).start()
    alice, bob = h.client("alice"), h.client("bob")
    alice.wait_reply(alice.send("hi from alice"), 60)
    bob.wait_reply(bob.send("hi from bob"), 60)
    sessions = h.q("SELECT id, container_id FROM sessions ORDER BY created_at")
    boxes = sandboxes(h)
    assert len(boxes) == 2
    runners = {s["id"]: boxes[int(s["container_id"].split(":")[1])] for s in sessions}
    for mine, other in (sessions, sessions[::-1]):
        seen = enter(runners[mine["id"]], other["id"], str(h.data), str(h.base))
        assert seen["scanned"] > 5
        assert not seen["env_has_secret"]
        assert bool(seen["token"]) == (pool == "0")
        assert seen["warm"] == (pool == "1")
        assert seen["proc_hits"] == [] and seen["file_hits"] == []
        assert seen["forbidden_paths"] == [] and seen["forbidden_exist"] == []
        assert seen["uid"] != 0 and seen["cap_eff"] == "0000000000000000"
        assert seen["net"] == ["lo"]
        assert not seen["root_writable"] and not seen["etc_writable"]
        assert seen["workspace_writable"]
        assert "/workspace" in seen["mounts"] and "/run/nanoclaw" in seen["mounts"]
        assert not any(m.startswith(("/home", "/var", "/srv")) for m in seen["mounts"])


def test_sandbox_dies_with_its_worker_and_orphans_are_found(bhost, tmp_path):
    from nanoclaw.config import Settings
    from nanoclaw.db import session as sessiondb
    from nanoclaw.runtime.base import SpawnSpec
    from nanoclaw.runtime.bwrap import BwrapRuntime, _children

    settings = Settings(data_dir=tmp_path / "data")
    sessiondb.create(str(tmp_path / "s"), settings.agent_owner())
    (tmp_path / "g").mkdir()
    spec = SpawnSpec(session_id="s1", agent_group_id="ag", session_dir=tmp_path / "s",
                     group_dir=tmp_path / "g", global_dir=tmp_path / "global",
                     runner_dir=Path(__file__).resolve().parent.parent / "container",
                     log_path=tmp_path / "1.log", install_id="bw" + str(os.getpid())[-6:],
                     command=["sleep", "300"])
    rt = BwrapRuntime(settings)
    kept = rt.spawn(spec)
    lost = rt.spawn(spec)
    wait_for(lambda: all(_children(int(c.split(":")[1])) for c in (kept, lost)), 10,
             what="both sandboxes up")
    assert rt.cleanup_orphans(spec.install_id, {kept}) == 1
    assert rt.exit_code(lost) is not None and rt.exit_code(kept) is None
    rt.stop(kept, grace=1.0)
    assert rt.exit_code(kept) is not None
    # --die-with-parent: a sandbox started by a process that dies goes with it
    code = ("import sys; from pathlib import Path; from nanoclaw.config import Settings;"
            "from nanoclaw.runtime.base import SpawnSpec; from nanoclaw.runtime.bwrap import"
            " BwrapRuntime; t = Path(sys.argv[1]); rt = BwrapRuntime(Settings(data_dir=t/'data'));"
            " print(rt.spawn(SpawnSpec(session_id='s2', agent_group_id='ag', session_dir=t/'s',"
            " group_dir=t/'g', global_dir=t/'global', runner_dir=Path(sys.argv[2]),"
            " log_path=t/'2.log', install_id=sys.argv[3], command=['sleep', '300'])),"
            " flush=True); sys.stdin.read()")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path),
                               str(spec.runner_dir), spec.install_id],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    cid = parent.stdout.readline().strip()
    pid = int(cid.split(":")[1])
    # (killed within its first milliseconds, bwrap itself can leave the sandbox behind;
    # the next worker's orphan cleanup stops it, since it carries the install's mark)
    wait_for(lambda: len(_children(pid)) == 2, 10, what="sandbox up")
    parent.kill()
    parent.wait(10)
    wait_for(lambda: rt.exit_code(cid) is not None, 10, what="sandbox gone with its parent")
    wait_for(lambda: rt.cleanup_orphans(spec.install_id, set()) == 0, 10, what="nothing left")


def test_host_as_a_regular_user(fake_model, bwrap_works):
    """Not root: bwrap sandboxes unprivileged in a user namespace, the warm pool says it
    is off for bwrap (the handover needs root) and every agent starts cold."""
    import tempfile

    from conftest import Host

    if os.geteuid() != 0:
        pytest.skip("the suite itself runs as a regular user; switching to another needs root")
    uid = 1000
    probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                            "bwrap", "--unshare-pid", "--ro-bind", "/", "/", "--proc", "/proc",
                            "--dev", "/dev", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are off here: {probe.stderr.decode()[:200]}")
    py = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                         sys.executable, "-c", "import os, sys; os.execv(sys.executable,"
                         " [sys.executable, '-c', 'import nanoclaw'])"],
                        capture_output=True, cwd="/")  # the host re-executes itself
    if py.returncode != 0:
        pytest.skip(f"uid {uid} cannot run this suite's Python ({sys.executable}; e.g. it lives"
                    f" under a 0700 home): {py.stderr.decode()[-200:]}")
    base = Path(tempfile.mkdtemp(prefix="nanoclaw-user-"))  # tmp_path's parents are root's 0700
    os.chown(base, uid, uid)
    h = Host(base / "h", fake_model.url, {"NANOCLAW_RUNTIME": "bwrap", "HOME": str(base)},
             user=uid)
    (base / "h").mkdir()
    os.chown(base / "h", uid, uid)
    try:
        h.start()
        c = h.client()
        assert c.wait_reply(c.send("hello from a user"), 60)["text"] == "echo: hello from a user"
        log = (h.base / "logs" / "nanoclaw.log").read_text()
        assert "warm pool off for bwrap" in log
        procs = [w["pid"] for w in h.workers()] + agent_pids(h.data)
        assert procs and all(os.stat(f"/proc/{p}").st_uid == uid for p in procs)
        assert os.stat(h.data / "nanoclaw.db").st_uid == uid
    finally:
        h.cleanup()
        shutil.rmtree(base, ignore_errors=True)
