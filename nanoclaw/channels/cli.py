"""The terminal channel: JSON lines over the unix socket `data/cli.sock` (mode 0600,
so only the host's user can talk to it; that user is the owner).

Client → host: `{"type": "message", "text": str, "chat"?: name, "id"?: str}` answered
by `{"type": "ack", "id"}` once the message is durable; `{"type": "subscribe",
"chat"?: name}`. Host → client: `{"type": "reply", "id", "chat", "text", "in_reply_to",
"kind"}` (`kind`: `reply`, `notice` or `error`, see `reply_kind`) and `{"type":
"error", "error"}` for a bad frame (the connection stays open). Any
number of clients; a chat's replies go to every client on it, and wait (durably, in
the outbox) while none is connected.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
from typing import Any

from nanoclaw import jsonin
from nanoclaw.channels.base import Channel, OutboundMessage, Unavailable
from nanoclaw.errors import Refused
from nanoclaw.log import logger
from nanoclaw.util import new_id

CHAT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
MSG_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
MAX_LINE = 1 << 20


def _frame(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def reply_kind(content: dict[str, Any]) -> str:
    """What an agent's line is, for a client that waits for an answer (`nanoclaw send`):
    `error` (the turn failed), `notice` (a word while it works: "…; retrying…") or
    `reply`, as the runner marked it (`status` in the row's content)."""
    status = content.get("status")
    return status if status in ("notice", "error") else "reply"


class BadFrame(ValueError):
    pass


def parse_frame(line: bytes) -> dict[str, Any]:
    """Validate one client frame; raises BadFrame with a one-line reason."""
    try:
        obj = jsonin.loads(line)
    except jsonin.BadJSON as e:  # malformed, not UTF-8, or nested too deep
        raise BadFrame(str(e)) from None
    if not isinstance(obj, dict):
        raise BadFrame("a frame must be a JSON object")
    kind = obj.get("type", "message")
    chat = obj.get("chat", "local")
    if not isinstance(chat, str) or not CHAT_NAME.match(chat):
        raise BadFrame("chat must be 1-64 letters, digits, '-' or '_'")
    if kind == "subscribe":
        return {"type": "subscribe", "chat": chat}
    if kind != "message":
        raise BadFrame(f"unknown frame type {kind!r}")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadFrame("a message needs a non-empty string 'text'")
    mid = obj.get("id")
    if mid is not None and (not isinstance(mid, str) or not MSG_ID.match(mid)):
        raise BadFrame("id must be 1-128 letters, digits, '.', '-' or '_'")
    return {"type": "message", "chat": chat, "text": text, "id": mid or new_id("cli")}


class CliChannel(Channel):
    name = "cli"

    @classmethod
    def enabled(cls, settings) -> bool:
        return settings.cli_enabled

    async def setup(self) -> None:
        self.path = str(self.settings.cli_socket)
        self.clients: dict[str, set[asyncio.StreamWriter]] = {}
        try:
            self.user = getpass.getuser()
        except (KeyError, OSError):
            self.user = "owner"
        if os.path.exists(self.path):
            os.unlink(self.path)
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        logger.info("terminal channel listening on {}", self.path)

    async def teardown(self) -> None:
        self.server.close()
        for writers in self.clients.values():
            for w in writers:
                w.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def is_connected(self) -> bool:
        return self.server.is_serving()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chats: set[str] = set()
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(_frame({"type": "error", "error": "frame longer than 1 MiB"}))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    frame = parse_frame(line)
                except BadFrame as e:
                    writer.write(_frame({"type": "error", "error": str(e)}))
                    await writer.drain()
                    continue
                chat = frame["chat"]
                if chat not in chats:
                    chats.add(chat)
                    self.clients.setdefault(chat, set()).add(writer)
                    self.host.kick(chat)
                if frame["type"] == "message":
                    try:
                        await self.host.inbound(chat, frame["id"], {
                            "text": frame["text"], "sender_id": self.user,
                            "sender_name": self.user, "is_mention": True, "is_group": False})
                    except Refused as e:  # not stored (a full disk): no ack, the reason
                        writer.write(_frame({"type": "error", "id": frame["id"],
                                             "error": str(e)}))
                    else:
                        writer.write(_frame({"type": "ack", "id": frame["id"]}))
                else:
                    writer.write(_frame({"type": "subscribed", "chat": chat}))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for chat in chats:
                self.clients.get(chat, set()).discard(writer)
            writer.close()

    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        writers = [w for w in self.clients.get(platform_id, ()) if not w.is_closing()]
        if not writers:
            raise Unavailable(f"no terminal client on chat {platform_id}")
        text = message.content.get("text") or message.content.get("markdown") or ""
        if not text and message.content.get("operation"):
            text = f"[{message.content['operation']}] {json.dumps(message.content)}"
        reply_to = message.in_reply_to.rsplit(":", 1)[0] if message.in_reply_to else None
        frame = _frame({"type": "reply", "id": message.idem_key, "chat": platform_id,
                        "text": text, "in_reply_to": reply_to,
                        "kind": reply_kind(message.content)})
        sent = 0
        for w in writers:
            try:
                w.write(frame)
                await w.drain()
                sent += 1
            except (ConnectionError, RuntimeError):
                continue
        if not sent:
            raise Unavailable(f"terminal clients on chat {platform_id} went away")
        return message.idem_key
