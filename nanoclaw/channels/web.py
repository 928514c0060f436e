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
  POST /api/send    {chat?, text, id?}           → {ok, id}
  POST /api/answer  {chat?, question_id, index}  → {ok, option}
  (`chat` defaults to `local`.)

Each chat's recent history is rebuilt from the central DB at start-up, so a restart
of the worker (or a reload of the page) shows the conversation so far.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import secrets
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from nanoclaw import jsonin
from nanoclaw.channels.base import Channel, OutboundMessage, SendError
from nanoclaw.channels.text import card_links, parse_question, plain_text, reply_target
from nanoclaw.db.store import Store
from nanoclaw.log import logger, terminal
from nanoclaw.util import local_user_id, new_id, parse_iso

STATIC = Path(__file__).with_name("web_static")
CHAT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
MSG_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
MAX_TEXT = 100_000
KEEP = 500          # events kept per chat
HISTORY = 200       # events rebuilt from the DB per chat at start-up
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


class WebChannel(Channel):
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
        app = web.Application(client_max_size=2 << 20, middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/chats", self._chats)
        app.router.add_post("/api/chats", self._create_chat)
        app.router.add_get("/api/agents", self._agents)
        app.router.add_post("/api/send", self._send)
        app.router.add_post("/api/answer", self._answer)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        self.port = await self._listen()
        shown = "127.0.0.1" if self.settings.web_host in ("127.0.0.1", "0.0.0.0") else \
            self.settings.web_host
        self.url = f"http://{shown}:{self.port}/"
        self.store.set_state("web_url", self.url)
        # the token admits as the owner: on the terminal only, never in logs/ (H4)
        terminal("web chat: open {}#token={} in a browser", self.url, self.token)
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
        rows = self.store.q(
            "SELECT * FROM (SELECT received_at AS at, platform_id, 'in' AS dir, message_id AS id,"
            " kind, payload AS body FROM inbound_events WHERE channel_type='web' UNION ALL"
            " SELECT COALESCE(sent_at, created_at), platform_id, 'out', idem_key, kind, content"
            " FROM channel_outbox WHERE channel_type='web' AND status='sent')"
            " ORDER BY at DESC LIMIT ?", (HISTORY * 4,))
        for r in reversed(rows):
            try:
                body = jsonin.loads(r["body"])  # outbox content comes from agents
                at = parse_iso(r["at"])
            except ValueError:
                continue
            if r["dir"] == "in" and r["kind"] == "chat":
                self._push(r["platform_id"], {"type": "message", "id": r["id"], "at": at,
                                              "text": body.get("text", "")})
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
            return {"type": "edit", "id": str(c.get("messageId")), "text": str(c.get("text") or "")}
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
        files = [{"name": str(f.get("name") or "file"), "data": f["data"]}
                 for f in c.get("files") or [] if isinstance(f, dict) and f.get("data")]
        return {"type": "reply", "id": mid, "text": plain_text(c),
                "links": [{"label": a, "url": u} for a, u in card_links(c)], "files": files,
                "in_reply_to": reply_target(in_reply_to)}

    # ---- HTTP -------------------------------------------------------------------------
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
        text = body.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            raise _bad("text must be a non-empty string of at most 100000 characters")
        mid = body.get("id") or new_id("web")
        if not isinstance(mid, str) or not MSG_ID.match(mid):
            raise _bad("id must be 1-128 letters, digits, '.', '-' or '_'")
        ensure_web_chat(self.store, chat)
        new = await self.host.inbound(chat, mid, {
            "text": text, "sender_id": self.owner, "sender_name": self.user,
            "is_mention": True, "is_group": False})
        if new:
            self._push(chat, {"type": "message", "id": mid, "text": text})
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
        self._push(platform_id, ev)
        await self._notify()
        return ev.get("id") if ev["type"] in ("reply", "card") else str(ev.get("id"))

    async def set_typing(self, platform_id: str, thread_id: str | None) -> None:
        self._push(platform_id, {"type": "typing"})
        await self._notify()

    async def open_dm(self, handle: str) -> str:
        return "local"  # the page has one user: the owner


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

