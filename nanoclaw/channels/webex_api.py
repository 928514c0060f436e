"""Webex, what both inbound paths and the outbound side share: the REST calls
(`Webex`, WEBEX_API_BASE with the bot token) and the one way an event becomes a stored
message (`store_message`, `store_action`), whether it came over the device WebSocket
(`webex.py`) or a webhook (`webex_webhook.py`).

Events carry only ids (the WebSocket's are KMS-encrypted besides), so every message is
fetched by id after its event (`GET /messages/{id}`), a card submit by
`GET /attachment/actions/{id}`. A message is stored under its id: the chat is the room
(`webex:<roomId>`), the thread its `parentId`; a direct room is always a mention, in a
group room the bot's id in `mentionedPeople` makes one (the bot's name is taken off the
front of the text). The bot's own messages are never stored. Files are fetched from
the API's own host only, with the token.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from nanoclaw.channels.text import (
    SAFE_FILE,
    attachment,
    decode_choice,
    parse_question,
    retry_after_header,
)
from nanoclaw.config import Settings

CHANNEL = "webex"
ID = re.compile(r"[A-Za-z0-9_=+/-]{1,256}")
MAX_TEXT = 100_000
MAX_DOWNLOAD = 16 << 20


class WebexError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


def rest_id(kind: str, uuid: str) -> str:
    """The REST id of a WebSocket activity's object: base64 of `ciscospark://us/<KIND>/<uuid>`."""
    return base64.b64encode(f"ciscospark://us/{kind}/{uuid}".encode()).decode().rstrip("=")


class Webex:
    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.settings = settings
        self.base = settings.webex_api_base
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        api = urlsplit(self.base)
        self.host = (api.scheme, (api.hostname or "").lower(), api.port)
        self.me: dict[str, Any] | None = None
        self.names: dict[str, str] = {}

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                json_serialize=lambda o: json.dumps(o, ensure_ascii=False),
                headers={"Authorization": f"Bearer {self.settings.webex_bot_token}"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        if not url.startswith(("http://", "https://")):
            url = f"{self.base}/{url}"
        async with self.session().request(method, url, allow_redirects=False, **kw) as r:
            raw = await r.read()
            if r.status >= 400:
                try:
                    msg = str(json.loads(raw).get("message") or "")
                except (ValueError, AttributeError):
                    msg = raw[:200].decode("utf-8", "replace")
                raise WebexError(r.status, msg[:300] or r.reason or "",
                                 retry_after_header(r.headers))
            try:
                obj = json.loads(raw) if raw else {}
            except ValueError:
                obj = {}
            return obj if isinstance(obj, dict) else {}

    async def whoami(self) -> dict[str, Any]:
        if self.me is None:
            self.me = await self.call("GET", "people/me")
        return self.me

    async def name(self, person: str) -> str:
        """A person's display name (asked once per person), or ''."""
        if person not in self.names:
            try:
                got = await self.call("GET", f"people/{person}")
                self.names[person] = str(got.get("displayName") or "")[:100]
            except (WebexError, aiohttp.ClientError, OSError):
                return ""
        return self.names[person]

    async def download(self, url: str) -> tuple[str, bytes, str | None]:
        u = urlsplit(url)
        if (u.scheme, (u.hostname or "").lower(), u.port) != self.host:
            raise ValueError(f"not on the API's host ({(u.hostname or '?')[:60]})")
        async with self.session().get(url, allow_redirects=False) as r:
            if r.status != 200:
                raise WebexError(r.status, "download failed", retry_after_header(r.headers))
            data = bytearray()
            async for block in r.content.iter_chunked(1 << 16):
                data += block
                if len(data) > MAX_DOWNLOAD:
                    raise ValueError(f"larger than {MAX_DOWNLOAD >> 20} MB")
            cd = r.headers.get("Content-Disposition", "")
            m = re.search(r'filename="?([^";]+)"?', cd)
            name = SAFE_FILE.sub("_", m.group(1) if m else "file")[:128] or "file"
            return name, bytes(data), r.headers.get("Content-Type")


def _str(v: Any, n: int = 1000) -> str:
    return v[:n] if isinstance(v, str) else ""


async def store_message(api: Webex, host: Any, message_id: str,
                        m: dict[str, Any] | None = None) -> int:
    """Fetch one message (unless listed already: `m`) and store it; 1 if it was new."""
    if not ID.fullmatch(message_id):
        return 0
    if m is None:
        m = await api.call("GET", f"messages/{message_id}")
    me = await api.whoami()
    room, person = _str(m.get("roomId"), 256), _str(m.get("personId"), 256)
    if not ID.fullmatch(room) or not ID.fullmatch(person) or person == me.get("id"):
        return 0  # ours, or unreadable
    pid = f"{CHANNEL}:{room}"
    if host.seen(pid, message_id) if hasattr(host, "seen") else False:
        return 0
    if isinstance(m.get("created"), str) and hasattr(host, "store"):
        host.store.set_state("webex:since", m["created"][:40])  # the catch-up's cursor
    group = m.get("roomType") != "direct"
    mentioned = me.get("id") in (m.get("mentionedPeople") or [])
    text = _str(m.get("text"), MAX_TEXT)
    name = _str(me.get("displayName"), 100)
    if mentioned and name and text.startswith(name):
        text = text[len(name):]
    files = []
    for url in (m.get("files") if isinstance(m.get("files"), list) else [])[:10]:
        try:
            fname, data, mime = await api.download(str(url))
            files.append(attachment(fname, (mime or "").split(";")[0] or None, data))
        except (WebexError, aiohttp.ClientError, OSError, ValueError) as e:
            files.append(attachment("file", None) | {"error": f"not fetched: {e}"})
    parent = _str(m.get("parentId"), 256) or None
    return int(await host.inbound(pid, message_id, {
        "text": text.strip(), "sender_id": f"{CHANNEL}:{person}",
        "sender_name": await api.name(person) or _str(m.get("personEmail"), 200) or None,
        "is_mention": mentioned or not group, "is_group": group, "attachments": files},
        thread_id=parent))


async def store_action(api: Webex, host: Any, action_id: str) -> int:
    """Fetch one card submit and store it as a click; 1 if it was new."""
    if not ID.fullmatch(action_id):
        return 0
    a = await api.call("GET", f"attachment/actions/{action_id}")
    room, person = _str(a.get("roomId"), 256), _str(a.get("personId"), 256)
    inputs = a.get("inputs") if isinstance(a.get("inputs"), dict) else {}
    choice = decode_choice(inputs.get("ncq"))
    if not ID.fullmatch(room) or not ID.fullmatch(person) or choice is None:
        return 0
    pid = f"{CHANNEL}:{room}"
    card = parse_question(host.question(choice[0], pid) or {})
    option = card.value(choice[1]) if card else None
    if card is None or option is None:
        return 0
    new = await host.inbound(pid, action_id, {"question_id": card.question_id,
                                              "option": option,
                                              "user_id": f"{CHANNEL}:{person}"}, kind="action")
    if new:
        store = host.store
        mid = store.sent_card_message_id(CHANNEL, card.question_id, pid)
        if mid:
            store.enqueue_send(f"choice:{CHANNEL}:{action_id}", CHANNEL, pid, None, "chat",
                               {"operation": "edit", "messageId": mid,
                                "text": f"{card.text()}\n\n**{card.selected_label(choice[1])}**"})
    return int(new)
