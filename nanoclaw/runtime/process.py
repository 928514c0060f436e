"""The `process` runtime: the agent runner as a plain host process. No isolation at all;
for development, tests and benchmarks of everything but the sandbox.

Each agent gets its own session (process group), a scrubbed environment and its output
in `logs/containers/<session>/<spawn>.log`. Container id `pid:<pid>:<starttime>` lets a
restarted worker re-attach to an agent that outlived it, without mistaking a recycled pid
(and a pid whose environment lacks an install's mark is no agent, whatever its start time).
Agents are forked by a zygote (`zygote.py`, `NANOCLAW_ZYGOTE`, on by default) that
imported the runner once; without one, a wake is handed to the warm pool's spare
(`warm.py`), or the runner starts cold.

An agent is not tied to its host: after a crash of the containers worker, or of the whole
host (`kill -9` of the orchestrator; the workers die with it), a busy agent lives on and
the next worker re-attaches to it through `sessions.container_id`. A spare of the warm
pool ends by itself once its pipe closes. Whatever of this install is left that no session
names (a spare still starting, an agent its host did not live to record) is stopped by the
next worker's `cleanup_orphans`, which returns only once it is gone, before any agent starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanoclaw.config import Settings
from nanoclaw.log import logger
from nanoclaw.runtime import agent_browser, procfs, warm
from nanoclaw.runtime.base import SpawnSpec
from nanoclaw.runtime.zygote import Zygote, ZygoteGone, ZygoteKeeper

MARK = "NANOCLAW_INSTALL"
GONE_S = 5.0          # after SIGKILL, how long to wait for an agent to be gone
CLEANUP_ROUNDS = 5    # orphan scans: what an orphan left behind is the next round's orphan


def _starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _ours(pid: int) -> bool:
    """Whether `pid` was started with an install's mark: only then can a recorded id name
    it (a pid and start time of a previous boot could be anyone's now). An environment
    that cannot be read (a setuid bwrap's) counts as marked: never call an agent gone
    when it may not be."""
    env = procfs.environ(pid)
    return env is None or any(e.startswith(MARK.encode() + b"=") for e in env)


def agents(install_id: str) -> list[str]:
    """The container ids of this install's agents now on the machine, warm spares
    included: each process started with the install's mark whose parent was not (a
    bwrap's pid-1 child, or a runner's own children, go with their agent)."""
    mark = f"{MARK}={install_id}".encode()
    marked: dict[int, int | None] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            env = procfs.environ(int(entry))
            if env and mark in env:
                marked[int(entry)] = procfs.ppid(int(entry))
    out = []
    for pid, parent in marked.items():
        start = _starttime(pid)
        if parent not in marked and start is not None:
            out.append(f"pid:{pid}:{start}")
    return out


def _base_env(runner_dir: Path, install_id: str) -> dict[str, str]:
    """An agent's environment before any session is known (a warm start's too)."""
    path = os.environ.get("PATH", "/usr/bin:/bin")
    browser = agent_browser.binary()  # no sandbox here: the host's cached copy, as it is
    return {
        "PATH": f"{browser.parent}:{path}" if browser else path,
        **agent_browser.environment(),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONPATH": str(runner_dir),
        "PYTHONDONTWRITEBYTECODE": "1",
        MARK: install_id,
    }


class ProcessRuntime:
    name = "process"
    forks = True  # agents can come from a zygote (a sandbox runtime: each its own sandbox)

    def __init__(self, settings: Settings | None = None) -> None:
        self.children: dict[str, subprocess.Popen] = {}
        self.warm_size = settings.warm_pool if settings is not None else 0
        self.pool: warm.WarmPool | None = None
        self.warm_spec: warm.WarmSpec | None = None
        self.use_zygote = self.forks and settings is not None and settings.zygote
        self.keeper: ZygoteKeeper | None = None
        self.forked: dict[str, Zygote] = {}  # container id → the zygote that forked it

    @classmethod
    def available(cls, settings: Settings | None = None) -> bool:
        return True

    # ---- the warm pool ----------------------------------------------------------------
    def prewarm(self, spec: warm.WarmSpec) -> None:
        """Start the zygote, or keeping warm agents (after orphan cleanup, which would
        stop them)."""
        if self.warm_size <= 0 and not self.use_zygote:
            return
        for old in (spec.logs_dir / "containers" / ".warm").glob("*.log"):
            old.unlink(missing_ok=True)  # a previous worker's spares, gone with it
        self.warm_spec = spec
        if self.use_zygote:
            self.keeper = ZygoteKeeper(self._start_zygote)
            self.keeper.maintain()
            return
        self.pool = warm.WarmPool(self.warm_size, self._start_warm, self._discard_warm)
        self.pool.maintain()

    def maintain(self) -> bool:
        if self.keeper is not None:
            return self.keeper.maintain()
        return self.pool.maintain() if self.pool is not None else False

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close()
        if self.pool is not None:
            self.pool.close()

    def _start_zygote(self) -> Zygote:
        ws = self.warm_spec
        assert ws is not None
        env = {**_base_env(ws.runner_dir, ws.install_id), "NANOCLAW_ZYGOTE": "1",
               "NANOCLAW_WARM_PRELOAD": ",".join(ws.preload)}
        return Zygote([sys.executable, "-m", "sandbox_entry"], env, warm.warm_log(ws.logs_dir))

    def _fork(self, z: Zygote, spec: SpawnSpec) -> str:
        env = self._env(spec)
        env.pop(MARK)  # already in the zygote's own environment, so in the child's
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        pid = z.fork(env, str(spec.group_dir), spec.log_path)
        cid = f"pid:{pid}:{_starttime(pid)}"
        self.forked[cid] = z
        return cid

    def _start_warm(self) -> warm.Warm:
        ws = self.warm_spec
        assert ws is not None
        env = {**_base_env(ws.runner_dir, ws.install_id), "NANOCLAW_WARM": "1",
               "NANOCLAW_WARM_PRELOAD": ",".join(ws.preload)}
        log = warm.warm_log(ws.logs_dir)
        with open(log, "ab") as out:
            p = subprocess.Popen([sys.executable, "-m", "sandbox_entry"], cwd="/", env=env,
                                 stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, close_fds=True)
        return warm.Warm(p, f"pid:{p.pid}:{_starttime(p.pid)}", log)

    def _use_warm(self, w: warm.Warm, spec: SpawnSpec) -> str:
        env = self._env(spec)
        env.pop(MARK)  # already in the process's own environment
        warm.hand_over(w, env, str(spec.group_dir), spec.log_path)
        return w.cid

    def _discard_warm(self, w: warm.Warm) -> None:
        if w.proc.poll() is None:
            self.children[w.cid] = w.proc
            self.stop(w.cid, grace=0.2)
        self.children.pop(w.cid, None)
        if w.proc.stdin is not None:
            w.proc.stdin.close()
        Path(w.log_path).unlink(missing_ok=True)

    # ---- one agent ----------------------------------------------------------------------
    def spawn(self, spec: SpawnSpec) -> str:
        """A child of the zygote, or a warm agent, when one is ready (and the spawn is the
        runner), else a cold one."""
        z = self.keeper.get() if self.keeper is not None and spec.command is None else None
        if z is not None:
            assert self.keeper is not None
            try:
                cid = self._fork(z, spec)
                self.keeper.served()
                return cid
            except (ZygoteGone, OSError) as e:
                logger.warning("session {}: zygote not usable ({}); starting cold",
                               spec.session_id, e)
                self.keeper.failed(str(e))
        if spec.command is None and self.pool is not None:
            w = self.pool.take()
            if w is not None:
                try:
                    cid = self._use_warm(w, spec)
                    self.children[cid] = w.proc
                    return cid
                except Exception as e:
                    logger.warning("session {}: warm agent not usable ({}); starting cold",
                                   spec.session_id, e)
                    self._discard_warm(w)
        return self._spawn_cold(spec)

    def _env(self, spec: SpawnSpec) -> dict[str, str]:
        return {
            **_base_env(spec.runner_dir, spec.install_id),
            "HOME": str(spec.session_dir / "work"),
            "NANOCLAW_SESSION_DIR": str(spec.session_dir / "work"),
            "NANOCLAW_DB_DIR": str(spec.session_dir / "db"),
            "NANOCLAW_GROUP_DIR": str(spec.group_dir),
            "NANOCLAW_GLOBAL_DIR": str(spec.global_dir),
            **spec.env,
        }

    def _spawn_cold(self, spec: SpawnSpec) -> str:
        env = self._env(spec)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as log:
            p = subprocess.Popen(
                [sys.executable, "-m", "agent_runner"], cwd=spec.group_dir, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
        cid = f"pid:{p.pid}:{_starttime(p.pid)}"
        self.children[cid] = p
        return cid

    def exit_code(self, container_id: str) -> int | None:
        z = self.forked.get(container_id)
        if z is not None:  # the zygote reaps it and says how it ended
            pid = _parse(container_id)[0]
            z.poll()
            if pid in z.exits:
                del self.forked[container_id]
                return z.exits.pop(pid)
            if z.alive():
                return None
            del self.forked[container_id]  # its zygote went: watch /proc as for any other
        p = self.children.get(container_id)
        if p is not None:
            code = p.poll()
            if code is not None:
                del self.children[container_id]
            return code
        pid, start = _parse(container_id)  # adopted: not our child, watch /proc
        if pid is None or _starttime(pid) != start or _state(pid) in (None, "Z", "X") \
                or not _ours(pid):
            return -1
        return None

    def stop(self, container_id: str, grace: float = 1.0) -> None:
        """SIGTERM to the agent's process group, SIGKILL after `grace`; returns once the
        agent is gone (a zombie is gone: it runs nothing), at most GONE_S after the kill."""
        pid, start = _parse(container_id)
        z = self.forked.pop(container_id, None)
        if z is not None and pid is not None:
            z.unwant(pid)
        if pid is None or _starttime(pid) != start or (container_id not in self.children
                                                       and not _ours(pid)):
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + grace
        while time.time() < deadline:
            if self._gone(container_id, pid):
                return
            time.sleep(0.01)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p = self.children.pop(container_id, None)
        if p is not None:
            p.wait(timeout=GONE_S)
            return
        deadline = time.time() + GONE_S  # adopted: gone once /proc says so
        while not self._gone(container_id, pid):
            if time.time() > deadline:
                logger.error("agent {} still there {:.0f}s after SIGKILL", container_id, GONE_S)
                return
            time.sleep(0.01)

    def _gone(self, container_id: str, pid: int) -> bool:
        p = self.children.get(container_id)
        if p is not None:
            return p.poll() is not None
        return _state(pid) in (None, "Z", "X") or _starttime(pid) != _parse(container_id)[1]

    def cleanup_orphans(self, install_id: str, keep: set[str]) -> int:
        """Stop every agent of this install not in `keep` (spares of an earlier pool, an
        agent whose start its host did not live to record) and return once they are gone;
        raises when some will not go, so the caller starts nothing. All at once: one
        by one, each spare's grace would add up."""
        stopped: set[str] = set()
        orphans: list[str] = []
        for _ in range(CLEANUP_ROUNDS):
            orphans = [cid for cid in agents(install_id) if cid not in keep]
            if not orphans:
                return len(stopped)
            with ThreadPoolExecutor(max_workers=min(32, len(orphans))) as pool:
                list(pool.map(lambda cid: self.stop(cid, grace=0.5), orphans))
            stopped.update(orphans)
        raise RuntimeError(f"orphaned agents of this install do not stop: {', '.join(orphans)}")


def _parse(container_id: str) -> tuple[int | None, str | None]:
    try:
        kind, pid, start = container_id.split(":", 2)
        return (int(pid), start) if kind == "pid" else (None, None)
    except ValueError:
        return None, None
