"""A fake clock for code that takes one (`ChannelRunner`, `Containers`, `Supervisor`,
`WarmPool`): time moves only when a test moves it. It starts at the next whole second
(after what real-time code wrote; millisecond ISO stamps read back exactly)."""

from __future__ import annotations

import time


class FakeClock:
    def __init__(self, start: float | None = None) -> None:
        self.now = float(int(time.time()) + 1 if start is None else start)
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def to(self, when: float) -> float:
        """Jump to `when` (never backwards)."""
        self.now = max(self.now, when)
        return self.now

    def sleep(self, seconds: float) -> None:
        """A `time.sleep` that returns at once, having moved the clock."""
        self.slept.append(seconds)
        self.now += max(0.0, seconds)
