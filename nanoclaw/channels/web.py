"""The local web chat: a small page on 127.0.0.1 where the owner talks to their agents
in as many chats as they like, sees replies arrive, and answers question cards and
approvals.

Who may use it: whoever has the token printed at start-up (kept in `data/web-token`,
mode 0600). The address carries it in the URL fragment (`/#token=…`), which browsers
never send to a server; the page moves it to its localStorage, drops it from the address
(which keeps only `#chat=<name>`, the open chat, so a reload returns to it) and sends it
as `Authorization: Bearer`, so there are no cookies to forge (no CSRF) and no token in any
URL a log could keep. Requests whose `Host` is not this server's loopback address are
refused (no DNS rebinding). Every /api call is checked for both, whatever its method. The
page user is the local owner, the same identity as the terminal's.

Chats: each chat `<name>` (CHAT_NAME) is the messaging group `web:<name>`. `local` always
exists for the page (its group is made on first use); any other is made by
`POST /api/chats`, wired to the one agent group picked, or, without one, like the
terminal chat `cli:local` (as a send to a chat not made yet does: `ensure_web_chat`).

The HTTP API is in `web_api.py` (`WebApi`, its handlers); the console's views beside the
chats (status, usage, approvals, errors, files an agent sent) in `web_console.py`
(`ConsoleApi`), which also renders replies' Markdown for the page (`markdown_html`).

Each chat's recent history is rebuilt from the central DB at start-up, so a restart
of the worker (or a reload of the page) shows the conversation so far.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from nanoclaw import jsonin
from nanoclaw.channels.base import Channel, OutboundMessage, SendError
from nanoclaw.channels.text import card_links, parse_question, plain_text, reply_target
from nanoclaw.channels.web_api import (
    CHAT_NAME,
    MAX_BODY,
    WebApi,
    create_web_chat,
    ensure_web_chat,
)
from nanoclaw.channels.web_console import ConsoleApi, file_ref, markdown_html
from nanoclaw.db.store import Store
from nanoclaw.log import logger, terminal
from nanoclaw.util import local_user_id, parse_iso

__all__ = ["WebChannel", "create_web_chat", "ensure_web_chat"]

KEEP = 500          # events kept per chat
HISTORY = 200       # events rebuilt from the DB per chat at start-up


class WebChannel(WebApi, ConsoleApi, Channel):
    name = "web"

    @classmethod
    def enabled(cls, settings) -> bool:
        return settings.web_enabled

    async def setup(self) -> None:
        self.store = Store.open(self.settings.data_dir)
        self.token = _token(self.settings.data_dir / "web-token")
        self.owner = local_user_id()
        self.user = self.owner.split(":", 1)[1]
        self.seq = 0
        self.boot = secrets.token_hex(6)  # tells the page that seqs started again
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.changed = asyncio.Condition()
        self._history()
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        self.routes(app)
        self.console_routes(app)  # status, usage, approvals, errors (web_console.py)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        self.port = await self._listen()
        shown = "127.0.0.1" if self.settings.web_host in ("127.0.0.1", "0.0.0.0") else \
            self.settings.web_host
        self.url = f"http://{shown}:{self.port}/"
        # the token admits as the owner: on the terminal only, never in logs/ (H4); shown
        # before the address is published, so whoever reads web_url finds the line there
        terminal("web chat: open {}#token={} in a browser", self.url, self.token)
        self.store.set_state("web_url", self.url)
        logger.info("web chat listening on {} (the address with its token is on the"
                    " terminal; the token is in {})", self.url,
                    self.settings.data_dir / "web-token")

    async def _listen(self) -> int:
        """The configured port; else the one used last time (kept in data/web.json), else
        any free one. A configured port that is taken is an error; a remembered one not."""
        host, want = self.settings.web_host, self.settings.web_port
        memo = self.settings.data_dir / "web.json"
        tries = [want] if want else []
        if not want:
            try:
                tries.append(int(json.loads(memo.read_text())["port"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass
            tries.append(0)
        for port in tries:
            try:
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
            except OSError as e:
                sock.close()
                if want:
                    from nanoclaw.errors import ConfigError

                    raise ConfigError(f"NANOCLAW_WEB_PORT {want} on {host}: {e.strerror}") from None
                continue
            site = web.SockSite(self.runner, sock)
            await site.start()
            port = sock.getsockname()[1]
            if not want:
                memo.write_text(json.dumps({"port": port}))
            return port
        raise OSError("no port to listen on")

    async def teardown(self) -> None:
        if hasattr(self, "runner"):
            await self.runner.cleanup()
        if hasattr(self, "store"):
            self.store.close()

    # ---- events -----------------------------------------------------------------------
    def _push(self, chat: str, event: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        event = {"seq": self.seq, "at": time.time(), "chat": chat, **event}
        buf = self.events.setdefault(chat, [])
        buf.append(event)
        del buf[:-KEEP]
        return event

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _history(self) -> None:
        """Rebuild each chat's recent conversation from inbound_events and channel_outbox."""
        rows = self.store.chat_history("web", HISTORY * 4)
        for r in reversed(rows):
            try:
                body = jsonin.loads(r["body"])  # outbox content comes from agents
                at = parse_iso(r["at"])
            except ValueError:
                continue
            if r["dir"] == "in" and r["kind"] == "chat":
                self._push(r["platform_id"], {"type": "message", "id": r["id"], "at": at,
                                              "text": body.get("text", ""),
                                              "files": _names(body.get("attachments"))})
            elif r["dir"] == "in" and r["kind"] == "action" and isinstance(body, dict):
                self._push(r["platform_id"], {"type": "answered", "label": body.get("option"),
                                              "question_id": body.get("question_id"), "at": at})
            elif r["dir"] == "out" and isinstance(body, dict):
                ev = self._render(r["id"], body, None)
                if ev:
                    self._push(r["platform_id"], {**ev, "at": at})
        for buf in self.events.values():
            del buf[:-HISTORY]

    def _render(self, mid: str, c: dict[str, Any], in_reply_to: str | None) -> dict[str, Any] | None:
        op = c.get("operation")
        if op == "edit":
            text = str(c.get("text") or "")
            return {"type": "edit", "id": str(c.get("messageId")), "text": text,
                    "html": markdown_html(text)}
        if op == "reaction":
            return {"type": "reaction", "id": str(c.get("messageId")),
                    "emoji": str(c.get("emoji") or "")}
        if op:
            return None
        q = parse_question(c)
        if q:
            return {"type": "card", "id": mid, "question_id": q.question_id, "title": q.title,
                    "question": q.question, "options": [o["label"] for o in q.options],
                    "selected": [o["selectedLabel"] for o in q.options]}
        files = [ref for f in c.get("files") or [] if isinstance(f, dict)
                 for ref in [file_ref(self.settings, f)] if ref]
        text = plain_text(c)
        return {"type": "reply", "id": mid, "text": text, "html": markdown_html(text),
                "links": [{"label": a, "url": u} for a, u in card_links(c)], "files": files,
                "in_reply_to": reply_target(in_reply_to)}

    # ---- Channel ----------------------------------------------------------------------
    def is_connected(self) -> bool:
        return hasattr(self, "runner")

    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        if not CHAT_NAME.match(platform_id):
            raise SendError(f"not a web chat: {platform_id!r}", permanent=True)
        ev = self._render(message.idem_key, message.content, message.in_reply_to)
        if ev is None:
            raise SendError(f"unknown operation {message.content.get('operation')!r}",
                            permanent=True)
        if ev["type"] in ("reply", "card") and any(
                e.get("id") == ev["id"] and e["type"] == ev["type"]
                for e in self.events.get(platform_id, ())):
            return ev["id"]  # shown already (an attempt whose result was not stored)
        self._push(platform_id, ev)
        await self._notify()
        return ev.get("id") if ev["type"] in ("reply", "card") else str(ev.get("id"))

    async def set_typing(self, platform_id: str, thread_id: str | None) -> None:
        self._push(platform_id, {"type": "typing"})
        await self._notify()

    async def open_dm(self, handle: str) -> str:
        return "local"  # the page has one user: the owner


def _names(attachments: Any) -> list[str]:
    """The names of a message's attachments (the page shows names, not the data)."""
    return [str(a.get("name") or "file") for a in attachments or [] if isinstance(a, dict)] \
        if isinstance(attachments, list) else []


def _token(path: Path) -> str:
    """The page's token: made once, kept in `data/web-token` (0600)."""
    try:
        tok = path.read_text().strip()
        if len(tok) >= 20:
            return tok
    except OSError:
        pass
    tok = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(tok + "\n")
    return tok

