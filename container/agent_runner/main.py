"""Process entry: logging, signals, and the forever loop around `PollLoop.loop_once`.

The loop polls fast while messages are flowing, so a warm turn is not spent sleeping,
and backs off after about 2 s of quiet, so an idle agent costs almost nothing. When the
host can nudge it (`nudge.py`: the sleep ends as soon as the host writes `inbound.db`),
polling is only the safety net for a lost nudge: 50 ms when busy, 1 s when idle, so
twenty busy agents do not wake 4,000 times a second. Without nudges: 5 ms, then 100 ms. Signal handlers only record; the loop notices (a signal
also ends the sleep) and exits 0. A second signal interrupts whatever is blocking (e.g. a
model call that has not started streaming).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any, Callable

from agent_runner import config as config_mod
from agent_runner.nudge import Waiter
from agent_runner.poll_loop import PollLoop, Shutdown

log = logging.getLogger("agent_runner")

FAST_S = 0.005
FAST_NUDGED_S = 0.05
SLOW_S = 0.1
SLOW_NUDGED_S = 1.0  # the host wakes us for new rows; due-time rows: SAFETY_NET_S anyway
FAST_FOR_S = 0.25
RAMP_S = 1.75
SAFETY_SLEEP_S = 1.0  # after a failed poll


def poll_interval(idle_s: float, slow: float = SLOW_S, fast: float = FAST_S) -> float:
    """`fast` while recently active, rising linearly to `slow` after ~2 s of nothing."""
    if idle_s <= FAST_FOR_S:
        return fast
    return min(slow, fast + (slow - fast) * (idle_s - FAST_FOR_S) / RAMP_S)


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:
            raise Shutdown()
        self.signum = signum


def run(loop: PollLoop, stop: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep, slow: float = SLOW_S,
        fast: float = FAST_S) -> None:
    last_active = clock()
    last_error = None
    while not stop():
        now = clock()
        try:
            if loop.loop_once(now):
                last_active = now
            last_error = None
        except Shutdown:
            break
        except Exception as exc:  # e.g. a locked or missing DB: say so once, retry slowly
            if str(exc) != last_error:
                log.exception("poll failed error=%s", exc)
                last_error = str(exc)
            sleep(SAFETY_SLEEP_S)
            continue
        sleep(poll_interval(clock() - last_active, slow, fast))


def ensure_tmpdir(session_dir: str) -> None:
    """A sandbox whose /tmp this user cannot write still needs a temp folder (the CLI
    and `tempfile` put files there): use one in the session folder."""
    if os.environ.get("TMPDIR") or os.access("/tmp", os.W_OK | os.X_OK):
        return
    path = os.path.join(session_dir, ".tmp")
    os.makedirs(path, exist_ok=True)
    os.environ["TMPDIR"] = path
    log.warning("/tmp is not writable; using TMPDIR=%s", path)


def main() -> int:
    logging.basicConfig(
        stream=sys.stderr, level=os.environ.get("NANOCLAW_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s agent_runner %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "anthropic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop.handle)
    signal.signal(signal.SIGINT, stop.handle)
    cfg = config_mod.load()
    ensure_tmpdir(cfg.session_dir)
    loop = PollLoop(cfg, stop)
    waiter = Waiter(cfg.session_dir)
    try:
        loop.initialize()
        nudged = waiter.nudged
        run(loop, stop, sleep=waiter.wait, slow=SLOW_NUDGED_S if nudged else SLOW_S,
            fast=FAST_NUDGED_S if nudged else FAST_S)
    except Shutdown:
        pass
    except Exception:
        log.exception("agent runner failed")
        return 1
    finally:
        loop.shutdown()
        waiter.close()
    if stop.signum is not None:
        log.info("exit on signal signum=%d", stop.signum)
    return 0
