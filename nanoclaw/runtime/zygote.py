"""The agent zygote: one process that imported the runner and its SDKs forks every agent.

A cold agent spends ~0.4 s starting an interpreter and importing its SDK, and each one
holds ~45 MB of its own; twenty conversations starting at once on two cores wait
seconds for twenty interpreters. The `process` runtime instead keeps one zygote
(`python -m sandbox_entry` with `NANOCLAW_ZYGOTE=1`, container/sandbox_entry.py): it
imports the runner and the providers in use once, freezes its objects for the
collector, and for each session forks a child that becomes the agent. A new agent is
ready in a few milliseconds and shares the zygote's pages copy-on-write.

The protocol is a line of JSON each way over the zygote's stdin and stdout: a request
`{"env", "cwd", "log"}` is answered `{"pid": N}`, and an ended child is reported
`{"exit": N, "code": C}` (the zygote is its parent and reaps it), so the containers
worker keeps each agent's real exit code. The zygote's own output goes to its log.

Failure never blocks a start: a zygote that is not up, does not answer within
`FORK_TIMEOUT_S`, or ended, makes the runtime start that agent cold, and the zygote is
started again with the warm pool's backoff (1 s doubling to 5 min). A child outlives its
zygote (its own process session); the zygote ends with its pipe, so with its worker and
with the host, and the next worker adopts its children through `sessions.container_id`
like any agent that outlived its worker (their exit codes then come from /proc: -1).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Callable

from nanoclaw.log import logger
from nanoclaw.runtime.warm import Backoff, tail

FORK_TIMEOUT_S = 10.0   # the first request may wait for the zygote's own preload


class ZygoteGone(Exception):
    """The zygote cannot serve this request (not started, ended, or silent)."""


class Zygote:
    """One zygote process and what it said about its children."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd="/", env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=out,
                                         start_new_session=True, close_fds=True)
        assert self.proc.stdout is not None
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._out, False)
        self._buf = b""
        self.exits: dict[int, int] = {}   # child pid → exit code, until asked for
        self.children: set[int] = set()   # forked and not yet reported ended
        self.unwanted: set[int] = set()   # stopped by the host: its exit is not asked for

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fork(self, env: dict[str, str], cwd: str, log: Path) -> int:
        """A new agent process for one session; its pid."""
        if not self.alive():
            raise ZygoteGone(f"the zygote ended (exit {self.proc.returncode})")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"env": env, "cwd": cwd, "log": str(log)})
                                   + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:
            raise ZygoteGone(f"the zygote does not listen: {e}") from e
        deadline = time.monotonic() + FORK_TIMEOUT_S
        while True:
            for msg in self._messages():
                if "pid" in msg:
                    pid = int(msg["pid"])
                    self.children.add(pid)
                    self.exits.pop(pid, None)
                    self.unwanted.discard(pid)
                    return pid
            left = deadline - time.monotonic()
            if left <= 0 or not self.alive():
                self.stop()
                raise ZygoteGone("the zygote did not answer a fork request")
            select.select([self._out], [], [], min(left, 0.5))

    def poll(self) -> None:
        """Take in what the zygote said (ended children) without waiting (asked once per
        running agent at every pass of the containers worker: a `select`, not a read
        that fails, when there is nothing)."""
        if self._out >= 0 and select.select([self._out], [], [], 0)[0]:
            self._messages()

    def unwant(self, pid: int) -> None:
        """The host stops this child itself and will not ask how it ended."""
        self.poll()
        if self.exits.pop(pid, None) is None and pid in self.children:
            self.unwanted.add(pid)

    def _messages(self) -> list[dict]:
        if self._out < 0:
            return []
        try:
            while True:
                data = os.read(self._out, 65536)
                if not data:
                    break
                self._buf += data
        except BlockingIOError:
            pass
        except OSError:
            return []
        out = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                if "exit" in msg:  # kept also when seen while waiting for a pid
                    pid = int(msg["exit"])
                    self.children.discard(pid)
                    if pid in self.unwanted:
                        self.unwanted.discard(pid)
                    else:
                        self.exits[pid] = int(msg["code"])
                else:
                    out.append(msg)
        return out

    def stop(self) -> None:
        """Close its pipe (it exits; its children live on), kill it if it lingers."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.poll()  # the last exits it reported
            self._out = -1
            self.proc.stdout.close()


class ZygoteKeeper:
    """Keeps one zygote up: starts it, restarts it with backoff when it ends."""

    def __init__(self, start: Callable[[], Zygote], clock: Callable[[], float] = time.monotonic):
        self._start = start
        self.zygote: Zygote | None = None
        self.backoff = Backoff(clock)

    def get(self) -> Zygote | None:
        z = self.zygote
        return z if z is not None and z.alive() else None

    def maintain(self) -> bool:
        """Start the zygote when there is none (after the backoff); take in its news."""
        z = self.zygote
        if z is not None:
            z.poll()
            if z.alive():
                return False
            self._lost(z, f"the zygote ended (exit {z.proc.returncode}): "
                          f"{tail(z.log_path) or 'no output'}")
        if not self.backoff.due():
            return False
        try:
            self.zygote = self._start()
        except Exception as e:
            logger.error("zygote: cannot start: {}", e)
            self.backoff.failed()
            return False
        return True

    def served(self) -> None:
        self.backoff.succeeded()

    def failed(self, why: str) -> None:
        """A request failed: give up this zygote, start another after the backoff."""
        if self.zygote is not None:
            self._lost(self.zygote, why)

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.stop()
            self.zygote = None

    def _lost(self, z: Zygote, why: str) -> None:
        logger.warning("zygote: {}; agents start cold until it is back", why)
        z.stop()  # also when it ended: its pipes are closed, after its last exits are read
        self.zygote = None
        self.backoff.failed()
