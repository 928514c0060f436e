"""A fake of our `WAClient` seam (nanoclaw/channels/whatsapp_client.py), for the
WhatsApp adapter and login tests. WhatsApp Web itself cannot be faked (the client pins
WhatsApp's server key), so this stands in for the library instead: it records every
call and lets a test play what whatsmeow would report — QR codes and their refresh, a
pairing success, messages (DMs, groups, mentions, LID-addressed senders, media),
receipts, a transport drop and reconnect, a logout, a conflict, or nothing at all.

`script`: played in order right after `connect()`: a `WAEvent`, a number (seconds to
wait) or a coroutine function (`lambda: fake.logged_out()`), for runs the test cannot
reach into while they run (login, a whole worker).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from nanoclaw.channels.whatsapp_client import (
    WAClient,
    WAEvent,
    WAMedia,
    WAMessage,
    WANotConnected,
    WASendError,
)

ME = "15550000000@s.whatsapp.net"
ME_LID = "900000000000001@lid"


class FakeWAClient(WAClient):
    def __init__(self, paired: bool = True, script: list[Any] | None = None,
                 lids: dict[str, str] | None = None, pair_code: str = "ABCD-EFGH",
                 connect_ok: bool = True):
        self.paired, self.script, self.pair_code = paired, list(script or []), pair_code
        self.lids = dict(lids or {})      # what the library's LID store knows
        self.connect_ok = connect_ok      # emit `connected` on connect (a linked device)
        self.up = False
        self.sent: list[dict[str, Any]] = []
        self.calls: list[tuple[str, tuple]] = []
        self.fail_next: list[Exception] = []
        self.files: dict[str, bytes] = {}
        self.connects = self.disconnects = 0
        self.ids = (f"3EB0{n:08d}" for n in itertools.count(1))
        self.tasks: list[asyncio.Task] = []

    # ---- the interface ----------------------------------------------------------------
    async def is_paired(self) -> bool:
        return self.paired

    async def connect(self) -> None:
        self.connects += 1
        self.tasks.append(asyncio.create_task(self._play()))

    async def _play(self) -> None:
        if self.connect_ok and self.paired:
            await self.reconnect()
        for step in self.script:
            if isinstance(step, (int, float)):
                await asyncio.sleep(step)
            elif callable(step):  # e.g. `lambda: fake.pair_success()`
                await step()
            else:
                await self.emit(step)

    async def disconnect(self) -> None:
        self.disconnects += 1
        self.up = False
        for t in self.tasks:
            t.cancel()

    async def is_connected(self) -> bool:
        return self.up

    async def pair_phone(self, phone: str) -> str:
        self.calls.append(("pair_phone", (phone,)))
        return self.pair_code

    async def me(self) -> tuple[str, str]:
        return (f"{ME.split('@')[0]}:7@s.whatsapp.net", ME_LID) if self.paired else ("", "")

    async def pn_for_lid(self, lid: str) -> str:
        self.calls.append(("pn_for_lid", (lid,)))
        return self.lids.get(lid, "")

    def _out(self, kind: str, chat: str, **kw: Any) -> str:
        self.calls.append((kind, (chat,)))
        if not self.up:
            raise WANotConnected("not connected")
        if self.fail_next:
            raise self.fail_next.pop(0)
        mid = next(self.ids)
        self.sent.append({"kind": kind, "chat": chat, "id": mid, **kw})
        return mid

    async def send_text(self, chat: str, text: str, quote: WAMessage | None = None) -> str:
        return self._out("text", chat, text=text, quote=quote.id if quote else None)

    async def send_file(self, chat: str, name: str, data: bytes) -> str:
        return self._out("file", chat, name=name, data=data)

    async def react(self, chat: str, sender: str, message_id: str, emoji: str) -> str:
        return self._out("reaction", chat, sender=sender, target=message_id, emoji=emoji)

    async def edit(self, chat: str, message_id: str, text: str) -> str:
        self._out("edit", chat, target=message_id, text=text)
        return message_id

    async def typing(self, chat: str) -> None:
        self.calls.append(("typing", (chat,)))

    async def download(self, media: WAMedia) -> bytes:
        return self.files[media.handle]

    # ---- what whatsmeow would report -------------------------------------------------
    async def reconnect(self) -> None:
        self.up = True
        await self.emit(WAEvent("connected"))

    async def drop(self) -> None:
        self.up = False
        await self.emit(WAEvent("disconnected"))

    async def qr(self, code: str) -> None:
        await self.emit(WAEvent("qr", code=code))

    async def pair_success(self, jid: str = ME) -> None:
        self.paired = True
        await self.emit(WAEvent("pair_success", jid=jid))
        await self.reconnect()

    async def logged_out(self, reason: str = "LOGGED_OUT") -> None:
        self.up = False
        await self.emit(WAEvent("logged_out", reason=reason))

    async def conflict(self) -> None:
        self.up = False
        await self.emit(WAEvent("conflict"))

    async def receipt(self) -> None:
        await self.emit(WAEvent("activity"))

    async def message(self, chat: str, text: str, sender: str | None = None,
                      **kw: Any) -> WAMessage:
        """A message as whatsmeow reports it: `chat` and `sender` JIDs (a DM's chat is its
        sender), `sender_alt` for the other id form, `mentions`, `quoted_*`, `media`
        (list of (name, mime, bytes))."""
        files = kw.pop("media", [])
        m = WAMessage(id=kw.pop("id", None) or next(self.ids), chat=chat,
                      sender=sender or chat, text=text, is_group=chat.endswith("@g.us"),
                      **kw)
        for name, mime, data in files:
            self.files[f"{m.id}/{name}"] = data
            m.media.append(WAMedia("document", name, mime, len(data), f"{m.id}/{name}"))
        await self.emit(WAEvent("message", message=m))
        return m

    def texts(self, chat: str) -> list[str]:
        return [s["text"] for s in self.sent if s["chat"] == chat and s["kind"] == "text"]


def send_error(message: str = "server returned error 500", permanent: bool = False):
    return WASendError(message, permanent)
