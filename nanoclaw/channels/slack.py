"""Slack, with slack-sdk: Socket Mode (aiohttp) for events, the async Web API client for
sends; `SLACK_API_BASE` configurable. Needs `SLACK_BOT_TOKEN` (xoxb-) and
`SLACK_APP_TOKEN` (xapp-, for Socket Mode).

An envelope is acknowledged only after its event is stored, so Slack redelivers what a
crash interrupted (the inbound idempotency key drops the duplicate). slack-sdk pings
the socket and reconnects by itself; on top of that we call `auth.test` every
`channel_ping` seconds and exit non-zero (restart under the breaker) when the socket or
the API has been down for `channel_liveness` seconds. A rejected token is configuration.

An edited message (a `message_changed` event whose message carries `edited`) reaches
the agent as a new message, as Telegram's do: its text prefixed `[edited] `, `edit_of`
naming the original `ts`, and the id `edit<edited.ts>:<ts>`, so it is neither
deduplicated against the original nor stored twice when Slack redelivers the envelope
(files are not fetched again). Changes that are not edits (link unfurls, reply counts:
no `edited`, or the same text), `message_deleted`, and the bot's own messages are
ignored.

platform_id `slack:<channel id>`; thread_id a thread's root `ts`; message ids are `ts`.
Slack shows no typing indicator to bots, so there is no `set_typing`. Agent Markdown
goes out as mrkdwn (`markdown.slack_mrkdwn`): 40,000 characters per message, 3,000 per
block.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from nanoclaw.channels.base import Channel, OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.markdown import slack_mrkdwn
from nanoclaw.channels.text import (
    EDITED,
    attachment,
    card_links,
    decode_choice,
    encode_choice,
    load_files,
    parse_question,
    plain_text,
)
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

LIMIT = 40_000
BLOCK_LIMIT = 3000
MAX_DOWNLOAD = 25 << 20
FATAL = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
PERMANENT = {"channel_not_found", "not_in_channel", "is_archived", "msg_too_long",
             "no_text", "message_not_found", "cant_update_message", "invalid_blocks",
             "user_not_found", "restricted_action", "invalid_name", "already_reacted"}
EMOJI = {"👍": "+1", "👎": "-1", "✅": "white_check_mark", "❤️": "heart", "👀": "eyes",
         "🎉": "tada", "😂": "joy", "🙏": "pray", "🔥": "fire", "❌": "x"}


class SlackChannel(Channel):
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
        self.parts: dict[str, list[str]] = {}
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

    # ---- inbound ----------------------------------------------------------------------
    async def _request(self, client: SocketModeClient, req: SocketModeRequest) -> None:
        try:
            if req.type == "events_api":
                await self._event(req.payload.get("event") or {})
            elif req.type == "interactive":
                await self._interactive(req.payload)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
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
        ts, text = str(m["ts"]), m.get("text") or ""
        if not isinstance(text, str):
            raise ValueError("text is not a string")
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

    # ---- outbound ---------------------------------------------------------------------
    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        channel = platform_id.split(":", 1)[1] if platform_id.startswith("slack:") else platform_id
        if not re.match(r"^[A-Z0-9]+$", channel):
            raise SendError(f"not a Slack channel: {platform_id!r}", permanent=True)
        try:
            return await self._deliver(channel, thread_id, message)
        except SlackApiError as e:
            err = str(e.response.get("error") or "")
            status = e.response.status_code
            if status == 429 or err == "ratelimited":
                raise RetryAfter(float(e.response.headers.get("Retry-After", 30)), err) from None
            if err in FATAL:
                self.die(f"the token was rejected: {err}")
                raise Unavailable(err) from None
            raise SendError(f"slack: {err or status}", permanent=err in PERMANENT) from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise SendError(f"slack: {type(e).__name__}: {e}") from None

    async def _deliver(self, channel: str, thread: str | None, message: OutboundMessage) -> str:
        c = message.content
        op = c.get("operation")
        if op == "edit":
            ts = str(c.get("messageId"))
            await self.web.chat_update(channel=channel, ts=ts,
                                       text=_first(str(c.get("text") or ""), LIMIT))
            return ts
        if op == "reaction":
            ts = str(c.get("messageId"))
            emoji = str(c.get("emoji") or "👍")
            await self.web.reactions_add(channel=channel, timestamp=ts,
                                         name=EMOJI.get(emoji, emoji.strip(":")))
            return ts
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        files = load_files(c)  # a bad file is a permanent SendError
        text = plain_text(c)
        chunks = slack_mrkdwn(text, LIMIT)
        blocks = None
        q = parse_question(c)
        if q:
            try:
                blocks = [_section(q.text()), {"type": "actions", "elements": [
                    {"type": "button", "text": {"type": "plain_text", "text": o["label"][:75]},
                     "action_id": encode_choice(q.question_id, i), "value": str(i)}
                    for i, o in enumerate(q.options)]}]
            except ValueError as e:
                raise SendError(str(e), permanent=True) from None
        elif c.get("type") == "card" and card_links(c):
            blocks = [_section(text), {"type": "actions", "elements": [
                {"type": "button", "text": {"type": "plain_text", "text": label[:75]}, "url": url}
                for label, url in card_links(c)[:5]]}]
        done = self.parts.setdefault(message.idem_key, [])
        for i, chunk in enumerate(chunks):
            if i < len(done):
                continue
            last = i == len(chunks) - 1
            r = await self.web.chat_postMessage(channel=channel, text=chunk, thread_ts=thread,
                                                blocks=blocks if last else None)
            done.append(str(r["ts"]))
        for j, f in enumerate(files):
            if len(chunks) + j < len(done):
                continue
            r = await self.web.files_upload_v2(channel=channel, thread_ts=thread,
                                               content=f.data, filename=f.name)
            fid = (r.get("file") or {}).get("id") or (r.get("files") or [{}])[0].get("id")
            done.append(str(fid))
        self.parts.pop(message.idem_key, None)
        if not done:
            raise SendError("empty message", permanent=True)
        return done[0]

    async def open_dm(self, handle: str) -> str:
        user = handle.split(":", 1)[1] if handle.startswith("slack:") else handle
        r = await self.web.conversations_open(users=user)
        return f"slack:{r['channel']['id']}"


def _first(markdown: str, limit: int) -> str:
    """The first `limit` characters' worth of a Markdown text as mrkdwn."""
    return (slack_mrkdwn(markdown, limit) or ["…"])[0]


def _section(markdown: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _first(markdown, BLOCK_LIMIT)}}
