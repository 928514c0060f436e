"""The worker contract and the one runner that owns every worker's loop.

A worker is a class with `initialize()`, `loop_once(now) -> bool` (one unit of work;
True when it did something) and `shutdown()`; or, for workers built on asyncio (channels,
the broker), `async main(stop)`. The runner owns the stop flag, the adaptive poll
interval, signal handling (handlers only record) and crash logging, and turns the
outcome into an exit code the orchestrator understands.

Between passes a worker sleeps on its nudge socket (`nanoclaw.nudge`): writers wake it at
once, so while idle it polls only every `poll_idle` seconds; without a socket it falls
back to backing off to `poll_max`.

Each worker also proves it is alive: the runner touches the mtime of
`data/run/heartbeat/<name>`, a file the worker creates itself, at least every
`NANOCLAW_WORKER_HUNG_AFTER`/10 seconds: every pass (throttled) and through its sleeps
(capped at that interval); an asynchronous worker has a small task for it, so a blocked
event loop stops beating too. One `utime` on an open fd, no DB write (gunicorn's
workertmp). The supervisor kills a worker whose file goes quiet (`nanoclaw.host.supervisor`).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from nanoclaw import nudge
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError, DiskFull, disk_full
from nanoclaw.log import logger
from nanoclaw.util import unlink_if_ours

# Exit codes: the orchestrator's vocabulary.
EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 78  # bad configuration: not restarted until asked (EX_CONFIG)
FULL_WAIT = 1.0   # seconds between passes while the disk is full


class Worker:
    name = "worker"
    asynchronous = False
    nudged = True          # binds data/run/nudge/<name>.sock: writers wake it at once
    nudge_mode = 0o600     # the socket file's mode (delivery's is reachable from sandboxes)

    def __init__(self, settings: Settings, name: str | None = None):
        self.settings = settings
        if name:
            self.name = name

    def initialize(self) -> None:
        pass

    def loop_once(self, now: float) -> bool | float:
        """One unit of work: True if it did something (poll again soon), False if not,
        or a float: seconds until it next has anything to do (sleep up to that)."""
        return False

    def shutdown(self) -> None:
        pass

    async def main(self, stop: asyncio.Event) -> None:  # for asynchronous workers
        raise NotImplementedError


def heartbeat_path(where: Any, name: str) -> Path:
    """`data/run/heartbeat/<name>` of a Settings object or a data directory."""
    return Path(getattr(where, "data_dir", where)) / "run" / "heartbeat" / name


def last_beat(where: Any, name: str) -> float | None:
    """When worker `name` last beat (its file's mtime), or None: no file yet."""
    try:
        return os.stat(heartbeat_path(where, name)).st_mtime
    except OSError:
        return None


class Heartbeat:
    """A worker's proof of life: the mtime of a file it created, touched through its fd.
    `every`: the longest gap between beats of a healthy worker outside a pass."""

    def __init__(self, settings: Settings, name: str):
        self.path = heartbeat_path(settings, name)
        self.every = settings.worker_hung_after / 10
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:  # a predecessor's file: ours is a new one (the supervisor ignores older beats)
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)  # creating it is the first beat
        self.ino = os.fstat(self.fd).st_ino
        self.last = time.time()

    def beat(self, now: float) -> None:
        """Touch the file, at most twice per `every` (a busy loop passes every few ms)."""
        if now - self.last >= self.every / 2:
            self.touch(now)

    def touch(self, now: float) -> None:
        os.utime(self.fd)  # the kernel's clock: one syscall
        self.last = now

    async def beating(self) -> None:
        """For an asynchronous worker: beats while its event loop turns."""
        while True:
            self.touch(time.time())
            await asyncio.sleep(self.every)

    def close(self) -> None:
        """Close, and remove the file unless a newer worker has made its own since."""
        unlink_if_ours(self.path, self.ino)
        os.close(self.fd)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the orchestrator dies (no orphaned workers)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def set_process_name(name: str) -> None:
    """Name the process for `ps`/`top` (the kernel keeps 15 characters)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(15, name.encode()[:15] + b"\0", 0, 0, 0)  # PR_SET_NAME
    except OSError:
        pass


def run(worker: Worker) -> int:
    """Run a worker until SIGTERM/SIGINT; returns its exit code."""
    stop = {"flag": False}

    def _stop(signum: int, _frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        heart = Heartbeat(worker.settings, worker.name)
        try:
            if worker.asynchronous:
                return _run_async(worker, stop, heart)
            _run_sync(worker, stop, heart)
        finally:
            heart.close()
        logger.info("worker stopped")
        return EXIT_OK
    except ConfigError as e:
        logger.error("worker cannot run: {}", e)
        return EXIT_CONFIG
    except Exception:
        logger.error("worker crashed:\n{}", traceback.format_exc())
        return EXIT_CRASH


def _run_sync(worker: Worker, stop: dict, heart: Heartbeat) -> None:
    s = worker.settings
    listener = nudge.listen(s, worker.name, worker.nudge_mode) if worker.nudged else None
    waiter = nudge.Waiter(listener)
    try:
        worker.initialize()
        logger.info("worker started (pid {})", os.getpid())
        poll = nudge.Poller.for_settings(s, listener is not None)
        try:
            full = False
            while not stop["flag"]:
                now = time.time()
                heart.beat(now)
                try:
                    did = worker.loop_once(now)
                except Exception as e:
                    if not disk_full(e):
                        raise
                    full = _disk_full(e, full)
                    did = FULL_WAIT
                else:
                    full = _disk_full(None, full)
                # float: seconds to its next due time; a sleep beats at least every `every`
                wait = did if isinstance(did, float) else poll.next(did, now)
                waiter.wait(min(wait, heart.every))
        finally:
            worker.shutdown()
    finally:
        waiter.close()


def _disk_full(e: BaseException | None, was: bool) -> bool:
    """Say once that the disk is full and this worker waits for space (a pass that
    cannot write is tried again every FULL_WAIT s: nothing crashes, nothing restarts),
    and once that it carries on. Returns whether it is full now."""
    if e is not None and not was:
        logger.error("{}; waiting for space ({}: {})", DiskFull("data/"), type(e).__name__, e)
    elif e is None and was:
        logger.warning("space again on data/: carrying on")
    return e is not None


def _run_async(worker: Worker, stop_flag: dict, heart: Heartbeat) -> int:
    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if stop_flag["flag"]:
            stop.set()
        logger.info("worker started (pid {})", os.getpid())
        beating = asyncio.create_task(heart.beating())
        try:
            await worker.main(stop)
        finally:
            beating.cancel()

    asyncio.run(_main())
    logger.info("worker stopped")
    return EXIT_OK
