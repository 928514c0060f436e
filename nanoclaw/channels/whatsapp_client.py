"""The seam between the WhatsApp adapter and the WhatsApp Web library: `WAClient`, a
small interface of our own, and `NeonizeClient`, its implementation on neonize 0.5
(`neonize.aioze.client.NewAClient`, whatsmeow compiled into the wheel).

Why a seam: WhatsApp Web pins its server's key (a Noise handshake checked against a
root key compiled into whatsmeow), so no fake server can stand in for WhatsApp. The
adapter and the login talk only to `WAClient`; tests drive them with a fake of it
(`tests/fakes/fake_wa_client.py`). neonize is imported inside `NeonizeClient` only, so
nothing but the `channel:whatsapp` worker and the login command loads the Go library.

Ids are JID strings without a device part: `15551234567@s.whatsapp.net` (a phone
number), `1234567890@lid` (WhatsApp's hidden "LID" id for the same person),
`120363…@g.us` (a group). Everything the library reports reaches the adapter as a
`WAEvent` through `client.handler`.
"""

from __future__ import annotations

import asyncio
import inspect
import mimetypes
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from nanoclaw.config import Settings


class WANotConnected(Exception):
    """No live connection to WhatsApp right now."""


class WASendError(Exception):
    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass
class WAMedia:
    kind: str                    # image | video | audio | document | sticker
    name: str
    mime: str
    size: int | None = None
    handle: Any = None           # what `download` needs (the library's message)


@dataclass
class WAMessage:
    id: str
    chat: str                    # JID of the chat (a person, a LID or a group)
    sender: str                  # JID of the author (may be a LID)
    sender_alt: str = ""         # the author's other id (phone JID ↔ LID), if WhatsApp sent it
    chat_alt: str = ""           # a DM's other id, if WhatsApp sent it
    push_name: str = ""
    text: str = ""
    is_group: bool = False
    from_me: bool = False
    is_edit: bool = False
    mentions: list[str] = field(default_factory=list)
    quoted_id: str = ""
    quoted_sender: str = ""
    quoted_text: str = ""
    reaction: str | None = None  # an emoji reaction to `quoted_id` (not chat text)
    media: list[WAMedia] = field(default_factory=list)


@dataclass
class WAEvent:
    """kind: qr (code), pair_success (jid), pair_error (error), connected, disconnected,
    keepalive_timeout, keepalive_restored, logged_out (reason), conflict (another client
    took the session), temp_ban (reason), outdated, connect_failure (reason), activity
    (a receipt, presence or sync: proof the application layer talks to us), message
    (message), stopped (error: the library's run loop ended)."""
    kind: str
    code: str = ""
    reason: str = ""
    jid: str = ""
    message: WAMessage | None = None


Handler = Callable[[WAEvent], Awaitable[None]]


class WAClient:
    """What the adapter and the login need from a WhatsApp Web library. Progress and
    everything received arrive as `WAEvent`s through `handler`. Sends return the new
    message's id; without a connection they raise WANotConnected, refused WASendError."""

    handler: Handler | None = None

    async def is_paired(self) -> bool: ...  # are keys stored? (no network)
    async def connect(self) -> None: ...  # start; qr / connected / … events follow
    async def disconnect(self) -> None: ...
    async def is_connected(self) -> bool: ...
    async def pair_phone(self, phone: str) -> str: ...  # a pairing code, after the 1st qr
    async def me(self) -> tuple[str, str]: ...  # our (phone JID, LID); "" while unknown
    async def pn_for_lid(self, lid: str) -> str: ...  # the library's LID map, or ""
    async def send_text(self, chat: str, text: str, quote: WAMessage | None = None) -> str: ...
    async def send_file(self, chat: str, name: str, data: bytes) -> str: ...
    async def react(self, chat: str, sender: str, message_id: str, emoji: str) -> str: ...
    async def edit(self, chat: str, message_id: str, text: str) -> str: ...
    async def typing(self, chat: str) -> None: ...
    async def download(self, media: WAMedia) -> bytes: ...

    async def emit(self, ev: WAEvent) -> None:
        if self.handler is not None:
            await self.handler(ev)


def store_dir(settings: Settings) -> Path:
    """`data/channels/whatsapp/`, made 0700: the linked device's keys. Never mounted into
    a sandbox (sandboxes see their own session folder only)."""
    d = settings.data_dir / "channels" / "whatsapp"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


def write_json(path: Path, data: Any) -> None:
    """Replace a small JSON file atomically, readable by us only (0600)."""
    import json

    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def write_status(d: Path, state: str, **fields: Any) -> None:
    """`status.json` beside the keys: linked, connected, qr (with the code, for a page to
    draw), logged_out, conflict, … — for the login, a web page or `nanoclaw doctor`."""
    import time

    write_json(d / "status.json", {"state": state, "at": time.time(), **fields})


def new_client(settings: Settings) -> WAClient:
    """The real client (module-level so tests can point the adapter at a fake)."""
    return NeonizeClient(store_dir(settings) / "neonize.db")


