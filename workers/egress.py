"""Worker `egress`: the door agents use the web through (`nanoclaw.broker.egress`)."""

from __future__ import annotations

import asyncio

from nanoclaw.broker.egress import Door
from nanoclaw.db.store import Store
from nanoclaw.host.runner import Worker


class EgressWorker(Worker):
    name = "egress"
    asynchronous = True

    async def main(self, stop: asyncio.Event) -> None:
        store = Store.open(self.settings.data_dir)
        try:
            await Door(store, self.settings).serve(stop)
        finally:
            store.close()
