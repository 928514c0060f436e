"""Matrix for the channel tests: a real Synapse (tests/servers/synapse.py, one per test
run) behind `MatrixProxy`, a protocol-level reverse proxy on 127.0.0.1 that forwards
everything and applies FakeServer's scripted misbehaviour to the bot's sends
(`PUT …/rooms/{room}/send/{type}/{txnId}`, method `send`), its /sync (method `sync`)
and records its typing (`typing`). The bot's matrix-nio client talks to the proxy; the
tests' users talk to Synapse directly (plain HTTP here, matrix-nio for E2EE).

`FakeMatrix` is the contract suite's `PlatformFake` over that pair: its users are
registered afresh per instance (so hosts never share an account), each chat is a room
Ann makes and invites the bot to (Ann is a member of the default agent group, so the
bot joins at once), and what the bot sent is read back from the room's history as Ann
sees it, edits and reactions applied."""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.parse
from typing import Any

import aiohttp
from aiohttp import web
from servers.synapse import Account, Synapse, shared

from fakes.base import Call, FakeServer, Rule
from fakes.contract import PlatformFake, Sent

HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
       "accept-encoding"}
CODES = {429: "M_LIMIT_EXCEEDED", 403: "M_FORBIDDEN", 404: "M_NOT_FOUND", 401: "M_UNKNOWN_TOKEN"}


def _error(status: int, retry_after: float | None = None,
           description: str | None = None) -> web.Response:
    body: dict[str, Any] = {"errcode": CODES.get(status, "M_UNKNOWN"),
                            "error": description or f"injected {status}"}
    headers = {}
    if retry_after is not None:
        body["retry_after_ms"] = int(retry_after * 1000)
        headers["Retry-After"] = str(max(1, int(retry_after)))
    return web.json_response(body, status=status, headers=headers)


