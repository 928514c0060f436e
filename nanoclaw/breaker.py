"""The crash-loop breaker: how long to wait before starting something that keeps dying.

Starts within a window of the previous start count up; the delay is taken from a
schedule by that count; a clean shutdown resets it. The decision is a pure function of
(kind, previous attempt, previous start, now); the host's state lives in
`data/circuit-breaker.json`, each worker's in the `workers` table.

Two kinds of worker (which one is which: `restart_kind` below, here rather than in
`nanoclaw/host/registry.py` so every layer may ask, e.g. how long the broker can be down):

- `PLATFORM`: talks to an outside platform (a Telegram, Discord, Slack … channel). The
  seed's `SCHEDULE`, starts within an hour (`WINDOW`) counting up: this is what keeps a
  crash-looping Discord adapter (or a host under `Restart=always`) from burning a
  platform's connect limit and getting the machine banned.
- `LOCAL`: touches no platform (router, delivery, sweep, containers, broker, webhooks, the
  terminal and web channels). Back within a second or two (`LOCAL_SCHEDULE`, then
  `LOCAL_CAP` s), starts within `LOCAL_WINDOW` counting up; after `LOCAL_LOOP` crashes in
  a row it is logged as crash-looping (an error), and from start `LOCAL_PAUSE_AFTER` on
  it waits `LOCAL_PAUSE` s between starts, so a broken build neither burns the CPU nor
  spins unseen. A host restart is not a crash of a local worker (`Supervisor`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

PLATFORM = "platform"
LOCAL = "local"
KINDS = (PLATFORM, LOCAL)

SCHEDULE = (0, 0, 10, 30, 120, 300, 900)  # the seed's, for PLATFORM workers and the host
WINDOW = 3600.0

LOCAL_SCHEDULE = (0, 0.5, 1, 2)  # by attempt; then LOCAL_CAP s each
LOCAL_CAP = 2.0
LOCAL_LOOP = 5                   # this many crashes in a row: logged as crash-looping
LOCAL_PAUSE_AFTER = 30           # from this attempt on, LOCAL_PAUSE s between starts
LOCAL_PAUSE = 60.0
LOCAL_WINDOW = 2 * LOCAL_PAUSE   # > LOCAL_PAUSE, so a paced loop keeps its count

# The workers that touch no platform, by the names `nanoclaw/host/registry.py` runs
# (tests/test_breaker_kinds.py checks every name it can run is classified on purpose).
# `webhooks` is local: it only listens (a local HTTP door), it never connects out;
# `egress` too: what it connects out to is each agent's own request, no login a crash
# loop would repeat. Every
# other `channel:<name>`, and a name not known here, gets the cautious platform schedule.
LOCAL_CHANNELS = ("cli", "web")
LOCAL_WORKERS = frozenset(["router", "delivery", "sweep", "containers", "broker", "webhooks",
                           "egress",
                           *(f"channel:{c}" for c in LOCAL_CHANNELS)])


def restart_kind(name: str) -> str:
    """`LOCAL` or `PLATFORM`: which restart schedule worker `name` gets."""
    return LOCAL if name in LOCAL_WORKERS else PLATFORM


def window_for(kind: str = PLATFORM) -> float:
    return LOCAL_WINDOW if kind == LOCAL else WINDOW


def next_attempt(prev_attempt: int, prev_start: float | None, now: float,
                 kind: str = PLATFORM) -> int:
    """Attempt number of a start at `now`; a start at least the kind's window after the
    previous one (or the first ever) is attempt 1."""
    if prev_start is None or prev_attempt < 1 or now - prev_start >= window_for(kind) \
            or now < prev_start:
        return 1
    return prev_attempt + 1


def delay_for(attempt: int, kind: str = PLATFORM) -> float:
    """Seconds to wait before start number `attempt` (1 = the first: no wait)."""
    i = max(attempt, 1) - 1
    if kind == LOCAL:
        if attempt >= LOCAL_PAUSE_AFTER:
            return LOCAL_PAUSE
        return float(LOCAL_SCHEDULE[i]) if i < len(LOCAL_SCHEDULE) else LOCAL_CAP
    return float(SCHEDULE[min(i, len(SCHEDULE) - 1)])


def crash_looping(attempt: int, kind: str = PLATFORM) -> bool:
    """Whether the crash before start number `attempt` is worth an error line: a local
    worker's LOCAL_LOOP-th crash in a row and later, or a platform worker whose next start
    waits the longest step of its schedule."""
    if kind == LOCAL:
        return attempt > LOCAL_LOOP
    return attempt >= len(SCHEDULE)


@dataclass
class HostBreaker:
    """`data/circuit-breaker.json` = {attempt, timestamp}; deleted on clean shutdown.
    The host takes the seed's schedule: each start of it reconnects every platform."""

    path: Path

    def read(self) -> tuple[int, float | None]:
        try:
            data = json.loads(self.path.read_text())
            return int(data["attempt"]), float(data["timestamp"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0, None  # missing or malformed counts as a clean start

    def enter(self, now: float) -> tuple[int, float]:
        """Record a start; returns (attempt, seconds to wait before starting)."""
        prev, ts = self.read()
        attempt = next_attempt(prev, ts, now)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"attempt": attempt, "timestamp": now}))
        os.replace(tmp, self.path)
        return attempt, delay_for(attempt)

    def reset(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
