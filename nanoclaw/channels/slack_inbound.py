"""Slack's inbound half (`SlackInbound`, a mixin of `SlackChannel`): Socket Mode envelopes
(message events and button clicks) turned into the host's payload (text with our mention
spelled `@bot`, sender and display name, mention, thread), with the files downloaded.
An envelope is acknowledged only after its event is stored (or dropped as malformed).

An edited message (a `message_changed` event whose message carries `edited`) reaches
the agent as a new message, as Telegram's do: its text prefixed `[edited] `, `edit_of`
naming the original `ts`, and the id `edit<edited.ts>:<ts>`, so it is neither
deduplicated against the original nor stored twice when Slack redelivers the envelope
(files are not fetched again). Changes that are not edits (link unfurls, reply counts:
no `edited`, or the same text), `message_deleted`, and the bot's own messages are
ignored.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from nanoclaw.channels.base import ChannelHost
from nanoclaw.channels.slack_outbound import LIMIT, _first, _section
from nanoclaw.channels.text import EDITED, attachment, decode_choice, parse_question
from nanoclaw.log import logger

MAX_DOWNLOAD = 25 << 20


class SlackInbound:
    """The envelope handlers; the connection they use (web, http, bot_user, host...) is the
    channel's."""

    web: AsyncWebClient
    http: aiohttp.ClientSession
    bot_user: str
    host: ChannelHost
    settings: Any
    last_ok: float

    async def _request(self, client: SocketModeClient, req: SocketModeRequest) -> None:
        try:
            if req.type == "events_api":
                await self._event(req.payload.get("event") or {})
            elif req.type == "interactive":
                await self._interactive(req.payload)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            logger.warning("malformed slack {} envelope dropped: {!r}", req.type, e)
        # stored (or dropped as garbage): now Slack may forget it
        await client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id))
        self.last_ok = time.monotonic()

    async def _event(self, ev: dict[str, Any]) -> None:
        if ev.get("type") != "message" or not isinstance(ev.get("channel"), str):
            return  # app_mention duplicates a message event; others are not chat input
        if ev.get("subtype") == "message_changed":
            return await self._edited(ev)
        if ev.get("subtype") not in (None, "file_share", "thread_broadcast"):
            return  # message_deleted, joins, bot messages, …
        parsed = await self._parse(ev, ev)
        if parsed is None:
            return
        ts, payload, thread = parsed
        payload["attachments"] = await self._download(ev.get("files") or [])
        await self.host.inbound(f"slack:{ev['channel']}", ts, payload, thread)

    async def _edited(self, ev: dict[str, Any]) -> None:
        """A `message_changed` event: a new message for the agent if the text was edited,
        unique per edit (`edited.ts`) and stable when Slack redelivers the envelope."""
        m, before = ev.get("message"), ev.get("previous_message")
        if not isinstance(m, dict):
            raise ValueError("message_changed without a message")
        edited = m.get("edited")
        stamp = edited.get("ts") if isinstance(edited, dict) else None
        if not stamp:
            return  # an unfurl, a reply count, a pin: Slack changed it, the user did not
        if isinstance(before, dict) and before.get("text") == m.get("text"):
            return  # an unfurl of an already edited message: the text is the same
        parsed = await self._parse(m, ev)
        if parsed is None:
            return
        ts, payload, thread = parsed
        payload.update(text=EDITED + payload["text"], edited=True, edit_of=ts, attachments=[])
        await self.host.inbound(f"slack:{ev['channel']}", f"edit{stamp}:{ts}", payload, thread)

    async def _parse(self, m: dict[str, Any], ev: dict[str, Any]
                     ) -> tuple[str, dict[str, Any], str | None] | None:
        """A user's message `m` (the event itself, or an edit's new version) as (ts,
        payload without attachments, thread); None for the bot's own messages."""
        if m.get("bot_id") or m.get("user") in (None, self.bot_user):
            return None
        ts, text = m["ts"], m.get("text") or ""
        if not isinstance(text, str):
            raise ValueError("text is not a string")
        if not isinstance(ts, str) or not ts:  # the message's id: one per message
            raise ValueError("ts is not a non-empty string")
        dm = ev.get("channel_type") == "im" or ev["channel"].startswith("D")
        mention = f"<@{self.bot_user}>" in text
        thread = m.get("thread_ts") if m.get("thread_ts") != ts else None
        payload = {"text": re.sub(rf"<@{re.escape(self.bot_user)}>", "@bot", text),
                   "sender_id": str(m["user"]), "sender_name": await self._name(str(m["user"])),
                   "is_mention": dm or mention, "is_group": not dm}
        return ts, payload, None if thread is None else str(thread)

    async def _name(self, user: str) -> str:
        """A user's display name (users.info, cached); the id if Slack will not say."""
        names = self.__dict__.setdefault("names", {})
        if user not in names:
            try:
                r = await asyncio.wait_for(self.web.users_info(user=user), 10)
                prof = (r.get("user") or {}).get("profile") or {}
                names[user] = str(prof.get("display_name") or prof.get("real_name")
                                  or (r.get("user") or {}).get("name") or user)
            except Exception as e:
                logger.debug("slack users.info {} failed: {!r}", user, e)
                return user
        return names[user]

    async def _download(self, files: list[Any]) -> list[dict[str, Any]]:
        out = []
        for f in files:
            if not isinstance(f, dict):
                continue
            name, mime = str(f.get("name") or "file"), f.get("mimetype")
            url = f.get("url_private_download") or f.get("url_private")
            if not isinstance(url, str) or int(f.get("size") or 0) > MAX_DOWNLOAD:
                out.append(attachment(name, mime) | {"error": "not downloadable"})
                continue
            try:
                async with self.http.get(url, headers={
                        "Authorization": f"Bearer {self.settings.slack_bot_token}"}) as r:
                    r.raise_for_status()
                    out.append(attachment(name, mime, await r.read()))
            except Exception as e:
                logger.warning("slack file {} not downloaded: {!r}", name, e)
                out.append(attachment(name, mime, url=url) | {"error": f"download failed: {e}"})
        return out

    async def _interactive(self, p: dict[str, Any]) -> None:
        if p.get("type") != "block_actions":
            return
        for action in p.get("actions") or []:
            choice = decode_choice((action or {}).get("action_id"))
            if choice is None:
                continue
            qid, index = choice
            channel = (p.get("channel") or {}).get("id") or (p.get("container") or {}).get(
                "channel_id")
            # the card sent to the channel clicked in, under the host's card id (H3)
            card = parse_question(self.host.question(qid, f"slack:{channel}") or {}) \
                if isinstance(channel, str) else None
            option = card.value(index) if card else None
            if card is None or option is None or not isinstance(channel, str):
                logger.info("slack click on unknown card {} ignored", qid)
                continue
            user = str((p.get("user") or {}).get("id") or "")
            key = f"ix:{p.get('trigger_id') or action.get('action_ts')}"
            await self.host.inbound(f"slack:{channel}", key, {
                "question_id": qid, "option": option, "user_id": user}, None, kind="action")
            ts = (p.get("message") or {}).get("ts") or (p.get("container") or {}).get("message_ts")
            if ts:
                done = f"{card.text()}\n\n✓ {card.selected_label(index)}"
                try:
                    await self.web.chat_update(channel=channel, ts=ts, text=_first(done, LIMIT),
                                               blocks=[_section(done)])
                except Exception as e:
                    logger.debug("slack card update failed: {!r}", e)
