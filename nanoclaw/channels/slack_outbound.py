"""Slack's outbound half (`SlackOutbound`, a mixin of `SlackChannel`): a message (a
question's buttons or a card's links as blocks on its last part, then its files), an
edit, a reaction or a DM, with Slack's errors sorted into the worker's vocabulary by
their `error` code (FATAL: the token; PERMANENT: this send can never work).

Agent Markdown goes out as mrkdwn (`markdown.slack_mrkdwn`): 40,000 characters per
message, 3,000 per block. Slack shows no typing indicator to bots, so there is no
`set_typing`. A split half sent when the send failed is resumed, not repeated
(`message.parts`, kept by the worker). Slack takes no idempotency key, so each part
carries a marker in its message metadata (the send's key and the part's index): before a
part whose answer was lost (a crash, a timeout) is posted again, the chat's history is
read for it (`find_sent`).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Callable

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from nanoclaw.channels.base import OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.markdown import slack_mrkdwn
from nanoclaw.channels.text import card_links, encode_choice, load_files, parse_question, plain_text

LIMIT = 40_000
BLOCK_LIMIT = 3000
MARKER = "nanoclaw_send"  # the metadata event type of every part we post
FATAL = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
PERMANENT = {"channel_not_found", "not_in_channel", "is_archived", "msg_too_long",
             "no_text", "message_not_found", "cant_update_message", "invalid_blocks",
             "user_not_found", "restricted_action", "invalid_name", "already_reacted"}
EMOJI = {"👍": "+1", "👎": "-1", "✅": "white_check_mark", "❤️": "heart", "👀": "eyes",
         "🎉": "tada", "😂": "joy", "🙏": "pray", "🔥": "fire", "❌": "x"}


class SlackOutbound:
    """The sends; the connection they use (web, parts, die) is the channel's."""

    web: AsyncWebClient
    die: Callable[[str], None]

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
        done = message.parts
        for i, chunk in enumerate(chunks):
            if i < len(done):
                continue
            last = i == len(chunks) - 1
            r = await self.web.chat_postMessage(channel=channel, text=chunk, thread_ts=thread,
                                                blocks=blocks if last else None,
                                                metadata=_marker(message, i))
            message.sent(str(r["ts"]))
        for j, f in enumerate(files):
            if len(chunks) + j < len(done):
                continue
            r = await self.web.files_upload_v2(channel=channel, thread_ts=thread,
                                               content=f.data, filename=f.name)
            fid = (r.get("file") or {}).get("id") or (r.get("files") or [{}])[0].get("id")
            message.sent(str(fid))
        if not done:
            raise SendError("empty message", permanent=True)
        return done[0]

    async def find_sent(self, platform_id: str, thread_id: str | None,
                        message: OutboundMessage, since: float) -> dict[int, str]:
        """The parts of `message` Slack shows in the chat (or thread) since `since`, by the
        marker each part carries in its metadata: none is posted twice."""
        channel = platform_id.split(":", 1)[1] if platform_id.startswith("slack:") else platform_id
        args: dict[str, Any] = {"channel": channel, "oldest": f"{since - 5:.6f}",
                                "include_all_metadata": True, "limit": 200}
        r = await (self.web.conversations_replies(ts=thread_id, **args) if thread_id
                   else self.web.conversations_history(**args))
        found: dict[int, str] = {}
        for m in r.get("messages") or []:
            meta = m.get("metadata") or {}
            payload = meta.get("event_payload") or {}
            if meta.get("event_type") == MARKER and payload.get("key") == message.idem_key \
                    and isinstance(payload.get("part"), int):
                found.setdefault(payload["part"], str(m.get("ts")))
        return found

    async def open_dm(self, handle: str) -> str:
        user = handle.split(":", 1)[1] if handle.startswith("slack:") else handle
        r = await self.web.conversations_open(users=user)
        return f"slack:{r['channel']['id']}"


def _marker(message: OutboundMessage, part: int) -> dict[str, Any]:
    """What a posted part carries so `find_sent` can recognise it after a lost answer."""
    return {"event_type": MARKER, "event_payload": {"key": message.idem_key, "part": part}}


def _first(markdown: str, limit: int) -> str:
    """The first `limit` characters' worth of a Markdown text as mrkdwn."""
    return (slack_mrkdwn(markdown, limit) or ["…"])[0]


def _section(markdown: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _first(markdown, BLOCK_LIMIT)}}
