"""iMessage through a BlueBubbles Server on a Mac: the REST calls both the `imessage`
worker and its webhook side make (`BlueBubbles`, at BLUEBUBBLES_URL with
BLUEBUBBLES_PASSWORD), and the one reader of a message the server hands us
(`parse_message`), whether it came from `POST /api/v1/message/query` or a webhook.

BlueBubbles authenticates by a query parameter (`?password=`), answers
`{status, message, data, metadata}` (errors add `error: {type, message}`), and names
a message's chat by its guid: `iMessage;-;+15551234567` is a direct chat,
`iMessage;+;chat123…` a group. A tapback is a message of its own whose
`associatedMessageType` is `love`…`question` (2000–2005; `-love`…, 3000–3005, takes one
back) and whose `associatedMessageGuid` (`p:0/<guid>`) names the message reacted to.

Files are fetched only from the configured server (`/api/v1/attachment/<guid>/download`,
the guid quoted into the path): no URL from a payload is ever called.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from nanoclaw.channels.text import SAFE_FILE, retry_after_header
from nanoclaw.config import Settings

CHANNEL = "imessage"
GUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:;/+=@-]{0,199}")
CHAT = re.compile(r"[A-Za-z]{2,10};[-+];[A-Za-z0-9@._+%=-]{1,200}")
MAX_TEXT = 100_000
MAX_FILE = 16 << 20
DONE = 5  # an attachment's transferState once the Mac has the whole file
LOOKBACK = 120_000  # ms read back behind the poll's cursor (a late message's date is earlier)
SINCE = "imessage:since"  # host_state: the poll's cursor, the newest dateCreated handled

TAPBACKS = ("love", "like", "dislike", "laugh", "emphasize", "question")
EMOJI = {"love": "❤️", "like": "👍", "dislike": "👎", "laugh": "😂", "emphasize": "‼️",
         "question": "❓"}
FROM_EMOJI = {"❤️": "love", "❤": "love", "♥️": "love", "👍": "like", "👎": "dislike",
              "😂": "laugh", "🤣": "laugh", "‼️": "emphasize", "‼": "emphasize",
              "❗": "emphasize", "!!": "emphasize", "❓": "question", "?": "question"}


class BBError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


class BadMessage(ValueError):
    """A message object we cannot read (logged in one line by the caller, skipped)."""


@dataclass
class Attachment:
    guid: str
    name: str
    mime: str | None
    size: int | None
    state: int | None

    @property
    def ready(self) -> bool:
        """Whether the Mac says it holds the whole file (it reports one while it is
        still arriving: a transferState short of 5, or no bytes yet)."""
        return self.state in (None, DONE) and self.size != 0


@dataclass
class Message:
    guid: str
    chat: str
    date: int                      # dateCreated, epoch milliseconds (the Mac's clock)
    from_me: bool
    sender: str                    # the handle's address (+1555…, someone@icloud.com)
    text: str
    attachments: list[Attachment] = field(default_factory=list)
    tapback: str | None = None     # love…question; "-love"… takes one back
    target: str | None = None      # the message a tapback is on
    reply_to: str | None = None    # the message an inline reply answers

    @property
    def group(self) -> bool:
        return ";+;" in self.chat

    @property
    def platform_id(self) -> str:
        return f"{CHANNEL}:{self.chat}"


def _str(v: Any, n: int = 1000) -> str:
    return v[:n] if isinstance(v, str) else ""


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _guid(v: Any) -> str | None:
    return v if isinstance(v, str) and GUID.fullmatch(v) else None


def _tapback(v: Any) -> str | None:
    """`love`/`-love`, or the codes 2000–2005 / 3000–3005, as `love`/`-love`; else None."""
    if isinstance(v, str) and v.lstrip("-") in TAPBACKS:
        return v
    n = _int(v)
    if n is not None and 2000 <= n <= 2005:
        return TAPBACKS[n - 2000]
    if n is not None and 3000 <= n <= 3005:
        return "-" + TAPBACKS[n - 3000]
    return None


def _target(v: Any) -> str | None:
    """`p:0/<guid>` or `bp:<guid>` → the guid."""
    if not isinstance(v, str):
        return None
    return _guid(v.rpartition("/")[2] if "/" in v else v.removeprefix("bp:"))


def parse_message(m: Any) -> Message | None:
    """A message the server handed us, or None when it is nothing to answer (a group
    event, a sticker, an empty row). BadMessage when it lacks a readable guid or chat."""
    if not isinstance(m, dict):
        raise BadMessage("not an object")
    guid = _guid(m.get("guid"))
    if guid is None:
        raise BadMessage("no readable guid")
    chats = m.get("chats") if isinstance(m.get("chats"), list) else []
    chat = next((c.get("guid") for c in chats if isinstance(c, dict)
                 and isinstance(c.get("guid"), str) and CHAT.fullmatch(c["guid"])), None)
    if chat is None:
        raise BadMessage(f"message {guid[:60]} names no readable chat")
    if _int(m.get("itemType")) not in (None, 0):
        return None  # a rename, a member added or left
    handle = m.get("handle") if isinstance(m.get("handle"), dict) else {}
    sender = _str(handle.get("address"), 200) or ("" if ";+;" in chat else chat.split(";")[2])
    kind = m.get("associatedMessageType")
    tapback = _tapback(kind)
    if kind not in (None, 0) and tapback is None:
        return None  # a sticker, a game, another associated item
    text = _str(m.get("text"), MAX_TEXT).replace("\ufffc", "").strip()
    atts = []
    for a in (m.get("attachments") if isinstance(m.get("attachments"), list) else [])[:10]:
        if not isinstance(a, dict) or _guid(a.get("guid")) is None or \
                a.get("hideAttachment") is True:
            continue
        name = SAFE_FILE.sub("_", _str(a.get("transferName"), 200))[:128] or "file"
        mime = _str(a.get("mimeType"), 100) or None
        atts.append(Attachment(a["guid"], name, mime, _int(a.get("totalBytes")),
                               _int(a.get("transferState"))))
    if not text and not atts and tapback is None:
        return None
    return Message(guid, chat, _int(m.get("dateCreated")) or 0, m.get("isFromMe") is True,
                   sender, text, atts, tapback,
                   _target(m.get("associatedMessageGuid")) if tapback else None,
                   _guid(m.get("threadOriginatorGuid")))


class BlueBubbles:
    """The REST API of one BlueBubbles Server. The password travels as a query
    parameter (BlueBubbles has no other way), so no URL is ever logged from here."""

    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.base = f"{settings.bluebubbles_url}/api/v1"
        self.password = settings.bluebubbles_password
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self.names: dict[str, str] = {}
        self.private_api = False

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                json_serialize=lambda o: json.dumps(o, ensure_ascii=False))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        """The `data` of the answer; BBError for a status of 400 or more."""
        params = {**kw.pop("params", {}), "password": self.password}
        async with self.session().request(method, f"{self.base}/{path}", params=params,
                                          allow_redirects=False, **kw) as r:
            raw = await r.content.read(8 << 20)
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            if r.status >= 400:
                err = body.get("error") if isinstance(body.get("error"), dict) else {}
                msg = _str(err.get("message"), 300) or _str(body.get("message"), 300)
                raise BBError(r.status, msg or r.reason or "", retry_after_header(r.headers))
            return body.get("data")

    async def query(self, body: dict[str, Any]) -> list[Any]:
        got = await self.call("POST", "message/query", json=body)
        return got if isinstance(got, list) else []

    async def message(self, guid: str) -> Any:
        return await self.call("GET", f"message/{quote(guid, safe='')}",
                               params={"with": "chats,attachment"})

    async def download(self, att: Attachment) -> bytes:
        """The file, from the configured server only. BBError 404 while the Mac does
        not have it yet (BlueBubbles reports an attachment before it arrives)."""
        url = f"{self.base}/attachment/{quote(att.guid, safe='')}/download"
        async with self.session().get(url, params={"password": self.password},
                                      allow_redirects=False) as r:
            if r.status != 200:
                raise BBError(r.status, "download failed", retry_after_header(r.headers))
            data = bytearray()
            async for block in r.content.iter_chunked(1 << 16):
                data += block
                if len(data) > MAX_FILE:
                    raise ValueError(f"larger than {MAX_FILE >> 20} MB")
            if not data:
                raise BBError(404, "the file is empty: not arrived yet")
            return bytes(data)

    async def name(self, address: str) -> str:
        """A contact's display name (asked once per address), or ''."""
        if address and address not in self.names:
            try:
                got = await self.call("POST", "contact/query", json={"addresses": [address]})
            except (BBError, aiohttp.ClientError, OSError):
                return ""
            c = got[0] if isinstance(got, list) and got and isinstance(got[0], dict) else {}
            name = _str(c.get("displayName"), 100) or " ".join(
                _str(c.get(k), 50) for k in ("firstName", "lastName") if c.get(k))
            self.names[address] = name.strip()
        return self.names.get(address, "")
