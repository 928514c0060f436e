"""Worker `broker`: the credential proxy between agents and the model API."""

from __future__ import annotations

import asyncio

from nanoclaw.broker.proxy import Broker
from nanoclaw.db.store import Store
from nanoclaw.host.runner import Worker


class BrokerWorker(Worker):
    name = "broker"
    asynchronous = True

    async def main(self, stop: asyncio.Event) -> None:
        store = Store.open(self.settings.data_dir)
        try:
            await Broker(store, self.settings).serve(stop)
        finally:
            store.close()
