"""Google Chat, outbound side: the `channel:googlechat` worker calls the Chat REST API
(GOOGLE_CHAT_API_BASE) as the service account (`googlechat_api.Chat`); what users write
arrives through the webhook door (`googlechat_webhook.py`, /webhook/googlechat).

The chat is a space (`googlechat:spaces/<id>`: a DM or a named space), the thread a
thread's id (replies use `messageReplyOption=REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD`).
Every part carries `requestId` = the send's part key, and Google answers a repeat with
the message it made: a part whose answer was lost is shown once. Text is split so each
message stays under Chat's 32,000 bytes; a question card goes out as a cards v2 card
whose buttons call `ncq` with `ncq:<card>:<index>`; edits by PATCH; text files inlined
as code blocks (an app cannot upload files with its own credentials, nor react: both
fail for good, saying so). 429 waits its Retry-After (else 5 s), 5xx is retried, a
refused key is a permanent error logged once at ERROR.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from nanoclaw.channels.base import Channel, OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.googlechat_api import Chat, ChatError
from nanoclaw.channels.googlechat_webhook import SPACE, USER
from nanoclaw.channels.text import (
    encode_choice,
    load_files,
    parse_question,
    plain_text,
    split_bytes,
)
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

TEXT_BYTES = 30_000   # of one message's text (Chat refuses over 32,000 bytes in all)


def space_of(platform_id: str) -> str:
    space = platform_id.removeprefix("googlechat:")
    if not platform_id.startswith("googlechat:") or not SPACE.fullmatch(space):
        raise SendError(f"not a Google Chat space: {platform_id[:80]!r}", permanent=True)
    return space


def card_v2(question_id: str, title: str, text: str, options: list[dict[str, str]]
            ) -> dict[str, Any]:
    try:
        buttons = [{"text": o["label"][:100], "onClick": {"action": {
            "function": "ncq", "parameters": [{"key": "ncq", "value": encode_choice(
                question_id, i)}]}}} for i, o in enumerate(options)]
    except ValueError as e:
        raise SendError(str(e), permanent=True) from None
    card: dict[str, Any] = {"sections": [{"widgets": [
        {"textParagraph": {"text": text or " "}}, {"buttonList": {"buttons": buttons}}]}]}
    if title:
        card["header"] = {"title": title[:200]}
    return {"cardsV2": [{"cardId": question_id[:64], "card": card}]}


class GoogleChatChannel(Channel):
    name = "googlechat"
    supports_threads = True

    def __init__(self, settings: Settings, host: Any):
        super().__init__(settings, host)
        self.api: Chat | None = None
        self.key_told = False

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return bool(settings.google_chat_service_account_file or settings.google_chat_credentials)

    async def setup(self) -> None:
        self.api = Chat(self.settings)  # ConfigError for an unusable key
        try:
            await asyncio.wait_for(self.api.token(), 15)
        except ChatError as e:
            await self.api.close()
            raise ConfigError(f"Google refused the Chat service account key ({e.message})"
                              ) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            logger.warning("googlechat: token endpoint not reachable yet: {!r}", e)

    async def teardown(self) -> None:
        if self.api is not None:
            await self.api.close()

    def _mapped(self, e: Exception) -> Exception:
        if not isinstance(e, ChatError):
            return SendError(f"googlechat: {type(e).__name__}: {e}")
        if e.status == 429:
            return RetryAfter(e.retry_after or 5.0, f"googlechat quota: {e.message}")
        if e.message.startswith("token endpoint"):
            if not self.key_told:
                self.key_told = True
                logger.error("googlechat: Google refused the service account key ({}); set a"
                             " valid key and restart channel:googlechat", e.message)
            return SendError("Google refused the Chat service account key", permanent=True)
        if e.status >= 500:
            return SendError(f"googlechat: {e}")
        return SendError(f"googlechat refused: {e}", permanent=True)

    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        space = space_of(platform_id)
        if self.api is None:
            raise Unavailable("not set up yet")
        try:
            return await self._deliver(space, thread_id, message)
        except (SendError, Unavailable, RetryAfter):
            raise
        except (ChatError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise self._mapped(e) from None

    async def _deliver(self, space: str, thread: str | None, message: OutboundMessage) -> str:
        assert self.api is not None
        c, op = message.content, message.content.get("operation")
        if op == "edit":
            mid, text = str(c.get("messageId") or ""), str(c.get("text") or "")
            if not mid.startswith(space + "/messages/") or not text or \
                    len(text.encode()) > TEXT_BYTES:
                raise SendError("an edit needs a message of this space and a text under"
                                " 30,000 bytes", permanent=True)
            await self.api.update(mid, {"text": text, "cardsV2": []}, "text,cardsV2")
            return mid
        if op == "reaction":
            raise SendError("a Chat app cannot react with its own credentials (reactions"
                            " need a user's)", permanent=True)
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        parts = self._parts(c)
        done = message.parts  # resume a half-sent split
        for i, part in enumerate(parts):
            if i < len(done):
                continue
            message.sent(await self.api.create(space, part, message.part_key(i), thread))
        if not done:
            raise SendError("empty message", permanent=True)
        return done[0]

    def _parts(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        q = parse_question(c)
        text = plain_text(c) if q is None else q.question
        chunks = split_bytes(text, TEXT_BYTES) if text.strip() else []
        parts: list[dict[str, Any]] = [{"text": t} for t in chunks]
        if q is not None:
            last = chunks.pop() if chunks else ""
            parts = parts[:len(chunks)] + [card_v2(q.question_id, q.title, last, q.options)]
        for f in load_files(c):
            try:
                content = f.data.decode("utf-8")
            except UnicodeDecodeError:
                raise SendError(f"file {f.name}: not text to show inline (a Chat app cannot"
                                " upload files with its own credentials)", permanent=True
                                ) from None
            for chunk in split_bytes(f"*{f.name}*\n```\n{content}\n```", TEXT_BYTES):
                parts.append({"text": chunk})
        return parts

    async def open_dm(self, handle: str) -> str:
        """`googlechat:users/<id>` (as `sender_id` names a user) → their DM space."""
        user = handle.removeprefix("googlechat:")
        if not USER.fullmatch(user):
            raise SendError(f"not a Google Chat user: {handle[:80]!r}", permanent=True)
        if self.api is None:
            raise Unavailable("not set up yet")
        try:
            return f"googlechat:{await self.api.find_dm(user)}"
        except (ChatError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise self._mapped(e) from None
