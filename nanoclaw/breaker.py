"""The crash-loop breaker: how long to wait before starting something that keeps dying.

Starts within an hour of the previous start count up; the delay is taken from a fixed
schedule by that count; a clean shutdown resets it. The decision is a pure function of
(previous attempt, previous start, now); the host's state lives in
`data/circuit-breaker.json`, each worker's in the `workers` table. This is what keeps a
crash-looping Discord adapter (or a host under `Restart=always`) from burning a
platform's connect limit and getting the machine banned.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SCHEDULE = (0, 0, 10, 30, 120, 300, 900)
WINDOW = 3600.0


def next_attempt(prev_attempt: int, prev_start: float | None, now: float) -> int:
    """Attempt number of a start at `now`; a start more than WINDOW after the previous
    one (or the first ever) is attempt 1."""
    if prev_start is None or prev_attempt < 1 or now - prev_start >= WINDOW or now < prev_start:
        return 1
    return prev_attempt + 1


def delay_for(attempt: int) -> float:
    return float(SCHEDULE[min(max(attempt, 1) - 1, len(SCHEDULE) - 1)])


@dataclass
class HostBreaker:
    """`data/circuit-breaker.json` = {attempt, timestamp}; deleted on clean shutdown."""

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
