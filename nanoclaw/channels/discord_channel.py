"""Discord, with discord.py (gateway websocket + REST; `DISCORD_API_BASE` and
`DISCORD_GATEWAY_URL` configurable). Named `discord_channel` so it does not shadow the
library.

Liveness, in three parts (DESIGN §6):
- discord.py reconnects and resumes *inside the process*, at once and without limit,
  after most closes. We count those reconnects; more than `discord_reconnects` in 10
  minutes and the worker exits non-zero, so the crash-loop breaker paces further
  IDENTIFYs instead of a flapping gateway being hammered.
- A heartbeat that is not ACKed within `discord_heartbeat_timeout` means a zombie
  connection: we close it (4000) and discord.py RESUMEs, so the gateway replays what
  we missed and no message is lost.
- A cheap REST call every `channel_ping` seconds; no success for `channel_liveness`
  seconds (or not READY for that long) and the worker exits non-zero.
A rejected token is a configuration error (not restart-looped). Garbage from the gateway
(bad JSON, a parser that chokes on a field) is logged and dropped, never fatal.

platform_id `discord:<channel id>` (a thread's parent); thread_id the thread's id. The
inbound half (messages, edits, clicks, attachments) is `discord_inbound.py`; the
outbound half (sends, edits, reactions; Markdown split at 2000 characters) is
`discord_outbound.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from nanoclaw.channels.base import Channel, ChannelDead
from nanoclaw.channels.discord_inbound import DiscordInbound
from nanoclaw.channels.discord_outbound import LIMIT, DiscordOutbound
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

WINDOW = 600.0           # seconds over which in-process reconnects are counted
READY_TIMEOUT = 30.0
_PATCHED = False
_DEAD = {"flag": False}  # one adapter per worker process: once dead, never IDENTIFY again

__all__ = ["LIMIT", "DiscordChannel"]  # the limit, as delivery/actions.py cites it


def _harden() -> None:
    """Make discord.py drop undecodable gateway frames instead of dying on them, and
    never IDENTIFY once this process has decided to exit."""
    global _PATCHED
    if _PATCHED:
        return
    original = DiscordWebSocket.received_message

    async def received_message(self: DiscordWebSocket, msg: Any, /) -> None:
        try:
            await original(self, msg)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            logger.warning("malformed discord gateway frame dropped: {!r}", e)

    DiscordWebSocket.received_message = received_message  # type: ignore[method-assign]
    original_identify = DiscordWebSocket.identify

    async def identify(self: DiscordWebSocket) -> None:
        if _DEAD["flag"]:  # a reconnect racing our exit must not spend an IDENTIFY
            await self.close(code=1000)
            return
        await original_identify(self)

    DiscordWebSocket.identify = identify  # type: ignore[method-assign]
    _PATCHED = True


def _safe(name: str, parser: Any) -> Any:
    def parse(data: Any) -> None:
        try:
            parser(data)
        except Exception as e:  # one bad event must not take the connection down
            logger.warning("malformed discord {} event dropped: {!r}", name, e)
    return parse


class DiscordChannel(DiscordInbound, DiscordOutbound, Channel):
    name = "discord"
    supports_threads = True

    @classmethod
    def enabled(cls, settings) -> bool:
        return bool(settings.discord_bot_token)

    # ---- connection -------------------------------------------------------------------
    async def setup(self) -> None:
        s = self.settings
        Route.BASE = s.discord_api_base.rstrip("/")
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(s.discord_gateway_url)
        _harden()
        intents = discord.Intents.default()
        intents.message_content = True
        self.client = discord.Client(intents=intents, heartbeat_timeout=s.discord_heartbeat_timeout,
                                     max_ratelimit_timeout=30.0, chunk_guilds_at_startup=False,
                                     max_messages=None)
        parsers = self.client._connection.parsers
        for k, f in list(parsers.items()):
            parsers[k] = _safe(k, f)
        self.reconnects: deque[float] = deque()
        self.ready = asyncio.Event()
        self.gone = asyncio.Event()
        self.last_ok = time.monotonic()
        c = self.client
        c.event(self.on_ready)
        c.event(self.on_resumed)
        c.event(self.on_disconnect)
        c.event(self.on_message)
        c.event(self.on_raw_message_edit)
        c.event(self.on_interaction)
        try:
            await asyncio.wait_for(c.login(s.discord_bot_token), READY_TIMEOUT)  # GET /users/@me
        except discord.LoginFailure as e:
            raise ConfigError(f"DISCORD_BOT_TOKEN was rejected: {e}") from None
        self.gateway = asyncio.create_task(c.connect(reconnect=True))
        self.gateway.add_done_callback(self._gateway_done)
        waiters = {asyncio.create_task(self.ready.wait()), asyncio.create_task(self.gone.wait())}
        await asyncio.wait(waiters | {self.gateway}, timeout=READY_TIMEOUT,
                           return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if not self.ready.is_set() or self.dead:
            raise ChannelDead(self.dead or f"no READY from the gateway in {READY_TIMEOUT:.0f}s")
        self.watchdog = asyncio.create_task(self._watch())

    async def teardown(self) -> None:
        for name in ("watchdog", "gateway"):
            t = getattr(self, name, None)
            if t:
                t.cancel()
        if hasattr(self, "client"):
            await self.client.close()

    def is_connected(self) -> bool:
        return self.ready.is_set() and not self.client.is_closed()

    def die(self, reason: str) -> None:
        """Stop discord.py from reconnecting at once, then let the worker exit."""
        super().die(reason)
        _DEAD["flag"] = True
        self.gone.set()
        if not self.client.is_closed():
            asyncio.get_running_loop().create_task(self.client.close())

    def _gateway_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        e = task.exception()
        if isinstance(e, discord.ConnectionClosed) and e.code == 4004:
            self.die("the gateway rejected the token (4004)")
        else:
            self.die(f"gateway connection ended: {e!r}" if e else "gateway connection closed")

    async def on_ready(self) -> None:
        self.ready.set()
        self.last_ok = time.monotonic()
        logger.info("discord connected as {} (id {})", self.client.user, self.client.user.id)

    async def on_resumed(self) -> None:
        logger.info("discord gateway session resumed")

    async def on_disconnect(self) -> None:
        now = time.monotonic()
        self.reconnects.append(now)
        while self.reconnects and now - self.reconnects[0] > WINDOW:
            self.reconnects.popleft()
        n = len(self.reconnects)
        if n > self.settings.discord_reconnects:
            self.die(f"gateway dropped {n} times in {WINDOW / 60:.0f} minutes")
        else:
            logger.warning("discord gateway disconnected ({} in {:.0f} min); discord.py"
                           " reconnects", n, WINDOW / 60)

    async def _watch(self) -> None:
        """Zombie heartbeats and REST liveness (see the module docstring)."""
        s = self.settings
        next_ping = time.monotonic() + s.channel_ping
        while True:
            await asyncio.sleep(min(1.0, s.discord_heartbeat_timeout / 4))
            ws = self.client.ws
            ka = getattr(ws, "_keep_alive", None)
            now = time.perf_counter()
            if ka is not None and ka._last_send > ka._last_ack and \
                    now - ka._last_send > s.discord_heartbeat_timeout:
                logger.warning("discord gateway stopped ACKing heartbeats; reconnecting")
                ka._last_ack = now  # one close per zombie
                await ws.close(4000)
            if time.monotonic() >= next_ping:
                next_ping = time.monotonic() + s.channel_ping
                try:
                    await asyncio.wait_for(self.client.http.request(Route("GET", "/users/@me")),
                                           15)
                    if self.client.is_ready():
                        self.last_ok = time.monotonic()
                except Exception as e:
                    logger.warning("discord liveness check failed: {!r}", e)
            idle = time.monotonic() - self.last_ok
            if idle > s.channel_liveness:
                self.die(f"no successful discord round trip for {idle:.0f}s")
                return
