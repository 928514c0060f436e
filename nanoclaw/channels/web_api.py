"""The web chat's HTTP side (`WebApi`, a mixin of `WebChannel`): the guard every
request passes (loopback `Host`, the token on every /api call) and the handlers.

API (JSON; every /api call needs the token):
  GET  /api/events?after=N[&chat=c][&wait=S]
       long poll: {events: [...], next: N', user, boot}; events are {seq, at, chat,
       type: message|reply|card|answered|edit|reaction|typing, ...}. One poll follows
       every chat: `seq` is one counter across chats and each event names its `chat`
       (`chat=c` narrows to one), so the page keeps a single request open (answered
       at once when something happens, else after `wait` ≤ 25 s), however many chats.
       `boot` changes when the worker restarts (seqs start again): start over at 0.
  GET  /api/chats   → {chats: [{name, agents: [{id, name, folder}], last_activity}]},
       newest activity first; `last_activity` in seconds since the epoch (as `at`), or
       null.
  GET  /api/agents  → {agents: [{id, name, folder}]}: the agent groups a chat may use.
  POST /api/chats   {name, agent?} → 201 {ok, chat}; `agent` is an agent group's id (or
       folder). 400 for a bad name, 404 for an unknown agent, 409 when the chat exists;
       a refused or failed create leaves nothing behind.
  POST /api/send    {chat?, text, id?, files?}   → {ok, id}; `files`: [{name, type?,
       data (base64)}], at most MAX_FILES of MAX_FILE_BYTES together; `text` may be
       empty when files are sent.
  POST /api/answer  {chat?, question_id, index}  → {ok, option}
  GET  /api/whatsapp → {state, qr?}: WhatsApp Web's link state; while
       `nanoclaw channels login whatsapp` waits, `qr` is the code as an SVG image, so
       the page shows it to scan (refreshed as the login replaces it).
  (`chat` defaults to `local`.)
The console's views (status, usage, approvals, errors, files) are `web_console.py`'s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from nanoclaw import jsonin
from nanoclaw.channels.text import parse_question
from nanoclaw.db.store import Store
from nanoclaw.log import logger
from nanoclaw.util import new_id, parse_iso

STATIC = Path(__file__).with_name("web_static")
CHAT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
MSG_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
MAX_TEXT = 100_000
MAX_FILES, MAX_FILE_BYTES = 10, 8 << 20  # files per message, their bytes together
MAX_BODY = MAX_FILE_BYTES * 4 // 3 + (1 << 20)  # as base64 in JSON, plus the text
FILE_NAME = re.compile(r"^[^/\\\x00-\x1f]{1,128}\Z")
LONG_POLL = 25.0


def ensure_web_chat(store: Store, chat: str) -> None:
    """A web chat belongs to the local owner, like the terminal: on first use it is
    wired to the same agents as the default terminal chat (`cli:local`)."""
    if store.messaging_group("web", chat) is not None:
        return
    create_web_chat(store, chat)
    logger.info("web chat {} wired like the terminal", chat)


def create_web_chat(store: Store, chat: str, agents: list[str] | None = None) -> str:
    """Make `web:<chat>` wired to `agents` (agent group ids), or, given None, to the
    same agents as `cli:local`. Undone when a wiring fails: nothing is left half-made.
    Raises sqlite3.IntegrityError when the chat exists."""
    if agents is None:
        base = store.messaging_group("cli", "local")
        agents = [w["agent_group_id"] for w in store.wirings(base["id"])] if base else []
    mg = store.create_messaging_group("web", chat, f"web {chat}", is_group=False)
    try:
        for ag in agents:
            store.wire(mg, ag, destination="web" if chat == "local" else f"web-{chat}")
    except Exception:
        store.delete_messaging_group(mg)
        raise
    return mg


QR_FRESH = 90.0  # seconds a WhatsApp QR code stays worth showing (they expire in ~60)


class WebApi:
    """The handlers; the state they use (store, token, events, host...) is the channel's."""

    store: Store
    settings: Any
    host: Any
    token: str
    owner: str
    user: str
    boot: str
    events: dict[str, list[dict[str, Any]]]
    changed: asyncio.Condition

    def _push(self, chat: str, event: dict[str, Any]) -> dict[str, Any]: ...  # the channel's

    async def _notify(self) -> None: ...  # the channel's

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._page)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/chats", self._chats)
        app.router.add_post("/api/chats", self._create_chat)
        app.router.add_get("/api/agents", self._agents)
        app.router.add_post("/api/send", self._send)
        app.router.add_post("/api/answer", self._answer)
        app.router.add_get("/api/whatsapp", self._whatsapp)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if host.rsplit(":", 1)[0].strip("[]") not in (
                "127.0.0.1", "localhost", "::1", self.settings.web_host):
            return web.json_response({"error": "wrong host"}, status=421)
        if request.path.startswith("/api/"):
            auth = request.headers.get("Authorization", "")
            given = auth[7:] if auth.startswith("Bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return web.json_response({"error": "a valid token is needed"}, status=401)
        resp = await handler(request)
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self';"
            " connect-src 'self'; frame-ancestors 'none'")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    async def _whatsapp(self, request: web.Request) -> web.StreamResponse:
        """The link state the WhatsApp login and channel write (status.json, ours)."""
        path = self.settings.data_dir / "channels" / "whatsapp" / "status.json"
        try:
            st = json.loads(path.read_text()[:65536])
        except (OSError, ValueError):
            return web.json_response({"state": "none"})
        out: dict[str, Any] = {"state": str(st.get("state", "?"))}
        code = st.get("qr")
        if out["state"] == "qr" and isinstance(code, str) and 0 < len(code) <= 1024 and (
                time.time() - float(st.get("at") or 0) < QR_FRESH):
            import segno

            out["qr"] = segno.make(code, error="l").svg_data_uri(scale=4, border=2)
        return web.json_response(out)

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object; 400 with a one-line reason for anything else
        (malformed, badly encoded, nested too deep: jsonin)."""
        try:
            body = jsonin.loads(await request.text())
        except jsonin.BadJSON as e:
            raise _bad(str(e)) from None
        except (UnicodeDecodeError, LookupError):  # a body or charset that will not decode
            raise _bad("malformed JSON: the body does not decode as its charset") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        try:  # a lone surrogate (`"\\ud800"`) is no text: the store could not bind it
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise _bad("malformed JSON: a string holds a lone surrogate, not text") from None
        return body

    def _chat(self, value: Any) -> str:
        chat = "local" if value is None else value
        if not isinstance(chat, str) or not CHAT_NAME.match(chat):
            raise _bad("chat must be 1-64 letters, digits, '-' or '_'")
        return chat

    async def _events(self, request: web.Request) -> web.Response:
        chat = request.query.get("chat")
        chat = None if chat is None else self._chat(chat)
        try:
            after = int(request.query.get("after", "0"))
            wait = min(LONG_POLL, max(0.0, float(request.query.get("wait", LONG_POLL))))
        except ValueError:
            raise _bad("after and wait must be numbers") from None
        self.host.kick(chat)

        def fresh() -> list[dict[str, Any]]:
            bufs = [self.events.get(chat, [])] if chat else list(self.events.values())
            out = [e for buf in bufs for e in _since(buf, after)]
            return sorted(out, key=lambda e: e["seq"]) if len(bufs) > 1 else out

        async with self.changed:
            if not fresh() and wait:
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: bool(fresh())), wait)
                except asyncio.TimeoutError:
                    pass
            out = fresh()
        return web.json_response({"events": out, "next": out[-1]["seq"] if out else after,
                                  "user": self.user, "boot": self.boot})

    def _chat_list(self) -> list[dict[str, Any]]:
        """The web chats: those in the DB, `local` (made on first use, wired like the
        terminal) and any a reply reached by name; newest activity first."""
        out: dict[str, dict[str, Any]] = {}
        for c in self.store.channel_chats("web"):
            out[c["platform_id"]] = {"name": c["platform_id"], "agents": c["agents"],
                                     "last_activity": _epoch(c["last_activity"])}
        if "local" not in out:
            base = self.store.messaging_group("cli", "local")
            out["local"] = {"name": "local", "last_activity": None, "agents": [
                {"id": w["agent_group_id"], "name": w["agent_name"], "folder": w["folder"]}
                for w in (self.store.wirings(base["id"]) if base else [])]}
        for chat, buf in self.events.items():
            c = out.setdefault(chat, {"name": chat, "agents": [], "last_activity": None})
            last = max((e["at"] for e in buf if e["type"] != "typing"), default=None)
            if last is not None and last > (c["last_activity"] or 0):
                c["last_activity"] = last
        return sorted(out.values(), key=lambda c: (-(c["last_activity"] or 0), c["name"]))

    async def _chats(self, request: web.Request) -> web.Response:
        return web.json_response({"chats": self._chat_list()})

    async def _agents(self, request: web.Request) -> web.Response:
        return web.json_response({"agents": self.store.agent_groups()})

    async def _create_chat(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name, agent = body.get("name"), body.get("agent")
        if not isinstance(name, str) or not CHAT_NAME.match(name):
            raise _bad("a chat name is 1-64 letters, digits, '-' or '_', starting with a"
                       " letter or digit")
        if agent is not None and (not isinstance(agent, str) or not agent):
            raise _bad("agent must be an agent group's id (GET /api/agents lists them)")
        ag = None
        if agent is not None:
            ag = next((g for g in self.store.agent_groups() if agent in (g["id"], g["folder"])),
                      None)
            if ag is None:
                return web.json_response(
                    {"error": f"unknown agent group {agent!r} (GET /api/agents lists them)"},
                    status=404)
        conflict = web.json_response({"error": f"a chat named {name!r} exists already"},
                                     status=409)
        if name == "local" or self.store.messaging_group("web", name) is not None:
            return conflict
        try:
            create_web_chat(self.store, name, [ag["id"]] if ag else None)
        except sqlite3.IntegrityError:
            if self.store.messaging_group("web", name) is not None:
                return conflict  # made meanwhile by someone else (the admin CLI)
            raise  # a wiring failed (e.g. its agent group was removed meanwhile): undone
        logger.info("web chat {} made, wired to {}", name,
                    ag["folder"] if ag else "the terminal's agents")
        chat = next(c for c in self._chat_list() if c["name"] == name)
        return web.json_response({"ok": True, "chat": chat}, status=201)

    async def _send(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        chat = self._chat(body.get("chat"))
        text = body.get("text", "")
        files = _files(body.get("files"))
        if not isinstance(text, str) or len(text) > MAX_TEXT or not (text.strip() or files):
            raise _bad("text must be a non-empty string of at most 100000 characters")
        mid = body.get("id") or new_id("web")
        if not isinstance(mid, str) or not MSG_ID.match(mid):
            raise _bad("id must be 1-128 letters, digits, '.', '-' or '_'")
        ensure_web_chat(self.store, chat)
        new = await self.host.inbound(chat, mid, {
            "text": text, "sender_id": self.owner, "sender_name": self.user,
            "is_mention": True, "is_group": False, "attachments": files})
        if new:
            self._push(chat, {"type": "message", "id": mid, "text": text,
                              "files": [f["name"] for f in files]})
            await self._notify()
        return web.json_response({"ok": True, "id": mid})

    async def _answer(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        chat = self._chat(body.get("chat"))
        qid, index = body.get("question_id"), body.get("index")
        if not isinstance(qid, str) or not isinstance(index, int) or isinstance(index, bool):
            raise _bad("question_id must be a string and index an integer")
        # only a card shown in this chat, under the host's card id (H3): never the
        # options of another card that an agent gave the same name
        card = parse_question(self.host.question(qid, chat) or {})
        option = card.value(index) if card else None
        if card is None or option is None:
            return web.json_response({"error": "unknown question or option"}, status=404)
        await self.host.inbound(chat, new_id(f"click-{qid}"[:60]), {
            "question_id": qid, "option": option, "user_id": self.owner}, kind="action")
        self._push(chat, {"type": "answered", "question_id": qid,
                          "label": card.selected_label(index)})
        await self._notify()
        return web.json_response({"ok": True, "option": option})


def _files(value: Any) -> list[dict[str, str]]:
    """A message's files as the router's attachments ({name, type, data}); 400 for a
    bad list, name or encoding, or more than MAX_FILES / MAX_FILE_BYTES."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise _bad(f"files must be a list of at most {MAX_FILES} {{name, type?, data}}")
    out, total = [], 0
    for f in value:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or \
                not FILE_NAME.match(f["name"]) or not isinstance(f.get("data"), str):
            raise _bad("each file needs a name (1-128 characters, no '/') and base64 data")
        kind = f.get("type") or "application/octet-stream"
        if not isinstance(kind, str) or len(kind) > 100:
            raise _bad("a file's type must be a MIME type")
        try:
            total += len(base64.b64decode(f["data"], validate=True))
        except (binascii.Error, ValueError):
            raise _bad(f"file {f['name']!r}: data is not base64") from None
        if total > MAX_FILE_BYTES:
            raise _bad(f"files may hold at most {MAX_FILE_BYTES >> 20} MiB together")
        out.append({"name": f["name"], "type": kind, "data": f["data"]})
    return out


def _since(buf: list[dict[str, Any]], after: int) -> list[dict[str, Any]]:
    """The events of one chat's buffer (in seq order) after seq `after`."""
    i = len(buf)
    while i and buf[i - 1]["seq"] > after:
        i -= 1
    return buf[i:]


def _epoch(stamp: str | None) -> float | None:
    try:
        return parse_iso(stamp) if stamp else None
    except ValueError:
        return None


def _bad(msg: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": msg}), content_type="application/json")