class MatrixProxy(FakeServer):
    """Forwards every request to `upstream`; sends, syncs and typing go through rules."""

    def __init__(self, upstream: str):
        super().__init__()
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None
        self.replay: list[tuple[str, dict[str, Any]]] = []  # (room, event) for the next sync
        self.frozen = False  # every /sync answered at once with the token it was given

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def forward(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.split("/")
        method, params = None, {}
        if "rooms" in parts and "send" in parts and request.method == "PUT":
            i = parts.index("rooms")
            method = "send"
            params = {"room": urllib.parse.unquote(parts[i + 1]),
                      "type": parts[parts.index("send") + 1], "txn": parts[-1]}
        elif parts[-1] == "sync":
            method = "sync"
        elif "typing" in parts and request.method == "PUT":
            method = "typing"
            params = {"room": urllib.parse.unquote(parts[parts.index("rooms") + 1])}
        if method is not None:
            bad = await self.misbehave(request, method, params, _error)
            if bad is not None:
                return bad
        if method == "sync" and self.frozen:
            self.record("sync", {}, "frozen")
            since = request.query.get("since") or "s0"
            return web.json_response({"next_batch": since, "rooms": {"join": {
                "!busy:localhost": {"timeline": {"events": [], "limited": False}}}}})
        body = await request.read()
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with self.session.request(request.method, self.upstream + request.path_qs,
                                        data=body or None, headers=headers) as r:
            data = await r.read()
            status, ctype = r.status, r.headers.get("Content-Type", "application/json")
            extra = {k: v for k, v in r.headers.items()
                     if k.lower() in ("content-disposition",)}
        if method == "sync" and status == 200 and self.replay:
            data = self._with_replay(data)
        if method in ("send", "typing"):
            from fakes.base import HOLD

            self.record(method, params, "landed-stalled" if request.get(HOLD) else
                        ("ok" if status == 200 else f"upstream:{status}"))
        return web.Response(body=data, status=status, headers={"Content-Type": ctype, **extra})

    def _with_replay(self, data: bytes) -> bytes:
        """The next sync carries the replayed events again, before its own."""
        got = json.loads(data)
        with self.lock:
            replay, self.replay = self.replay, []
        for room, ev in replay:
            tl = got.setdefault("rooms", {}).setdefault("join", {}).setdefault(
                room, {}).setdefault("timeline", {"events": [], "limited": False})
            tl.setdefault("events", []).insert(0, ev)
        return json.dumps(got).encode()

    def stop(self) -> None:
        if self.loop is not None and self.session is not None:
            try:
                self.run(self.session.close())
            except Exception:
                pass
        super().stop()


class Users:
    """The tests' side of Synapse, as plain client-server calls."""

    def __init__(self, synapse: Synapse):
        self.hs = synapse

    def create_room(self, who: Account, invite: list[str], direct: bool = True,
                    encrypted: bool = False, name: str | None = None) -> str:
        body: dict[str, Any] = {"preset": "private_chat", "invite": invite, "is_direct": direct}
        if name:
            body["name"] = name
        if encrypted:
            body["initial_state"] = [{"type": "m.room.encryption", "state_key": "",
                                      "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]
        return self.hs.call("POST", "/_matrix/client/v3/createRoom", body,
                            who.access_token)["room_id"]

    def send(self, who: Account, room: str, content: dict[str, Any],
             etype: str = "m.room.message") -> str:
        txn = secrets.token_hex(8)
        path = f"/_matrix/client/v3/rooms/{_q(room)}/send/{etype}/{txn}"
        return self.hs.call("PUT", path, content, who.access_token)["event_id"]

    def say(self, who: Account, room: str, text: str, thread: str | None = None,
            **extra: Any) -> str:
        content: dict[str, Any] = {"msgtype": "m.text", "body": text, **extra}
        if thread:
            content["m.relates_to"] = {"rel_type": "m.thread", "event_id": thread,
                                       "is_falling_back": True,
                                       "m.in_reply_to": {"event_id": thread}}
        return self.send(who, room, content)

    def upload(self, who: Account, name: str, data: bytes, mime: str) -> str:
        import urllib.request

        req = urllib.request.Request(
            f"{self.hs.url}/_matrix/media/v3/upload?filename={_q(name)}", data=data,
            method="POST", headers={"Content-Type": mime,
                                    "Authorization": f"Bearer {who.access_token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["content_uri"]

    def download(self, who: Account, mxc: str) -> bytes:
        import urllib.request

        server, media = mxc[len("mxc://"):].split("/", 1)
        req = urllib.request.Request(
            f"{self.hs.url}/_matrix/client/v1/media/download/{server}/{media}",
            headers={"Authorization": f"Bearer {who.access_token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def members(self, who: Account, room: str) -> set[str]:
        got = self.hs.call("GET", f"/_matrix/client/v3/rooms/{_q(room)}/joined_members",
                           None, who.access_token)
        return set(got.get("joined", {}))

    def event(self, who: Account, room: str, event_id: str) -> dict[str, Any]:
        return self.hs.call("GET", f"/_matrix/client/v3/rooms/{_q(room)}/event/{_q(event_id)}",
                            None, who.access_token)

    def history(self, who: Account, room: str) -> list[dict[str, Any]]:
        got = self.hs.call("GET", f"/_matrix/client/v3/rooms/{_q(room)}/messages?dir=b"
                           "&limit=1000", None, who.access_token)
        return list(reversed(got.get("chunk", [])))

    def bot_sent(self, who: Account, room: str, bot: str,
                 thread: str | None = None) -> list[Sent]:
        """The bot's messages in a room as `who` sees them: edits applied, reactions on."""
        events = self.history(who, room)
        shown: dict[str, Sent] = {}
        order: list[str] = []
        for ev in events:
            if ev.get("sender") != bot:
                continue
            c = ev.get("content") or {}
            rel = c.get("m.relates_to") or {}
            if ev.get("type") == "m.reaction":
                target = shown.get(rel.get("event_id"))
                if target is not None:
                    target.reactions.append(rel.get("key"))
                continue
            if ev.get("type") != "m.room.message":
                continue
            if rel.get("rel_type") == "m.replace":
                target = shown.get(rel.get("event_id"))
                new = c.get("m.new_content") or {}
                if target is not None:
                    target.text = new.get("body", "")
                    target.raw = {**target.raw, "edited": new}
                    target.buttons = _numbered(target.text)
                continue
            files = []
            if c.get("msgtype") in ("m.file", "m.image") and c.get("url"):
                files = [(c.get("filename") or c.get("body"), self.download(who, c["url"]))]
            in_thread = rel.get("event_id") if rel.get("rel_type") == "m.thread" else None
            reply = (rel.get("m.in_reply_to") or {}).get("event_id") \
                if not rel.get("is_falling_back") else None
            s = Sent(ev["event_id"], c.get("body", ""), in_thread, reply,
                     _numbered(c.get("body", "")), files, [], ev)
            shown[ev["event_id"]] = s
            order.append(ev["event_id"])
        out = [shown[e] for e in order]
        return [s for s in out if thread is None or s.thread == thread]


def _numbered(body: str) -> list[tuple[str, str]]:
    """A question card's numbered options, as (label, the number to send)."""
    if "Reply with the number." not in body and "Chosen:" not in body:
        return []
    return [(line.split(". ", 1)[1], line.split(". ", 1)[0]) for line in body.splitlines()
            if line[:1].isdigit() and ". " in line]


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


class FakeMatrix(PlatformFake):
    channel = "matrix"
    limit = 8_000          # characters of body per event (MatrixChannel's LIMIT)
    typing = True
    reply_refs = True      # an answer to a top-level message carries m.in_reply_to
    threads = True         # m.thread
    edit_events = True     # m.replace reaches the bot as an event
    bot_edits = True
    bot_reactions = True   # m.annotation
    idempotent_sends = True  # the txnId is the part's key: Synapse answers a repeat with
    #                          the event it made already

    def __init__(self, synapse: Synapse | None = None):
        self.hs = synapse
        self.proxy: MatrixProxy | None = None
        self.rooms: dict[int, str] = {}
        self.lock = threading.Lock()
        self.last: tuple[str, str] | None = None  # (room, event id) of the last user event
        self.prepared: set[int] = set()

    # ---- FakeServer's surface, delegated to the proxy ---------------------------------
    def start(self) -> "FakeMatrix":
        if self.hs is None:
            from servers.synapse import PYTHON

            if not PYTHON.exists():
                import pytest

                pytest.skip(f"no Synapse venv at {PYTHON} (make test-servers)")
            self.hs = shared()
        self.users = Users(self.hs)
        tag = secrets.token_hex(3)
        self.bot = self.hs.register(f"bot-{tag}", "Claw")
        self.ann = self.hs.register(f"ann-{tag}", "Ann")
        self.user = f"matrix:{self.ann.user_id}"
        self.proxy = MatrixProxy(self.hs.url).start()  # type: ignore[assignment]
        return self

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()

    def inject(self, *a: Any, **kw: Any) -> Rule:
        assert self.proxy is not None
        return self.proxy.inject(*a, **kw)

    def release(self) -> None:
        assert self.proxy is not None
        self.proxy.release()

    def calls_of(self, method: str, outcome: str | None = "ok") -> list[Call]:
        assert self.proxy is not None
        return self.proxy.calls_of(method, outcome)

    # ---- set-up -------------------------------------------------------------------------
    def host_env(self, **extra: str) -> dict[str, str]:
        assert self.proxy is not None
        return {"MATRIX_HOMESERVER": self.proxy.url, "MATRIX_ACCESS_TOKEN": self.bot.access_token,
                **extra}

    def connected(self, host: Any) -> bool:
        key = id(host)
        if key not in self.prepared:
            allow(host, self.ann.user_id)
            self.prepared.add(key)
        rows = host.q("SELECT value FROM host_state WHERE key='matrix:next_batch'")
        return bool(rows and rows[0]["value"])

    def chat(self, n: int) -> str:
        with self.lock:
            if n in self.rooms:
                return self.rooms[n]
        room = self.users.create_room(self.ann, [self.bot.user_id])
        deadline = time.monotonic() + 30
        while self.bot.user_id not in self.users.members(self.ann, room):
            if time.monotonic() > deadline:
                raise AssertionError(f"the bot did not join {room}")
            time.sleep(0.05)
        with self.lock:
            self.rooms[n] = room
        return room

    def new_thread(self, chat: str) -> str:
        # a notice: bots do not answer one another's notices, so the root stays unanswered
        return self.users.send(self.ann, chat, {"msgtype": "m.notice",
                                                "body": "a thread's first message"})

    # ---- users --------------------------------------------------------------------------
    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        if file is None:
            eid = self.users.say(self.ann, chat, text, thread)
        else:
            name, data, mime = file
            mxc = self.users.upload(self.ann, name, data, mime)
            content: dict[str, Any] = {"msgtype": "m.file", "body": text, "filename": name,
                                       "url": mxc, "info": {"mimetype": mime,
                                                            "size": len(data)}}
            if thread:
                content["m.relates_to"] = {"rel_type": "m.thread", "event_id": thread}
            eid = self.users.send(self.ann, chat, content)
        self.last = (chat, eid)
        return eid

    def user_edits(self, chat: str, message_id: str, text: str) -> str:
        new = {"msgtype": "m.text", "body": text}
        eid = self.users.send(self.ann, chat, {
            "msgtype": "m.text", "body": f"* {text}", "m.new_content": new,
            "m.relates_to": {"rel_type": "m.replace", "event_id": message_id}})
        self.last = (chat, eid)
        return eid

    def redeliver_last(self) -> None:
        assert self.last is not None and self.proxy is not None
        room, eid = self.last
        ev = self.users.event(self.ann, room, eid)
        with self.proxy.lock:
            self.proxy.replay.append((room, ev))

    def press(self, chat: str, card: Sent, index: int) -> None:
        self.users.say(self.ann, chat, card.buttons[index][1], card.thread)

    # ---- what the bot did ---------------------------------------------------------------
    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        return self.users.bot_sent(self.ann, chat, self.bot.user_id, thread)

    def send_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("send", None) if c.params.get("room") == chat
                and c.params.get("type") == "m.room.message"]

    def typing_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("typing", None) if c.params.get("room") == chat]

    # ---- misbehaviour -------------------------------------------------------------------
    def rate_limit(self, chat: str, seconds: float) -> Rule:
        return self.inject("send", status=429, retry_after=seconds, room=chat)

    def fail_sends(self, chat: str, count: int) -> Rule:
        return self.inject("send", count=count, status=500, room=chat)

    def refuse_sends(self, chat: str) -> Rule:
        return self.inject("send", status=403, room=chat)

    def land_then_stall(self, chat: str) -> Rule:
        return self.inject("send", land_then_stall=True, room=chat)


def allow(host: Any, mxid: str) -> None:
    """Make a Matrix user a member of the default agent group (`main`): the bot joins
    their invites at once."""
    from dbread import db_row

    from nanoclaw.db.store import Store

    store = Store.open(host.data)
    try:
        ag = db_row(store, "SELECT id FROM agent_groups WHERE folder='main'")["id"]
        uid = f"matrix:{mxid}"
        store.ensure_user(uid, "matrix", None)
        store.add_member(uid, ag, "test")
    finally:
        store.close()
