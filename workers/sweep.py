"""Worker `sweep`: time — due rows, stuck and idle agents, ack sync."""

from __future__ import annotations

import time

from nanoclaw.db.store import Store
from nanoclaw.host.runner import Worker
from nanoclaw.lifecycle.sweep import Sweep


class SweepWorker(Worker):
    name = "sweep"
    nudged = False  # time-driven: it sleeps to its next pass (a signal still wakes it)

    def initialize(self) -> None:
        self.store = Store.open(self.settings.data_dir)
        self.sweep = Sweep(self.store, self.settings)
        self.next_pass = 0.0

    def loop_once(self, now: float) -> float:
        if now >= self.next_pass:
            self.sweep.pass_once(now)
            self.next_pass = now + self.settings.sweep_interval
        return max(0.0, self.next_pass - time.time())

    def shutdown(self) -> None:
        self.store.close()
