"""Microsoft Teams through the Bot Framework, outbound side: the `channel:teams` worker
posts activities to the Bot Connector at the conversation's `serviceUrl` (remembered by
the door from the last activity there, `teams_webhook.py`; else TEAMS_SERVICE_URL), but
only when its host is on TEAMS_SERVICE_URL_ALLOW, with a bot token from TEAMS_TOKEN_URL
(`teams_api.py`).

The chat is a conversation (`teams:<conversation id>`): a personal chat, a group chat or
a channel; the thread is a channel's reply chain (`<id>;messageid=<root>`). Text goes
as Markdown, split so each activity stays under Teams' ~28 KB; a question card as an
Adaptive Card whose `Action.Submit` buttons carry `ncq:<card>:<index>`; files inline
(data URIs, small files only: larger ones need SharePoint, which a bot cannot reach
without Graph permissions); edits by PUT. Teams has no reaction API for bots: a
reaction fails for good, saying so. 429 waits its Retry-After; 412, 502, 504 and other
5xx are retried; a refused token is a permanent error logged once at ERROR.
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
from typing import Any

import aiohttp

from nanoclaw.channels.base import Channel, OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.teams_api import Connector, NotAllowed, TeamsError
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

TEXT_BYTES = 24_000     # of text in one activity (Teams refuses ~28 KB in all)
LIMIT = 24_000          # characters, before the byte check
INLINE_FILE = 20_000    # bytes of a file sent as a data URI
CARD = "application/vnd.microsoft.card.adaptive"


def conversation_of(platform_id: str) -> str:
    conv = platform_id.removeprefix("teams:")
    if not platform_id.startswith("teams:") or not 0 < len(conv) <= 512 or ";" in conv:
        raise SendError(f"not a Teams chat: {platform_id[:80]!r}", permanent=True)
    return conv


def adaptive_card(title: str, text: str, actions: list[dict[str, Any]]) -> dict[str, Any]:
    body = ([{"type": "TextBlock", "text": title, "weight": "Bolder", "wrap": True}]
            if title else [])
    body.append({"type": "TextBlock", "text": text or " ", "wrap": True})
    return {"contentType": CARD, "content": {
        "type": "AdaptiveCard", "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.4", "body": body, "actions": actions}}


class TeamsChannel(Channel):
    name = "teams"
    supports_threads = True

    def __init__(self, settings: Settings, host: Any):
        super().__init__(settings, host)
        self.api: Connector | None = None
        self.token_told = False

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return bool(settings.teams_app_id and settings.teams_app_password)

    async def setup(self) -> None:
        if self.settings.teams_app_type.lower().startswith("single") and \
                not self.settings.teams_app_tenant_id:
            raise ConfigError("TEAMS_APP_TYPE is SingleTenant but TEAMS_APP_TENANT_ID is not"
                              " set (the bot token must come from your tenant)")
        self.api = Connector(self.settings)
        try:  # the credentials, once: say at start-up what is wrong
            await asyncio.wait_for(self.api.tokens.get(self.api.session()), 15)
        except TeamsError as e:
            if e.status in (400, 401):
                await self.api.close()
                raise ConfigError(f"TEAMS_APP_ID / TEAMS_APP_PASSWORD refused by the token"
                                  f" endpoint ({e.message})") from None
            logger.warning("teams: getting a bot token failed: {}", e)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            logger.warning("teams: token endpoint not reachable yet: {!r}", e)

    async def teardown(self) -> None:
        if self.api is not None:
            await self.api.close()

    # ---- where replies go -------------------------------------------------------------
    def _service(self, conv: str) -> str:
        return self.host.store.get_state(f"teams:service:{conv}") or \
            self.settings.teams_service_url

    def _mapped(self, e: Exception) -> Exception:
        if isinstance(e, NotAllowed):
            logger.error("teams: refused to call {}", e)
            return SendError(f"teams: {e}", permanent=True)
        if not isinstance(e, TeamsError):
            return SendError(f"teams: {type(e).__name__}: {e}")
        if e.status == 429:
            return RetryAfter(e.retry_after or 2.0, f"teams rate limit: {e.message}")
        if e.message.startswith("token endpoint") and e.status in (400, 401):
            if not self.token_told:
                self.token_told = True
                logger.error("teams: the token endpoint refused TEAMS_APP_ID /"
                             " TEAMS_APP_PASSWORD ({}); fix them and restart channel:teams",
                             e.message)
            return SendError("Teams refused the bot's credentials", permanent=True)
        if e.status in (412, 502, 504) or e.status >= 500:
            return SendError(f"teams: {e}")
        if e.status in (401, 403):
            return SendError(f"teams refused the reply ({e}): is the bot in this conversation,"
                             " and for a single-tenant bot is TEAMS_APP_TENANT_ID set?",
                             permanent=True)
        return SendError(f"teams refused: {e}", permanent=True)

    # ---- outbound ---------------------------------------------------------------------
    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        conv = conversation_of(platform_id)
        if self.api is None:
            raise Unavailable("not set up yet")
        if thread_id:
            conv = f"{conv};messageid={thread_id}"
        try:
            return await self._deliver(self._service(conv.split(";")[0]), conv, message)
        except (SendError, Unavailable, RetryAfter):
            raise
        except (TeamsError, NotAllowed, aiohttp.ClientError, asyncio.TimeoutError,
                OSError) as e:
            raise self._mapped(e) from None

    async def _deliver(self, service: str, conv: str, message: OutboundMessage) -> str:
        assert self.api is not None
        c, op = message.content, message.content.get("operation")
        if op == "edit":
            mid, text = str(c.get("messageId") or ""), str(c.get("text") or "")
            if not mid or not text or len(text.encode()) > TEXT_BYTES:
                raise SendError("an edit needs messageId and a text under 24 KB",
                                permanent=True)
            await self.api.update(service, conv.split(";")[0], mid, {
                "type": "message", "id": mid, "text": text, "textFormat": "markdown"})
            return mid
        if op == "reaction":
            raise SendError("Teams has no API for a bot to react to a message",
                            permanent=True)
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        acts = self._activities(c)
        done = message.parts  # resume a half-sent split
        for i, act in enumerate(acts):
            if i < len(done):
                continue
            message.sent(await self.api.send(service, conv, act))
        if not done:
            raise SendError("empty message", permanent=True)
        return done[0]

    def _activities(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        q = parse_question(c)
        text = plain_text(c) if q is None else q.question
        chunks = split_bytes(text, TEXT_BYTES, LIMIT) if text.strip() else []
        acts = [{"type": "message", "text": t, "textFormat": "markdown"} for t in chunks]
        if q is not None:
            try:
                actions = [{"type": "Action.Submit", "title": o["label"][:100],
                            "data": {"ncq": encode_choice(q.question_id, i)}}
                           for i, o in enumerate(q.options)]
            except ValueError as e:
                raise SendError(str(e), permanent=True) from None
            last = chunks.pop() if chunks else ""
            acts = acts[:len(chunks)] + [{"type": "message", "attachments": [
                adaptive_card(q.title, last, actions)]}]
        for f in load_files(c):
            if len(f.data) > INLINE_FILE:
                raise SendError(f"file {f.name} is larger than {INLINE_FILE // 1000} KB: Teams"
                                " takes larger files from a bot only through SharePoint",
                                permanent=True)
            mime = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
            acts.append({"type": "message", "attachments": [{
                "contentType": mime, "name": f.name,
                "contentUrl": f"data:{mime};base64,{base64.b64encode(f.data).decode()}"}]})
        return acts

    async def set_typing(self, platform_id: str, thread_id: str | None) -> None:
        conv = conversation_of(platform_id)
        if self.api is not None:
            await self.api.send(self._service(conv), conv + (
                f";messageid={thread_id}" if thread_id else ""), {"type": "typing"})

    async def open_dm(self, handle: str) -> str:
        """A user's id (`29:…`, as `sender_id` names it) → their personal chat."""
        user = handle.removeprefix("teams:")
        if self.api is None:
            raise Unavailable("not set up yet")
        service = self.settings.teams_service_url
        try:
            conv = await self.api.create_dm(service, user, self.settings.teams_app_tenant_id
                                            or None)
        except (TeamsError, NotAllowed, aiohttp.ClientError, asyncio.TimeoutError,
                OSError) as e:
            raise self._mapped(e) from None
        self.host.store.set_state(f"teams:service:{conv}", service)
        return f"teams:{conv}"
