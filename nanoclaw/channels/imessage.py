"""iMessage through BlueBubbles Server on a Mac (LAN or tailnet): the `channel:imessage`
worker. Outbound through its REST API (BLUEBUBBLES_URL, `?password=`
BLUEBUBBLES_PASSWORD); inbound, by default, by polling it (no public URL needed).

**The poll.** Every BLUEBUBBLES_POLL_INTERVAL seconds: `POST /api/v1/message/query`
for the messages created since the cursor (host_state `imessage:since`, the newest
`dateCreated` handled, the Mac's clock), less a look-back window (`LOOKBACK`: a message
delivered late carries an earlier date), oldest first, page by page. Each message is
stored once under its guid (`imessage_inbound.py`), so the window's re-reads, a restart
and the server's re-sent events neither replay nor skip anything. A first start only
sets the cursor: old messages are not answered. A message whose file has not arrived
yet is kept in `imessage:pending` and asked for again on every pass until it has (or
BLUEBUBBLES_ATTACHMENT_WAIT passed). With BLUEBUBBLES_WEBHOOK_SECRET set, the door
takes BlueBubbles' webhooks (`imessage_webhook.py`) and this poll only reconciles,
every `RECONCILE` seconds. No successful poll for NANOCLAW_CHANNEL_LIVENESS: `die`.

**Sending.** Text (`message/text`, split at 4,000 characters) and files
(`message/attachment`, multipart) carry `tempGuid` = the part's key; `method` is
BLUEBUBBLES_SEND_METHOD (`apple-script` works without the Private API; `private-api`
also makes replies inline). A part whose answer was lost is looked for in the chat's
own messages since the first attempt (`find_sent`): not sent twice. Tapbacks
(`message/react`), edits (`message/{guid}/edit`) and typing (`chat/{guid}/typing`)
need the server's Private API. A question card is a numbered list; a number sent back
answers it. 429 waits its Retry-After; 5xx is retried; a refused password is fatal.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable
from urllib.parse import quote

import aiohttp

from nanoclaw.channels.base import Channel, OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.imessage_api import (
    CHANNEL,
    CHAT,
    FROM_EMOJI,
    GUID,
    LOOKBACK,
    SINCE,
    BBError,
    BlueBubbles,
)
from nanoclaw.channels.imessage_inbound import PENDING, STORED, Inbound
from nanoclaw.channels.numbered import card_body
from nanoclaw.channels.text import (
    load_files,
    parse_question,
    plain_text,
    reply_target,
    split_text,
)
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

LIMIT = 4_000
PAGE, PAGES = 100, 20
RECONCILE = 30.0     # seconds between passes when webhooks bring messages in
SKEW = 120.0         # s: the Mac's clock may differ from ours (find_sent's window)
PENDING_KEY = "imessage:pending"


def chat_of(platform_id: str) -> str:
    chat = platform_id.removeprefix(f"{CHANNEL}:")
    if not platform_id.startswith(f"{CHANNEL}:") or not CHAT.fullmatch(chat):
        raise SendError(f"not an iMessage chat: {platform_id[:80]!r}", permanent=True)
    return chat


class IMessageChannel(Channel):
    name = CHANNEL
    supports_threads = False

    def __init__(self, settings: Settings, host: Any, clock: Callable[[], float] = time.time):
        super().__init__(settings, host)
        self.clock = clock
        self.api: BlueBubbles | None = None
        self.task: asyncio.Task | None = None
        self.last_ok = clock()

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return bool(settings.bluebubbles_url and settings.bluebubbles_password)

    # ---- lifecycle ----------------------------------------------------------------------
    async def setup(self, poll: bool = True) -> None:
        self.api = BlueBubbles(self.settings)
        self.inbound = Inbound(self.settings, self.host, self.api)
        try:
            info = await asyncio.wait_for(self.api.call("GET", "server/info"), 15)
            info = info if isinstance(info, dict) else {}
            self.api.private_api = info.get("private_api") is True
            logger.info("imessage: BlueBubbles {} on macOS {} (Private API {})",
                        info.get("server_version"), info.get("os_version"),
                        "on" if self.api.private_api else "off")
        except BBError as e:
            if e.status == 401:
                await self.api.close()
                raise ConfigError("BLUEBUBBLES_PASSWORD was refused by the BlueBubbles"
                                  " server: set the server's password") from None
            logger.warning("imessage: asking the BlueBubbles server who it is failed: {}", e)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            logger.warning("imessage: the BlueBubbles server is not reachable yet: {}",
                           type(e).__name__)
        if poll:
            self.task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def teardown(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        if self.api is not None:
            await self.api.close()

    def is_connected(self) -> bool:
        return self.clock() - self.last_ok < self.settings.channel_liveness

    # ---- the poll -----------------------------------------------------------------------
    async def _poll_forever(self) -> None:
        hooked = bool(self.settings.bluebubbles_webhook_secret)
        every = max(RECONCILE, self.settings.bluebubbles_poll_interval) if hooked else \
            self.settings.bluebubbles_poll_interval
        failures = 0
        while True:
            try:
                await self.poll(self.clock())
                self.last_ok = self.clock()
                if failures:
                    logger.info("imessage: the BlueBubbles server answers again")
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                (logger.warning if failures == 1 else logger.debug)(
                    "imessage: polling BlueBubbles failed ({}: {})", type(e).__name__,
                    str(e)[:200])
                if self.clock() - self.last_ok > self.settings.channel_liveness:
                    self.die(f"the BlueBubbles server has not answered for"
                             f" {self.settings.channel_liveness:g}s")
                    return
            await asyncio.sleep(every if not failures else min(every * 2 ** failures, 30.0))

    async def poll(self, now: float) -> int:
        """One pass: store what is new since the cursor; how many were stored."""
        assert self.api is not None
        store = self.host.store
        since = store.get_state(SINCE)
        if since is None or not since.isdigit():  # first start: from now on
            newest = await self.api.query({"limit": 1, "offset": 0, "sort": "DESC"})
            date = newest[0].get("dateCreated") if newest and isinstance(newest[0], dict) else 0
            if not isinstance(date, int) or date <= 0:  # nothing on the Mac yet: our clock
                date = int(now * 1000)
            store.set_state(SINCE, str(date))
            return 0
        cursor = int(since)
        pending = self._pending()
        after = min([cursor] + [p["date"] for p in pending.values()]) - LOOKBACK
        stored, newest = 0, cursor
        for page in range(PAGES):
            items = await self.api.query({"limit": PAGE, "offset": page * PAGE, "sort": "ASC",
                                          "after": max(0, after), "with": ["chat", "attachment"]})
            for m in items:
                guid = m.get("guid") if isinstance(m, dict) else None
                date = m.get("dateCreated") if isinstance(m, dict) else None
                date = date if isinstance(date, int) and not isinstance(date, bool) else 0
                wait = pending.get(guid) if isinstance(guid, str) else None
                give_up = wait is not None and now - wait["first"] >= \
                    self.settings.bluebubbles_attachment_wait
                got = await self.inbound.handle(m, give_up=give_up)
                if got == PENDING:
                    if wait is None:
                        pending[guid] = {"date": date, "first": now}  # type: ignore[index]
                        logger.info("imessage: message {} has a file still arriving;"
                                    " asking again", guid)
                    continue
                pending.pop(guid, None)  # type: ignore[arg-type]
                stored += got == STORED
                newest = max(newest, date)
            if len(items) < PAGE:
                break
        # a pending message older than the window is asked for by guid
        for guid in [g for g, p in pending.items() if p["date"] < after]:
            await self._retry_one(guid, pending, now)
        self._save_pending(pending)  # first: a cursor moved past a waiting message is harmless
        if newest != cursor:
            store.set_state(SINCE, str(newest))
        return stored

    async def _retry_one(self, guid: str, pending: dict[str, Any], now: float) -> None:
        assert self.api is not None
        try:
            m = await self.api.message(guid)
        except BBError as e:
            if e.status == 404:
                pending.pop(guid, None)
            return
        give_up = now - pending[guid]["first"] >= self.settings.bluebubbles_attachment_wait
        if await self.inbound.handle(m, give_up=give_up) != PENDING:
            pending.pop(guid, None)

    def _pending(self) -> dict[str, dict[str, Any]]:
        try:
            got = json.loads(self.host.store.get_state(PENDING_KEY) or "{}")
        except ValueError:
            return {}
        return {g: p for g, p in got.items() if isinstance(p, dict)
                and isinstance(p.get("date"), int) and isinstance(p.get("first"), (int, float))
                and GUID.fullmatch(g)} if isinstance(got, dict) else {}

    def _save_pending(self, pending: dict[str, Any]) -> None:
        value = json.dumps(pending) if pending else None
        if value != self.host.store.get_state(PENDING_KEY):
            self.host.store.set_state(PENDING_KEY, value)

    # ---- outbound -----------------------------------------------------------------------
    def _mapped(self, e: Exception) -> Exception:
        if not isinstance(e, BBError):
            return SendError(f"imessage: {type(e).__name__}: {e}")
        if e.status == 429:
            return RetryAfter(e.retry_after or 5.0, f"BlueBubbles rate limit: {e.message}")
        if e.status >= 500 or "already queued" in e.message:
            # 5xx; or the part's tempGuid is still being sent from an attempt cut off:
            # the next attempt asks find_sent first
            return SendError(f"BlueBubbles: {e}")
        return SendError(f"BlueBubbles refused: {e}", permanent=True)

    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        chat = chat_of(platform_id)
        if self.api is None:
            raise Unavailable("not set up yet")
        try:
            return await self._deliver(chat, message)
        except (SendError, Unavailable, RetryAfter):
            raise
        except (BBError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise self._mapped(e) from None

    async def _deliver(self, chat: str, message: OutboundMessage) -> str:
        assert self.api is not None
        c, op = message.content, message.content.get("operation")
        if op in ("edit", "reaction"):
            mid = str(c.get("messageId") or "")
            if not GUID.fullmatch(mid):
                raise SendError(f"an {op} needs the messageId of a message", permanent=True)
            if op == "edit":
                text = str(c.get("text") or "")
                if not text or len(text) > LIMIT:
                    raise SendError("an edit needs a text under 4,000 characters",
                                    permanent=True)
                await self.api.call("POST", f"message/{quote(mid, safe='')}/edit", json={
                    "editedMessage": text, "partIndex": 0,
                    "backwardsCompatibilityMessage": f"Edited to “{text}”"})
                return mid
            emoji = str(c.get("emoji") or "👍")
            kind = FROM_EMOJI.get(emoji)
            if kind is None:
                raise SendError(f"iMessage has no tapback {emoji!r} (only ❤️ 👍 👎 😂 ‼️ ❓)",
                                permanent=True)
            got = await self.api.call("POST", "message/react", json={
                "chatGuid": chat, "selectedMessageGuid": mid, "reaction": kind, "partIndex": 0})
            return str(got.get("guid")) if isinstance(got, dict) and got.get("guid") else mid
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        parts = self._parts(c)
        if not parts:
            raise SendError("empty message", permanent=True)
        method = self.settings.bluebubbles_send_method
        target = reply_target(message.in_reply_to)
        for i, part in enumerate(parts):
            if i < len(message.parts):
                continue
            extra: dict[str, Any] = {}
            if i == 0 and target and method == "private-api" and GUID.fullmatch(target):
                extra = {"selectedMessageGuid": target, "partIndex": 0}
            if "file" in part:
                name, data = part["file"]
                form = aiohttp.FormData()
                for k, v in {"chatGuid": chat, "tempGuid": message.part_key(i), "name": name,
                             "method": method, **extra}.items():
                    form.add_field(k, str(v))
                form.add_field("attachment", data, filename=name)
                got = await self.api.call("POST", "message/attachment", data=form)
            else:
                got = await self.api.call("POST", "message/text", json={
                    "chatGuid": chat, "tempGuid": message.part_key(i), "message": part["text"],
                    "method": method, **extra})
            if not isinstance(got, dict) or not isinstance(got.get("guid"), str):
                raise BBError(200, "no message guid in the answer")
            message.sent(got["guid"])
        return message.parts[0]

    def _parts(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        q = parse_question(c)
        text = card_body(q).replace("**", "") if q is not None else plain_text(c)
        parts: list[dict[str, Any]] = [{"text": t} for t in split_text(text, LIMIT)
                                       if t.strip()] if text.strip() else []
        parts += [{"file": (f.name, f.data)} for f in load_files(c)]
        return parts

    async def find_sent(self, platform_id: str, thread_id: str | None,
                        message: OutboundMessage, since: float) -> dict[int, str]:
        """The parts of `message` the chat shows as sent by us since `since`: our
        messages there (text equal to the part's, or a file of its name) that no other
        send claimed, matched in order."""
        assert self.api is not None
        chat = chat_of(platform_id)
        items = await self.api.query({"chatGuid": chat, "limit": PAGE, "offset": 0,
                                      "sort": "ASC", "with": ["attachment"],
                                      "after": max(0, int((since - SKEW) * 1000))})
        parts = self._parts(message.content)
        store, found = self.host.store, {}
        i = len(message.parts)
        for m in items:
            if i >= len(parts):
                break
            if not isinstance(m, dict) or m.get("isFromMe") is not True or \
                    not isinstance(m.get("guid"), str) or m["guid"] in message.parts:
                continue
            if store.sent_content(CHANNEL, m["guid"]) is not None:
                continue  # another send's message
            want = parts[i]
            names = [a.get("transferName") for a in m.get("attachments") or []
                     if isinstance(a, dict)]
            if ("text" in want and m.get("text") == want["text"]) or (
                    "file" in want and want["file"][0] in names):
                found[i] = m["guid"]
                i += 1
        return found

    async def set_typing(self, platform_id: str, thread_id: str | None) -> None:
        if self.api is None or not self.api.private_api:
            return  # typing needs the Private API
        await self.api.call("POST", f"chat/{quote(chat_of(platform_id), safe='')}/typing")

    async def open_dm(self, handle: str) -> str:
        """A handle (`imessage:+1555…` as `sender_id` names it) → its direct chat."""
        who = handle.removeprefix(f"{CHANNEL}:")
        pid = f"{CHANNEL}:iMessage;-;{who}"
        chat_of(pid)
        return pid
