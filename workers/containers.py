"""Worker `containers`: the only starter and stopper of agents."""

from __future__ import annotations

from nanoclaw import runtime
from nanoclaw.db.store import Store
from nanoclaw.errors import ConfigError
from nanoclaw.host.runner import Worker
from nanoclaw.lifecycle.containers import Containers


class ContainersWorker(Worker):
    name = "containers"

    def initialize(self) -> None:
        self.store = Store.open(self.settings.data_dir)
        try:
            rt = runtime.select(self.settings.runtime, self.settings)
        except ValueError as e:
            raise ConfigError(f"NANOCLAW_RUNTIME: {e}") from None
        self.containers = Containers(self.store, self.settings, rt)
        self.containers.adopt()

    def loop_once(self, now: float) -> bool:
        return self.containers.pass_once(now)

    def shutdown(self) -> None:
        self.containers.stop_all()
        self.store.close()
