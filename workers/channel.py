"""Worker `channel:<name>`: one platform connection, run by the generic channel runner."""

from __future__ import annotations

import asyncio

from nanoclaw.channels import load_builtin
from nanoclaw.channels.runner import ChannelRunner
from nanoclaw.store import Store
from nanoclaw.worker import Worker


class ChannelWorker(Worker):
    asynchronous = True

    async def main(self, stop: asyncio.Event) -> None:
        channel_type = self.name.split(":", 1)[1]
        store = Store.open(self.settings.data_dir)
        runner = ChannelRunner(store, self.settings, channel_type)
        adapter = load_builtin().get(channel_type)(self.settings, runner)
        try:
            await runner.run(adapter, stop)
        finally:
            store.close()
