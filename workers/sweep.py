"""Worker `sweep`: time — due rows, stuck and idle agents, ack sync; and once an hour
the logs' retention (`nanoclaw/logfiles.py`)."""

from __future__ import annotations

import time

from nanoclaw import logfiles
from nanoclaw.db.store import Store
from nanoclaw.host.runner import Worker
from nanoclaw.lifecycle.sweep import Sweep
from nanoclaw.log import logger

TIDY_EVERY_S = 3600.0


class SweepWorker(Worker):
    name = "sweep"
    nudged = False  # time-driven: it sleeps to its next pass (a signal still wakes it)

    def initialize(self) -> None:
        self.store = Store.open(self.settings.data_dir)
        self.sweep = Sweep(self.store, self.settings)
        self.next_pass = 0.0
        self.next_tidy = 0.0

    def loop_once(self, now: float) -> float:
        if now >= self.next_pass:
            self.sweep.pass_once(now)
            self.next_pass = now + self.settings.sweep_interval
        if now >= self.next_tidy:
            self.next_tidy = now + TIDY_EVERY_S
            try:
                for line in logfiles.tidy_settings(self.settings, now):
                    logger.info("logs: {}", line)
            except OSError as e:
                logger.warning("logs: tidying failed: {}", e)
        return max(0.0, self.next_pass - time.time())

    def shutdown(self) -> None:
        self.store.close()
