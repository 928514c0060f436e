"""Worker `delivery`: agent output (session `outbound.db`) → central `channel_outbox`,
and channel results → the session's `delivered`."""

from __future__ import annotations

from nanoclaw.delivery import Delivery
from nanoclaw.store import Store
from nanoclaw.worker import Worker


class DeliveryWorker(Worker):
    name = "delivery"
    nudge_mode = 0o666  # agents nudge it through `.nudge-host.sock` in their session folder,
    # as whatever uid their sandbox gives them

    def initialize(self) -> None:
        self.store = Store.open(self.settings.data_dir)
        self.delivery = Delivery(self.store, self.settings)

    def loop_once(self, now: float) -> bool:
        return self.delivery.pass_once(now)

    def shutdown(self) -> None:
        self.store.close()
