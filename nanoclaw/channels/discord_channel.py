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

An edited message (MESSAGE_UPDATE, `on_raw_message_edit`) reaches the agent as a new
message, as Telegram's do: its text prefixed `[edited] `, `edit_of` naming the original,
and the id `edit<edited_timestamp in µs>:<message id>`, so it is neither deduplicated
against the original nor stored twice when the gateway replays the update (attachments
are not fetched again). MESSAGE_UPDATE also fires for changes that are not edits (an
embed unfurling, a pin): without an `edited_timestamp` it is ignored, and an unfurl of an
already edited message carries the same timestamp, so it is dropped as a duplicate. The
bot's and other bots' edits are ignored.

platform_id `discord:<channel id>` (a thread's parent); thread_id the thread's id.
Discord renders Markdown itself: agent text passes through, split at 2000 characters
without leaving a fenced code block open across messages (`markdown.discord_markdown`).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Any

import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from nanoclaw.channels.base import (
    Channel,
    ChannelDead,
    OutboundMessage,
    RetryAfter,
    SendError,
    Unavailable,
)
from nanoclaw.channels.markdown import discord_markdown
from nanoclaw.channels.text import (
    EDITED,
    attachment,
    card_links,
    decode_choice,
    encode_choice,
    load_files,
    parse_question,
    plain_text,
    reply_target,
)
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

LIMIT = 2000
WINDOW = 600.0           # seconds over which in-process reconnects are counted
READY_TIMEOUT = 30.0
MAX_DOWNLOAD = 25 << 20
_PATCHED = False
_DEAD = {"flag": False}  # one adapter per worker process: once dead, never IDENTIFY again
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


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


class DiscordChannel(Channel):
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
        self.parts: dict[str, list[int]] = {}
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

    # ---- inbound ----------------------------------------------------------------------
    def _where(self, channel: Any) -> tuple[str, str | None]:
        if isinstance(channel, discord.Thread):
            return f"discord:{channel.parent_id}", str(channel.id)
        return f"discord:{channel.id}", None

    async def on_message(self, m: discord.Message) -> None:
        parsed = self._parse(m)
        if parsed is None:
            return
        pid, thread, payload = parsed
        payload["attachments"] = await self._download(m)
        await self.host.inbound(pid, str(m.id), payload, thread)

    async def on_raw_message_edit(self, ev: discord.RawMessageUpdateEvent) -> None:
        """MESSAGE_UPDATE: a new message for the agent if the author edited it (see the
        module docstring); unique per edit, stable when the gateway replays it."""
        m, data = ev.message, ev.data
        if not data.get("edited_timestamp") or "content" not in data or m.edited_at is None:
            return  # an embed unfurling, a pin, a partial update: not an edit
        if ev.cached_message is not None and ev.cached_message.content == m.content:
            return
        parsed = self._parse(m)
        if parsed is None:
            return
        pid, thread, payload = parsed
        payload.update(text=EDITED + payload["text"], edited=True, edit_of=str(m.id),
                       attachments=[])
        stamp = (m.edited_at - _EPOCH) // timedelta(microseconds=1)
        await self.host.inbound(pid, f"edit{stamp}:{m.id}", payload, thread)

    def _parse(self, m: discord.Message) -> tuple[str, str | None, dict[str, Any]] | None:
        """A user's message as (platform id, thread, payload without attachments); None
        for bots (us included) and for system messages (joins, pins, …)."""
        me = self.client.user
        if m.author.bot or (me and m.author.id == me.id):
            return None
        if m.type not in (discord.MessageType.default, discord.MessageType.reply):
            return None
        self.last_ok = time.monotonic()
        pid, thread = self._where(m.channel)
        dm = isinstance(m.channel, discord.DMChannel)
        ref = m.reference.resolved if m.reference else None
        reply_to = None
        if isinstance(ref, discord.Message):
            reply_to = {"id": str(ref.id), "text": ref.content, "sender": ref.author.display_name}
        text = m.content
        if me:
            text = text.replace(f"<@{me.id}>", f"@{me.name}").replace(f"<@!{me.id}>", f"@{me.name}")
        payload: dict[str, Any] = {
            "text": text, "sender_id": str(m.author.id), "sender_name": m.author.display_name,
            "is_mention": dm or bool(me and me.mentioned_in(m)) or bool(
                isinstance(ref, discord.Message) and me and ref.author.id == me.id),
            "is_group": not dm,
        }
        if reply_to:
            payload["reply_to"] = reply_to
        return pid, thread, payload

    async def _download(self, m: discord.Message) -> list[dict[str, Any]]:
        out = []
        for a in m.attachments:
            if a.size > MAX_DOWNLOAD:
                out.append(attachment(a.filename, a.content_type) | {"error": "too large"})
                continue
            try:
                out.append(attachment(a.filename, a.content_type,
                                      await asyncio.wait_for(a.read(), 60)))
            except Exception as e:
                logger.warning("discord attachment {} not downloaded: {!r}", a.filename, e)
                out.append(attachment(a.filename, a.content_type, url=a.url)
                           | {"error": f"download failed: {e}"})
        return out

    async def on_interaction(self, ix: discord.Interaction) -> None:
        if ix.type != discord.InteractionType.component or not isinstance(ix.data, dict):
            return
        choice = decode_choice(ix.data.get("custom_id"))
        if choice is None:
            return
        qid, index = choice
        pid = f"discord:{ix.channel_id}"
        if isinstance(ix.channel, discord.Thread):
            pid = f"discord:{ix.channel.parent_id}"
        # the card sent to the channel clicked in, under the host's card id (H3)
        card = parse_question(self.host.question(qid, pid) or {})
        option = card.value(index) if card else None
        if card is None or option is None:
            logger.info("discord click on unknown card {} ignored", qid)
            await self._best_effort(ix.response.send_message("This question has expired.",
                                                             ephemeral=True))
            return
        await self.host.inbound(pid, f"ix:{ix.id}", {
            "question_id": qid, "option": option, "user_id": str(ix.user.id)}, None, kind="action")
        await self._best_effort(ix.response.edit_message(
            content=_first(f"{card.text()}\n\n✓ {card.selected_label(index)}"), view=None))

    async def _best_effort(self, coro: Any) -> None:
        try:
            await asyncio.wait_for(coro, 15)
        except Exception as e:
            logger.debug("discord best-effort call failed: {!r}", e)

    # ---- outbound ---------------------------------------------------------------------
    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        if not self.ready.is_set():
            raise Unavailable("not connected to Discord yet")
        try:
            return await self._deliver(_snowflake(thread_id) if thread_id else
                                       _snowflake(platform_id), message)
        except discord.RateLimited as e:
            raise RetryAfter(e.retry_after, str(e)) from None
        except (discord.Forbidden, discord.NotFound) as e:
            raise SendError(f"discord refused: {e}", permanent=True) from None
        except discord.HTTPException as e:
            if e.status == 429:
                raise RetryAfter(float(getattr(e, "retry_after", 5) or 5), str(e)) from None
            raise SendError(f"discord: {e}", permanent=400 <= e.status < 500) from None
        except (OSError, asyncio.TimeoutError) as e:
            raise SendError(f"discord: {type(e).__name__}: {e}") from None

    async def _deliver(self, channel_id: int, message: OutboundMessage) -> str | None:
        c = message.content
        ch = self.client.get_partial_messageable(channel_id)
        op = c.get("operation")
        if op in ("edit", "reaction"):
            msg = ch.get_partial_message(_snowflake(c.get("messageId")))
            if op == "edit":
                await msg.edit(content=_first(str(c.get("text") or "")))
            else:
                await msg.add_reaction(str(c.get("emoji") or "👍"))
            return str(msg.id)
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        view = None
        q = parse_question(c)
        if q:
            view = discord.ui.View(timeout=None)
            try:
                for i, o in enumerate(q.options):
                    view.add_item(discord.ui.Button(label=o["label"][:80],
                                                    custom_id=encode_choice(q.question_id, i),
                                                    style=discord.ButtonStyle.primary))
            except ValueError as e:
                raise SendError(str(e), permanent=True) from None
        elif c.get("type") == "card" and card_links(c):
            view = discord.ui.View(timeout=None)
            for label, url in card_links(c)[:5]:
                view.add_item(discord.ui.Button(label=label[:80], url=url))
        files = load_files(c)  # a bad file is a permanent SendError
        chunks = discord_markdown(plain_text(c), LIMIT)
        if not chunks and not files:
            raise SendError("empty message", permanent=True)
        steps: list[tuple[str | None, bool]] = [(t, False) for t in chunks] or [(None, True)]
        steps[-1] = (steps[-1][0], True)  # the last message carries buttons and files
        done = self.parts.setdefault(message.idem_key, [])
        target = reply_target(message.in_reply_to)  # an edit (`edit<n>:<id>`) answers <id>
        target = target.rsplit(":", 1)[-1] if target else None
        for i, (text, last) in enumerate(steps):
            if i < len(done):
                continue
            kwargs: dict[str, Any] = {}
            if last and view is not None:
                kwargs["view"] = view
            if last and files:
                kwargs["files"] = [discord.File(io.BytesIO(f.data), filename=f.name) for f in files]
            if i == 0 and target and target.isdigit():
                kwargs["reference"] = discord.MessageReference(
                    message_id=int(target), channel_id=channel_id, fail_if_not_exists=False)
            sent = await asyncio.wait_for(ch.send(content=text, **kwargs), 60)
            done.append(sent.id)
        self.parts.pop(message.idem_key, None)
        return str(done[0])

    async def set_typing(self, platform_id: str, thread_id: str | None) -> None:
        await self.client.http.send_typing(_snowflake(thread_id or platform_id))

    async def open_dm(self, handle: str) -> str:
        uid = _snowflake(handle)
        user = await self.client.fetch_user(uid)
        dm = await user.create_dm()
        return f"discord:{dm.id}"


def _first(text: str) -> str:
    return (discord_markdown(text, LIMIT) or ["…"])[0]


def _snowflake(v: Any) -> int:
    s = str(v or "")
    s = s.rsplit(":", 1)[-1]
    if not s.isdigit():
        raise SendError(f"not a Discord id: {v!r}", permanent=True)
    return int(s)
