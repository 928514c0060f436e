"""Webex messaging bots: the `channel:webex` worker. Outbound through the REST API
(WEBEX_API_BASE with WEBEX_BOT_TOKEN); inbound, by default, over the device WebSocket
(no public URL): register a device at WEBEX_DEVICE_URL, open its `webSocketUrl`, send
the authorization frame, and for each `conversation.activity` fetch the message (verb
`post`/`share`) or the card submit (`cardAction`) by id (`webex_api.store_message`,
`store_action`). A closed socket, or one that stops answering pings (every half
NANOCLAW_CHANNEL_LIVENESS, at most 30 s), ends the worker (`die`), which the crash-loop breaker restarts; a device the server no longer
knows (404) is registered afresh. With WEBEX_MODE=webhook the door takes the events
instead (`webex_webhook.py`) and this worker only sends.

The chat is a room (`webex:<roomId>`), the thread a message's `parentId`. Text goes as
Markdown split at 7,000 bytes (Webex takes "just over 7 KB"); a question card as an
Adaptive Card attachment with `Action.Submit` buttons (`ncq:<card>:<index>`); one file
per message (multipart); edits by PUT. Webex has no reaction API for bots, and no typing
indicator. 429 waits its Retry-After; 5xx is retried; a refused token is fatal at start.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from nanoclaw.channels.base import Channel, OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.text import (
    encode_choice,
    load_files,
    parse_question,
    plain_text,
    split_bytes,
)
from nanoclaw.channels.webex_api import ID, Webex, WebexError, rest_id, store_action, store_message
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

TEXT_BYTES = 7_000
CARD = "application/vnd.microsoft.card.adaptive"
DEVICE = {"deviceName": "nanoclaw", "deviceType": "DESKTOP", "localizedModel": "python",
          "model": "python", "name": "nanoclaw", "systemName": "nanoclaw",
          "systemVersion": "1.0"}


def room_of(platform_id: str) -> dict[str, str]:
    """Where a send goes: `{"roomId": …}`, or `{"toPersonId": …}` for a cold DM."""
    room = platform_id.removeprefix("webex:")
    person = room.startswith("person:")
    room = room.removeprefix("person:")
    if not platform_id.startswith("webex:") or not ID.fullmatch(room):
        raise SendError(f"not a Webex room: {platform_id[:80]!r}", permanent=True)
    return {"toPersonId" if person else "roomId": room}


# Where Webex's own services live: a WebSocket URL the device registration hands us is
# connected to only on one of these (or the registration endpoint's own host: tests).
SOCKET_DOMAINS = ("wbx2.com", "ciscospark.com", "webex.com")


def socket_allowed(url: str, settings: Settings) -> bool:
    """Whether a WebSocket URL the platform handed us may be called (wss on a Webex
    domain, or the configured registration endpoint's scheme-mapped host)."""
    u, dev = urlsplit(url), urlsplit(settings.webex_device_url)
    host = (u.hostname or "").lower()
    if host and host == (dev.hostname or "").lower() and u.port == dev.port:
        return u.scheme == ("wss" if dev.scheme == "https" else "ws")
    return u.scheme == "wss" and any(host == d or host.endswith("." + d)
                                     for d in SOCKET_DOMAINS)


class WebexChannel(Channel):
    name = "webex"
    supports_threads = True

    def __init__(self, settings: Settings, host: Any):
        super().__init__(settings, host)
        self.api: Webex | None = None
        self.task: asyncio.Task | None = None
        self.connected = False

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return bool(settings.webex_bot_token)

    async def setup(self) -> None:
        self.api = Webex(self.settings)
        try:
            me = await asyncio.wait_for(self.api.whoami(), 15)
            logger.info("webex: answering as {}", me.get("displayName"))
        except WebexError as e:
            if e.status == 401:
                await self.api.close()
                raise ConfigError("WEBEX_BOT_TOKEN was refused by Webex: set a valid bot"
                                  " token") from None
            logger.warning("webex: asking who WEBEX_BOT_TOKEN is failed: {}", e)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            logger.warning("webex: Webex API not reachable yet: {!r}", e)
        if self.settings.webex_mode == "websocket":
            self.task = asyncio.get_running_loop().create_task(self._listen())

    async def teardown(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.api is not None:
            await self.api.close()

    def is_connected(self) -> bool:
        return self.connected or self.settings.webex_mode == "webhook"

    # ---- the device WebSocket -----------------------------------------------------------
    async def _device(self, fresh: bool) -> str:
        assert self.api is not None
        key = "webex:device"
        store = self.host.store
        saved = None if fresh else store.get_state(key)
        if saved:
            return json.loads(saved)["webSocketUrl"]
        got = await self.api.call("POST", self.settings.webex_device_url, json=DEVICE)
        if not isinstance(got.get("webSocketUrl"), str):
            raise WebexError(200, "the device registration named no webSocketUrl")
        if not socket_allowed(got["webSocketUrl"], self.settings):
            raise WebexError(200, "the device registration named a WebSocket outside Webex"
                                  f" ({got['webSocketUrl'][:80]!r}); not connecting")
        store.set_state(key, json.dumps({"url": got.get("url"),
                                         "webSocketUrl": got["webSocketUrl"]}))
        return got["webSocketUrl"]

    async def _listen(self) -> None:
        assert self.api is not None
        fresh = False
        try:
            for _ in range(2):  # once more with a new device if the server forgot ours
                url = await self._device(fresh)
                try:
                    await self._socket(url)
                    break
                except aiohttp.WSServerHandshakeError as e:
                    if e.status != 404 or fresh:
                        raise
                    logger.info("webex: the device is stale; registering a new one")
                    fresh = True
            self.die("the device WebSocket closed")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.die(f"the device WebSocket failed: {type(e).__name__}: {e}")
        finally:
            self.connected = False

    async def _socket(self, url: str) -> None:
        assert self.api is not None
        liveness = self.settings.channel_liveness
        async with self.api.session().ws_connect(url, heartbeat=min(30.0, liveness / 2)) as ws:
            await ws.send_json({"id": str(uuid.uuid4()), "type": "authorization", "data": {
                "token": f"Bearer {self.settings.webex_bot_token}"}})
            self.connected = True
            logger.info("webex: device WebSocket connected")
            await self._catch_up()
            while True:
                msg = await ws.receive()  # a socket that stops answering pings closes
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    continue
                await self._frame(frame)

    async def _catch_up(self) -> None:
        """Messages that came while no device listened (a restart, a dropped socket): the
        wired rooms' messages since the last one stored (`webex:since`), stored once
        each. A first start only sets the cursor: old messages are not answered."""
        assert self.api is not None
        store = self.host.store
        since = store.get_state("webex:since")
        if not since:
            store.set_state("webex:since", time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                                                         time.gmtime()))
            return
        for chat in store.channel_chats(self.name)[-50:]:
            if not chat["agents"] or chat["platform_id"].startswith("webex:person:"):
                continue
            room = chat["platform_id"].removeprefix("webex:")
            try:
                try:
                    got = await self.api.call("GET", "messages", params={"roomId": room,
                                                                         "max": "50"})
                except WebexError as e:
                    if e.status != 403:
                        raise
                    me = await self.api.whoami()  # a group room: a bot lists its mentions
                    got = await self.api.call("GET", "messages", params={
                        "roomId": room, "max": "50", "mentionedPeople": str(me.get("id"))})
                items = [m for m in got.get("items") or [] if isinstance(m, dict)
                         and str(m.get("created") or "") >= since]
                for m in sorted(items, key=lambda m: str(m.get("created"))):
                    await store_message(self.api, self.host, str(m.get("id")), m)
            except (WebexError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                logger.warning("webex: catching up on {} failed: {!r}", room[:60], e)

    async def _frame(self, frame: Any) -> None:
        assert self.api is not None
        data = frame.get("data") if isinstance(frame, dict) else None
        act = data.get("activity") if isinstance(data, dict) else None
        if not isinstance(act, dict) or data.get("eventType") != "conversation.activity":
            return
        aid, verb = act.get("id"), act.get("verb")
        if not isinstance(aid, str) or not ID.fullmatch(aid):
            return
        for attempt in range(3):  # a transient REST failure must not lose the message
            try:
                if verb in ("post", "share"):
                    await store_message(self.api, self.host, rest_id("MESSAGE", aid))
                elif verb == "cardAction":
                    await store_action(self.api, self.host, rest_id("ATTACHMENT_ACTION", aid))
                return
            except WebexError as e:
                if e.status == 404 or (e.status < 500 and e.status != 429):
                    logger.info("webex: activity {} not readable: {}", aid[:60], e)
                    return
                await asyncio.sleep(e.retry_after or (0.5 * 2 ** attempt))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                logger.warning("webex: fetching activity {} failed: {!r}", aid[:60], e)
                await asyncio.sleep(0.5 * 2 ** attempt)
        logger.error("webex: activity {} could not be fetched; not stored", aid[:60])

    # ---- outbound ---------------------------------------------------------------------
    def _mapped(self, e: Exception) -> Exception:
        if not isinstance(e, WebexError):
            return SendError(f"webex: {type(e).__name__}: {e}")
        if e.status == 429:
            return RetryAfter(e.retry_after or 5.0, f"webex rate limit: {e.message}")
        if e.status >= 500:
            return SendError(f"webex: {e}")
        return SendError(f"webex refused: {e}", permanent=True)

    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        room = room_of(platform_id)
        if self.api is None:
            raise Unavailable("not set up yet")
        try:
            return await self._deliver(room, thread_id, message)
        except (SendError, Unavailable, RetryAfter):
            raise
        except (WebexError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise self._mapped(e) from None

    async def _deliver(self, room: dict[str, str], thread: str | None,
                       message: OutboundMessage) -> str:
        assert self.api is not None
        c, op = message.content, message.content.get("operation")
        if op == "edit":
            mid, text = str(c.get("messageId") or ""), str(c.get("text") or "")
            if not ID.fullmatch(mid) or not text or len(text.encode()) > TEXT_BYTES:
                raise SendError("an edit needs messageId and a text under 7,000 bytes",
                                permanent=True)
            got = await self.api.call("GET", f"messages/{mid}")  # PUT wants its room
            await self.api.call("PUT", f"messages/{mid}", json={"roomId": got.get("roomId"),
                                                                "markdown": text})
            return mid
        if op == "reaction":
            raise SendError("Webex has no API for a bot to react to a message", permanent=True)
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        parts = self._parts(c)
        done = message.parts
        for i, part in enumerate(parts):
            if i < len(done):
                continue
            if thread:
                part["parentId"] = thread
            if "file" in part:
                name, data = part.pop("file")
                form = aiohttp.FormData()
                for k, v in {**room, **part}.items():
                    form.add_field(k, v)
                form.add_field("files", data, filename=name, content_type=mimetypes.guess_type(
                    name)[0] or "application/octet-stream")
                got = await self.api.call("POST", "messages", data=form)
            else:
                got = await self.api.call("POST", "messages", json={**room, **part})
            if not isinstance(got.get("id"), str):
                raise WebexError(200, "no message id in the answer")
            message.sent(got["id"])
        if not done:
            raise SendError("empty message", permanent=True)
        return done[0]

    def _parts(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        q = parse_question(c)
        text = plain_text(c) if q is None else q.text()
        chunks = split_bytes(text, TEXT_BYTES) if text.strip() else []
        parts: list[dict[str, Any]] = [{"markdown": t} for t in chunks]
        if q is not None:
            try:
                actions = [{"type": "Action.Submit", "title": o["label"][:100],
                            "data": {"ncq": encode_choice(q.question_id, i)}}
                           for i, o in enumerate(q.options)]
            except ValueError as e:
                raise SendError(str(e), permanent=True) from None
            last = chunks.pop() if chunks else q.question or " "
            body = ([{"type": "TextBlock", "text": q.title, "weight": "Bolder", "wrap": True}]
                    if q.title else []) + [{"type": "TextBlock", "text": q.question or " ",
                                            "wrap": True}]
            parts = parts[:len(chunks)] + [{"markdown": last, "attachments": [{
                "contentType": CARD, "content": {"type": "AdaptiveCard", "version": "1.3",
                                                 "body": body, "actions": actions}}]}]
        for f in load_files(c):
            parts.append({"file": (f.name, f.data)})
        return parts

    async def open_dm(self, handle: str) -> str:
        """A person (`webex:<personId>`, as `sender_id` names them) → `webex:person:<id>`,
        which is sent to with `toPersonId` (Webex opens the direct room itself)."""
        who = handle.removeprefix("webex:")
        if not ID.fullmatch(who):
            raise SendError(f"not a Webex person: {handle[:80]!r}", permanent=True)
        return f"webex:person:{who}"
