"""Worker `webhooks`: the one HTTP door platforms call (`nanoclaw.channels.webhook`)."""

from __future__ import annotations

import asyncio

from nanoclaw.channels import WEBHOOKS, webhook_names
from nanoclaw.channels.webhook import Door, load_all
from nanoclaw.db.store import Store
from nanoclaw.host.runner import Worker


class WebhooksWorker(Worker):
    name = "webhooks"
    asynchronous = True

    async def main(self, stop: asyncio.Event) -> None:
        store = Store.open(self.settings.data_dir)
        try:
            hooks = load_all({n: WEBHOOKS[n] for n in webhook_names(self.settings)},
                             self.settings, store)
            await Door(store, self.settings, hooks).serve(stop)
        finally:
            store.close()
