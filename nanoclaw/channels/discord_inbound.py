"""Discord's inbound half (`DiscordInbound`, a mixin of `DiscordChannel`): the gateway's
message, edit and interaction events turned into the host's payload (text with our
mention spelled `@<name>`, sender, mention, the message replied to, thread), with the
attachments downloaded.

An edited message (MESSAGE_UPDATE, `on_raw_message_edit`) reaches the agent as a new
message, as Telegram's do: its text prefixed `[edited] `, `edit_of` naming the original,
and the id `edit<edited_timestamp in µs>:<message id>`, so it is neither deduplicated
against the original nor stored twice when the gateway replays the update (attachments
are not fetched again). MESSAGE_UPDATE also fires for changes that are not edits (an
embed unfurling, a pin): without an `edited_timestamp` it is ignored, and an unfurl of an
already edited message carries the same timestamp, so it is dropped as a duplicate. The
bot's and other bots' edits are ignored.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import discord

from nanoclaw.channels.base import ChannelHost
from nanoclaw.channels.discord_outbound import _first
from nanoclaw.channels.text import EDITED, attachment, decode_choice, parse_question
from nanoclaw.log import logger

MAX_DOWNLOAD = 25 << 20
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class DiscordInbound:
    """The event handlers; the connection they use (client, host, last_ok) is the channel's."""

    client: discord.Client
    host: ChannelHost
    last_ok: float

    def _where(self, channel: Any) -> tuple[str, str | None]:
        if isinstance(channel, discord.Thread):
            return f"discord:{channel.parent_id}", str(channel.id)
        return f"discord:{channel.id}", None

    async def on_message(self, m: discord.Message) -> None:
        parsed = self._parse_or_drop(m)
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
        parsed = self._parse_or_drop(m)
        if parsed is None:
            return
        pid, thread, payload = parsed
        payload.update(text=EDITED + payload["text"], edited=True, edit_of=str(m.id),
                       attachments=[])
        stamp = (m.edited_at - _EPOCH) // timedelta(microseconds=1)
        await self.host.inbound(pid, f"edit{stamp}:{m.id}", payload, thread)

    def _parse_or_drop(self, m: discord.Message) -> tuple[str, str | None, dict[str, Any]] | None:
        """`_parse`, or None (one log line) for a message discord.py built from malformed
        gateway JSON: it keeps what it could not read out (no author, a number as text)."""
        try:
            return self._parse(m)
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            logger.warning("malformed discord message {} dropped: {!r}", m.id, e)
            return None

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
            if not isinstance(a.size, int):  # the gateway's JSON said null, "3", …
                out.append(attachment(a.filename, a.content_type) | {"error": "size unknown"})
                continue
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