def _jid(j: Any) -> str:
    """A neonize JID as a string without its device part ("" for an empty JID)."""
    if j is None or not getattr(j, "User", "") or getattr(j, "IsEmpty", False):
        return ""
    return f"{j.User}@{j.Server}"


def _to_jid(s: str) -> Any:
    from neonize.proto.Neonize_pb2 import JID

    user, _, server = s.partition("@")
    return JID(User=user, Server=server or "s.whatsapp.net", Device=0, RawAgent=0,
               Integrator=0, IsEmpty=False)


MEDIA_KINDS = ("imageMessage", "videoMessage", "audioMessage", "documentMessage",
               "stickerMessage")


class NeonizeClient(WAClient):
    """`WAClient` on neonize's asyncio client. Built without touching the network;
    `connect()` starts whatsmeow (its own reconnects included)."""

    def __init__(self, db: Path):
        import logging

        from neonize.aioze import events as ev
        from neonize.aioze.client import NewAClient
        from neonize.utils import log

        log.setLevel(logging.WARNING)  # whatsmeow's own chatter stays out of our log
        self.db = db
        self.c = NewAClient(str(db))
        self.c.qr(self._qr)
        for cls, fn in ((ev.ConnectedEv, self._connected), (ev.DisconnectedEv, self._simple),
                        (ev.PairStatusEv, self._pair), (ev.LoggedOutEv, self._logged_out),
                        (ev.StreamReplacedEv, self._simple), (ev.TemporaryBanEv, self._ban),
                        (ev.ClientOutdatedEv, self._simple), (ev.ConnectFailureEv, self._failure),
                        (ev.KeepAliveTimeoutEv, self._simple),
                        (ev.KeepAliveRestoredEv, self._simple), (ev.MessageEv, self._message),
                        (ev.ReceiptEv, self._simple), (ev.PresenceEv, self._simple),
                        (ev.ChatPresenceEv, self._simple),
                        (ev.OfflineSyncCompletedEv, self._simple)):
            self.c.event(cls)(fn)
        self.kinds = {ev.DisconnectedEv: "disconnected", ev.StreamReplacedEv: "conflict",
                      ev.ClientOutdatedEv: "outdated", ev.KeepAliveTimeoutEv: "keepalive_timeout",
                      ev.KeepAliveRestoredEv: "keepalive_restored"}
        self.task: asyncio.Task | None = None

    # ---- events -----------------------------------------------------------------------
    async def _qr(self, _c: Any, data: bytes) -> None:
        await self.emit(WAEvent("qr", code=data.decode() if isinstance(data, bytes) else str(data)))

    async def _connected(self, _c: Any, _ev: Any) -> None:
        from neonize.utils.enum import Presence

        await self.emit(WAEvent("connected"))
        try:  # "available": WhatsApp then delivers to this device promptly
            await self.c.send_presence(Presence.AVAILABLE)
        except Exception:
            pass

    async def _simple(self, _c: Any, e: Any) -> None:  # receipts, presence: "activity"
        await self.emit(WAEvent(self.kinds.get(type(e), "activity")))

    async def _pair(self, _c: Any, e: Any) -> None:
        if e.Status == type(e).SUCCESS:
            await self.emit(WAEvent("pair_success", jid=_jid(e.ID)))
        else:
            await self.emit(WAEvent("pair_error", reason=e.Error or "pairing failed"))

    async def _logged_out(self, _c: Any, e: Any) -> None:
        await self.emit(WAEvent("logged_out", reason=_reason(e)))

    async def _ban(self, _c: Any, e: Any) -> None:
        await self.emit(WAEvent("temp_ban", reason=f"{_reason(e, 'Code')}, {e.Expire}s left"))

    async def _failure(self, _c: Any, e: Any) -> None:
        await self.emit(WAEvent("connect_failure", reason=_reason(e) + (
            f": {e.Message}" if e.Message else "")))

    async def _message(self, _c: Any, e: Any) -> None:
        await self.emit(WAEvent("message", message=_parse(e)))

    # ---- calls ------------------------------------------------------------------------
    async def is_paired(self) -> bool:
        if not self.db.exists():
            return False
        try:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
            try:
                return conn.execute("SELECT COUNT(*) FROM whatsmeow_device").fetchone()[0] > 0
            finally:
                conn.close()
        except sqlite3.Error:
            return False

    async def connect(self) -> None:
        self.task = await self.c.connect()
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        err = None if task.cancelled() else task.exception()
        asyncio.ensure_future(self.emit(WAEvent("stopped", reason=repr(err) if err else "")))

    async def disconnect(self) -> None:
        for call in (self.c.disconnect, self.c.stop):
            try:
                await asyncio.wait_for(call(), 3)
            except Exception:
                pass

    async def is_connected(self) -> bool:
        v = self.c.is_connected  # a coroutine in neonize 0.5's asyncio client
        return bool(await v if inspect.isawaitable(v) else v)

    async def pair_phone(self, phone: str) -> str:
        return await self.c.PairPhone(phone, show_push_notification=True)

    async def me(self) -> tuple[str, str]:
        d = self.c.me or await self.c.get_me()
        return _jid(getattr(d, "JID", None)), _jid(getattr(d, "LID", None))

    async def pn_for_lid(self, lid: str) -> str:
        try:
            return _jid(await self.c.get_pn_from_lid(_to_jid(lid)))
        except Exception:
            return ""

    async def _send(self, coro: Awaitable[Any]) -> str:
        from neonize.exc import SendMessageError

        if not await self.is_connected():
            raise WANotConnected("not connected")
        try:
            resp = await coro
        except SendMessageError as e:
            raise WASendError(str(e), permanent="not-authorized" in str(e) or
                              "forbidden" in str(e).lower()) from None
        return str(getattr(resp, "ID", "") or "")

    async def send_text(self, chat: str, text: str, quote: WAMessage | None = None) -> str:
        from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import (
            ContextInfo,
            ExtendedTextMessage,
            Message,
        )

        if quote is None:
            return await self._send(self.c.send_message(_to_jid(chat), Message(conversation=text)))
        ctx = ContextInfo(stanzaID=quote.id, participant=quote.sender,
                          quotedMessage=Message(conversation=quote.text))
        msg = Message(extendedTextMessage=ExtendedTextMessage(text=text, contextInfo=ctx))
        return await self._send(self.c.send_message(_to_jid(chat), msg))

    async def send_file(self, chat: str, name: str, data: bytes) -> str:
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if mime.startswith("image/") and mime != "image/svg+xml":
            return await self._send(self.c.send_image(_to_jid(chat), data))
        return await self._send(self.c.send_document(_to_jid(chat), data, filename=name,
                                                     title=name, mimetype=mime))

    async def react(self, chat: str, sender: str, message_id: str, emoji: str) -> str:
        msg = await self.c.build_reaction(_to_jid(chat), _to_jid(sender), message_id, emoji)
        return await self._send(self.c.send_message(_to_jid(chat), msg))

    async def edit(self, chat: str, message_id: str, text: str) -> str:
        from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message

        await self._send(self.c.edit_message(_to_jid(chat), message_id, Message(conversation=text)))
        return message_id

    async def typing(self, chat: str) -> None:
        from neonize.utils.enum import ChatPresence, ChatPresenceMedia

        await self.c.send_chat_presence(_to_jid(chat), ChatPresence.CHAT_PRESENCE_COMPOSING,
                                        ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT)

    async def download(self, media: WAMedia) -> bytes:
        return bytes(await self.c.download_any(media.handle) or b"")


