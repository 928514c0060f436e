"""The warm pool: agents started before any session needs them.

A cold start is mostly the runner's interpreter start and SDK import (~0.4 s of a
0.45 s cold turn). The `process`, `bwrap` and `docker` runtimes keep `NANOCLAW_WARM_POOL`
agents (default 1) that have done that work and wait, blocked on a pipe, costing no CPU.
A wake takes one and hands it the session (environment, working folder and, for bwrap
and docker, the session's mounts — `mountns.py`); the pool is refilled on the containers
worker's next pass. Anything that goes wrong with a warm agent falls back to a cold
start, so the pool can only make a start faster, never make it fail.

A warm agent that dies before it is used is logged with the end of its output, and the
pool backs off (1 s doubling to 5 min) so a broken runner cannot spin. Warm agents die
with the containers worker (their pipe closes, or bwrap's `--die-with-parent`), and so
with the host (a docker spare outlives it, as every container does); one still starting
then, a docker spare, or one handed a session its worker did not live to record, is
stopped by the next worker's orphan cleanup before it starts any agent (and before it
fills its own pool).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nanoclaw.log import logger
from nanoclaw.runtime import mountns, procfs
from nanoclaw.runtime.procfs import children

BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 300.0


@dataclass
class WarmSpec:
    """What a warm agent needs before any session is known."""

    runner_dir: Path
    install_id: str
    logs_dir: Path
    preload: list[str] = field(default_factory=list)  # provider names to import ahead


@dataclass
class Warm:
    proc: subprocess.Popen
    cid: str
    log_path: Path
    stage: Path | None = None   # bwrap: this sandbox's staging folder
    stage_fd: int | None = None  # … and its shared mount, held open


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class Backoff:
    """After each failure wait longer before trying again (BACKOFF_MIN_S doubling to
    BACKOFF_MAX_S); a success starts over. The warm pool's and the zygote's."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.delay = 0.0
        self.not_before = 0.0

    def due(self) -> bool:
        return self.clock() >= self.not_before

    def failed(self) -> None:
        self.delay = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self.delay * 2))
        self.not_before = self.clock() + self.delay

    def succeeded(self) -> None:
        self.delay = 0.0


class WarmPool:
    def __init__(self, size: int, start: Callable[[], Warm], discard: Callable[[Warm], None],
                 clock: Callable[[], float] = time.monotonic):
        self.size, self._start, self._discard = size, start, discard
        self.ready: list[Warm] = []
        self.backoff = Backoff(clock)

    def take(self) -> Warm | None:
        """A live warm agent, oldest first, or None (the caller starts cold)."""
        while self.ready:
            w = self.ready.pop(0)
            if w.proc.poll() is None:
                self.backoff.succeeded()
                return w
            self._died(w)
        return None

    def maintain(self) -> bool:
        """Reap warm agents that died; start new ones up to the pool size."""
        did = False
        for w in [w for w in self.ready if w.proc.poll() is not None]:
            self.ready.remove(w)
            self._died(w)
            did = True
        while len(self.ready) < self.size and self.backoff.due():
            try:
                self.ready.append(self._start())
            except Exception as e:
                logger.error("warm pool: cannot start a warm agent: {}", e)
                self.backoff.failed()
                break
            did = True
        return did

    def close(self) -> None:
        for w in self.ready:
            self._discard(w)
        self.ready.clear()

    def _died(self, w: Warm) -> None:
        logger.warning("warm pool: a warm agent ended before use (exit {}): {}",
                       w.proc.returncode, tail(w.log_path) or "no output")
        self._discard(w)
        self.backoff.failed()


def hand_over(w: Warm, env: dict[str, str], cwd: str, log_path: Path) -> None:
    """Send the session to a warm agent; its output file becomes the spawn's log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    assert w.proc.stdin is not None
    w.proc.stdin.write((json.dumps({"env": env, "cwd": cwd}) + "\n").encode())
    w.proc.stdin.flush()
    w.proc.stdin.close()
    try:
        os.replace(w.log_path, log_path)
    except OSError as e:  # the agent runs either way; only its log keeps the old name
        logger.warning("warm pool: log {} not moved to {}: {}", w.log_path, log_path, e)


def can_hand_over(size: int, runtime: str, what: str) -> bool:
    """Whether a runtime that hands a session over by mounts (bwrap, docker) keeps a pool:
    a size above 0, and the power to mount (root); said in the log when that is missing."""
    if size <= 0:
        return False
    if not mountns.can_mount():
        logger.info("warm pool off for {}: handing a session to a waiting {} needs root;"
                    " every agent starts cold", runtime, what)
        return False
    return True


def mount_session(w: Warm, mounts: list, prefix: str) -> None:
    """Hand a waiting sandbox (bwrap or docker) its session's tree: build it on a private
    staging mount (`stage/t`: the first of `mounts`, the others bound into it at their
    targets below `prefix`), bind that onto the shared `stage/s` the sandbox sees as its
    `/workspace` (the kernel copies it in), make that private so undoing the staging
    cannot reach into the sandbox, then detach the staging (`unstage`)."""
    assert w.stage is not None and w.stage_fd is not None
    t = w.stage / "t"
    t.mkdir(mode=0o700)
    try:
        first, *rest = mounts
        mountns.bind(str(first.source), str(t))
        with mountns.opened(t) as base:
            for m in rest:
                mountns.bind_into(str(m.source), base, m.target[len(prefix) + 1:],
                                  readonly=not m.writable, directory=m.source.is_dir())
        mountns.mount(str(t), str(w.stage / "s"), mountns.MS_BIND | mountns.MS_REC)
        mountns.mount(None, mountns.fd_path(w.stage_fd), mountns.MS_REC | mountns.MS_PRIVATE)
    finally:
        unstage(w)


def unstage(w: Warm) -> None:
    """Detach a spare's staging mounts. Its folder stays until the sandbox ends: removing
    the folder under its `/workspace` would detach the session from it (the kernel
    unmounts whatever sits on a deleted folder, in every namespace)."""
    if w.stage_fd is not None:
        os.close(w.stage_fd)
        w.stage_fd = None
    if w.stage is not None:
        mountns.detach_all(w.stage)


def warm_log(logs_dir: Path) -> Path:
    d = logs_dir / "containers" / ".warm"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{time.time_ns()}.log"


def waits(pid: int) -> bool:
    """Whether this one process is a runner with no session yet: `python -m
    sandbox_entry` working in `/` (a warm-pool spare or a zygote; once handed a session a
    runner works in the agent's folder)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        return (os.path.basename(argv[0]).startswith(b"python") and b"sandbox_entry" in argv
                and os.readlink(f"/proc/{pid}/cwd") == "/")
    except OSError:
        return False


def is_waiting(pid: int) -> bool:
    """Whether the agent process tree at `pid` is a spare still waiting for its session
    (its runner `waits`, e.g. under a bwrap). For tools that look from outside (tests,
    the bench)."""
    return any(waits(p) for p in [pid, *children(pid)])


def agent_roots(marked: set[int]) -> list[int]:
    """Of an install's marked processes, the top process of each agent that has a
    session: a marked process whose parent is not marked and which is not waiting, or a
    child of a waiting one that is not waiting itself (an agent the zygote forked: it
    works in its agent's folder, the zygote in `/`). For tools that look from outside."""
    out = []
    for p in marked:
        parent = procfs.ppid(p)
        if parent not in marked:
            if not is_waiting(p):
                out.append(p)
        elif procfs.ppid(parent) not in marked and waits(parent) and not is_waiting(p):
            out.append(p)
    return sorted(out)

