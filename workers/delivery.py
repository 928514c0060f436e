"""Worker `delivery`: agent output (session `outbound.db`) → central `channel_outbox`,
and channel results → the session's `delivered`."""

from __future__ import annotations

# Installs the agent's `ncl` action "cli" in the process that runs actions: the action
# registry (`delivery.actions`) sits above the command line it serves.
from nanoclaw.cli import agent as agent_cli  # noqa: F401
from nanoclaw.db import sessionfile
from nanoclaw.db.store import Store
from nanoclaw.delivery.delivery import Delivery
from nanoclaw.host.runner import Worker

KEPT = 32  # session DB connections kept open (sessionfile.keep_connections)


class DeliveryWorker(Worker):
    name = "delivery"
    nudge_mode = 0o666  # agents nudge it through `.nudge-host.sock` in their session folder,
    # as whatever uid their sandbox gives them

    def initialize(self) -> None:
        sessionfile.keep_connections(KEPT)  # on every message's path
        self.store = Store.open(self.settings.data_dir)
        self.delivery = Delivery(self.store, self.settings)

    def loop_once(self, now: float) -> bool:
        return self.delivery.pass_once(now)

    def shutdown(self) -> None:
        self.store.close()