def _reason(e: Any, name: str = "Reason") -> str:
    """An enum field's name (LOGGED_OUT, MAIN_DEVICE_GONE, …), else its number."""
    v = getattr(e, name, 0)
    try:
        return e.DESCRIPTOR.fields_by_name[name].enum_type.values_by_number[v].name
    except (KeyError, AttributeError):
        return str(v)


def _parse(e: Any) -> WAMessage:
    """A neonize MessageEv as a `WAMessage` (wrappers unwrapped, media listed)."""
    info, m = e.Info, e.Message
    src = info.MessageSource
    for wrap in ("ephemeralMessage", "viewOnceMessage", "viewOnceMessageV2",
                 "documentWithCaptionMessage"):
        if m.HasField(wrap):  # type: ignore[arg-type]
            m = getattr(m, wrap).message
    text, ctx = m.conversation, None
    if m.HasField("extendedTextMessage"):
        text, ctx = m.extendedTextMessage.text, m.extendedTextMessage.contextInfo
    media = []
    for kind in MEDIA_KINDS:
        if not m.HasField(kind):  # type: ignore[arg-type]
            continue
        part = getattr(m, kind)
        text = text or getattr(part, "caption", "")
        ctx = ctx or part.contextInfo
        mime = part.mimetype or "application/octet-stream"
        name = getattr(part, "fileName", "") or kind.removesuffix("Message") + (
            mimetypes.guess_extension(mime.split(";")[0]) or "")
        media.append(WAMedia(kind.removesuffix("Message"), name, mime,
                             int(part.fileLength or 0) or None, m))
    msg = WAMessage(
        id=info.ID, chat=_jid(src.Chat), sender=_jid(src.Sender),
        sender_alt=_jid(src.SenderAlt), chat_alt=_jid(src.RecipientAlt),
        push_name=info.Pushname, text=text, is_group=src.IsGroup, from_me=src.IsFromMe,
        is_edit=bool(e.IsEdit), media=media)
    if m.HasField("reactionMessage"):
        msg.reaction = m.reactionMessage.text
        msg.quoted_id = m.reactionMessage.key.ID
    if ctx is not None:
        msg.mentions = [str(j) for j in ctx.mentionedJID]
        if ctx.stanzaID:
            q = ctx.quotedMessage
            msg.quoted_id, msg.quoted_sender = ctx.stanzaID, ctx.participant
            msg.quoted_text = q.conversation or q.extendedTextMessage.text
    return msg
