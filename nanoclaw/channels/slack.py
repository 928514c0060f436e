"""Slack, with slack-sdk: Socket Mode (aiohttp) for events, the async Web API client for
sends; `SLACK_API_BASE` configurable. Needs `SLACK_BOT_TOKEN` (xoxb-) and
`SLACK_APP_TOKEN` (xapp-, for Socket Mode).

An envelope is acknowledged only after its event is stored, so Slack redelivers what a
crash interrupted (the inbound idempotency key drops the duplicate). slack-sdk pings
the socket and reconnects by itself; on top of that we call `auth.test` every
`channel_ping` seconds and exit non-zero (restart under the breaker) when the socket or
the API has been down for `channel_liveness` seconds. A rejected token is configuration.

platform_id `slack:<channel id>`; thread_id a thread's root `ts`; message ids are `ts`.
The inbound half (events, edits, clicks, files) is `slack_inbound.py`; the outbound
half (sends as mrkdwn, edits, reactions) is `slack_outbound.py`.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.web.async_client import AsyncWebClient

from nanoclaw.channels.base import Channel
from nanoclaw.channels.slack_inbound import SlackInbound
from nanoclaw.channels.slack_outbound import BLOCK_LIMIT, FATAL, LIMIT, SlackOutbound
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

__all__ = ["BLOCK_LIMIT", "LIMIT", "SlackChannel"]  # the limits, as delivery/actions.py cites them


class SlackChannel(SlackInbound, SlackOutbound, Channel):
    name = "slack"
    supports_threads = True

    @classmethod
    def enabled(cls, settings) -> bool:
        return bool(settings.slack_bot_token and settings.slack_app_token)

    # ---- connection -------------------------------------------------------------------
    async def setup(self) -> None:
        s = self.settings
        base = s.slack_api_base if s.slack_api_base.endswith("/") else s.slack_api_base + "/"
        self.web = AsyncWebClient(token=s.slack_bot_token, base_url=base, timeout=30)
        try:
            me = await asyncio.wait_for(self.web.auth_test(), 30)
        except SlackApiError as e:
            if e.response.get("error") in FATAL:
                raise ConfigError(f"SLACK_BOT_TOKEN was rejected: {e.response['error']}") from None
            raise
        self.bot_user = str(me.get("user_id") or "")
        self.bot_id = str(me.get("bot_id") or "")
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self.socket = SocketModeClient(
            app_token=s.slack_app_token,
            web_client=AsyncWebClient(token=s.slack_bot_token, base_url=base, timeout=30),
            auto_reconnect_enabled=True, ping_interval=min(10.0, s.channel_ping))
        self.socket.socket_mode_request_listeners.append(self._request)
        try:
            await asyncio.wait_for(self.socket.connect(), 30)
        except SlackApiError as e:
            if e.response.get("error") in FATAL:
                raise ConfigError(f"SLACK_APP_TOKEN was rejected: {e.response['error']}") from None
            raise
        self.last_ok = time.monotonic()
        self.watchdog = asyncio.create_task(self._watch())
        logger.info("slack connected as <@{}> (Socket Mode)", self.bot_user)

    async def teardown(self) -> None:
        if getattr(self, "watchdog", None):
            self.watchdog.cancel()
        if getattr(self, "socket", None):
            await self.socket.close()
        if getattr(self, "http", None):
            await self.http.close()

    def is_connected(self) -> bool:
        return time.monotonic() - self.last_ok < self.settings.channel_liveness

    async def _watch(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.channel_ping)
            try:
                ok = await self.socket.is_connected()
                await asyncio.wait_for(self.web.auth_test(), 15)
                if ok:
                    self.last_ok = time.monotonic()
                else:
                    logger.warning("slack socket is not connected; slack-sdk is reconnecting")
            except SlackApiError as e:
                if e.response.get("error") in FATAL:
                    self.die(f"the token was rejected: {e.response['error']}")
                    return
                logger.warning("slack liveness check failed: {}", e.response.get("error"))
            except Exception as e:
                logger.warning("slack liveness check failed: {!r}", e)
            idle = time.monotonic() - self.last_ok
            if idle > s.channel_liveness:
                self.die(f"no working slack connection for {idle:.0f}s")
                return
