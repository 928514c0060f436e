"""Worker `channel:<name>`: one platform connection, run by the generic channel runner."""

from __future__ import annotations

import asyncio

from nanoclaw.channels import load_builtin
from nanoclaw.channels.base import ChannelDead
from nanoclaw.channels.runner import ChannelRunner
from nanoclaw.db.store import Store
from nanoclaw.host.runner import EXIT_CRASH, Worker
from nanoclaw.log import logger


class ChannelWorker(Worker):
    asynchronous = True

    async def main(self, stop: asyncio.Event) -> None:
        channel_type = self.name.split(":", 1)[1]
        store = Store.open(self.settings.data_dir)
        runner = ChannelRunner(store, self.settings, channel_type)
        adapter = load_builtin().get(channel_type)(self.settings, runner)
        try:
            await runner.run(adapter, stop)
        except ChannelDead as e:  # exit non-zero: restarted under the crash-loop breaker
            logger.error("channel {} is dead: {}; exiting for a restart", channel_type, e)
            raise SystemExit(EXIT_CRASH) from None
        finally:
            store.close()
