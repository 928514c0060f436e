"""A fake Webex on 127.0.0.1 for the real `webex` channel: the REST API (`/v1`), the
device registration (`/wdm/devices`) and the device WebSocket it names (`/ws/<n>`),
and, for webhook mode, `WebexSender`, which signs webhooks (`X-Spark-Signature`,
HMAC-SHA1) and POSTs them to the host's door, retrying until 2xx.

Routes (calls recorded under the names in brackets):
- `GET /v1/people/me` [me], `GET /v1/people/{id}` [person];
- `POST /v1/messages` [messages]: JSON or multipart (`files`, one); markdown/text over
  7,439 bytes answers 400; `toPersonId` posts to that person's direct room;
- `GET /v1/messages` [list] (`roomId`, `max`: newest first), `GET /v1/messages/{id}`
  [get], `PUT /v1/messages/{id}` [update], `GET /v1/attachment/actions/{id}` [action],
  `GET /v1/contents/{id}` [download];
- `POST /wdm/devices` [device] → `webSocketUrl`; the socket [ws] wants the authorization
  frame with the bot token first (else it closes), then gets `conversation.activity`
  frames for what users do (`mode="websocket"`; with `mode="webhook"` the sender
  POSTs instead). A `forget_devices()` makes the old socket URLs answer 404.
Every REST call wants `Authorization: Bearer <token>`; errors have Webex's shape
`{"message", "trackingId"}`; `inject` scripts a status (with Retry-After), a stall or a
dropped connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Callable

from aiohttp import web

from fakes.base import Call, FakeServer, Rule
from fakes.contract import PlatformFake, Sent
from nanoclaw.channels.webex_api import rest_id

TOKEN = "webex-bot-token"
SECRET = "webex-webhook-secret"
BOT = "PERSON-BOT"
ANN = "PERSON-ANN"
CARD = "application/vnd.microsoft.card.adaptive"


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class FakeWebex(FakeServer, PlatformFake):
    channel = "webex"
    limit = 7_000
    typing = False
    reply_refs = False
    threads = True
    edit_events = False
    bot_edits = True
    bot_reactions = False
    user = f"webex:{ANN}"

    def __init__(self, mode: str = "websocket") -> None:
        super().__init__()
        self.mode = mode
        self.messages: dict[str, dict[str, Any]] = {}   # every message, by REST id
        self.actions: dict[str, dict[str, Any]] = {}
        self.files: dict[str, tuple[str, bytes, str]] = {}
        self.sockets: list[web.WebSocketResponse] = []
        self.devices: set[str] = set()
        self.ids = itertools.count(1)
        self.sender: WebexSender | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/v1/people/me", self._me)
        app.router.add_get("/v1/people/{pid}", self._person)
        app.router.add_post("/v1/messages", self._create)
        app.router.add_get("/v1/messages", self._list)
        app.router.add_get("/v1/messages/{mid}", self._get)
        app.router.add_put("/v1/messages/{mid}", self._update)
        app.router.add_get("/v1/attachment/actions/{aid}", self._action)
        app.router.add_get("/v1/contents/{fid}", self._download)
        app.router.add_post("/wdm/devices", self._device)
        app.router.add_get("/ws/{dev}", self._ws)
        return app

    def _error(self, status: int, retry_after: float | None = None,
               description: str | None = None) -> web.Response:
        headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else {}
        return web.json_response({"message": description or "scripted",
                                  "trackingId": "fake"}, status=status, headers=headers)

    def _ok(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    # ---- REST ------------------------------------------------------------------------------
    async def _me(self, request: web.Request) -> web.Response:
        if not self._ok(request):
            return self._error(401)
        self.record("me", {})
        return web.json_response({"id": BOT, "displayName": "Claw", "type": "bot",
                                  "emails": ["claw@webex.bot"]})

    async def _person(self, request: web.Request) -> web.Response:
        if not self._ok(request):
            return self._error(401)
        self.record("person", {"id": request.match_info["pid"]})
        return web.json_response({"id": request.match_info["pid"], "displayName": "Ann"})

    async def _create(self, request: web.Request) -> web.Response:
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            body: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
            f = form.get("files")
            file = (f.filename, f.file.read(), f.content_type) if hasattr(f, "file") else None
        else:
            body, file = await request.json(), None
        room = body.get("roomId") or (f"DM-{body['toPersonId']}" if body.get("toPersonId")
                                      else None)
        params = {"room": room, "thread": body.get("parentId"), "markdown": body.get("markdown")}
        if not self._ok(request):
            self.record("messages", params, "injected:401")
            return self._error(401)
        if (r := await self.misbehave(request, "messages", params, self._error)) is not None:
            return r
        text = str(body.get("markdown") or body.get("text") or "")
        if not room or len(text.encode()) > 7439 or not (text or file or body.get(
                "attachments")):
            self.record("messages", params, "injected:400")
            return self._error(400, description="Message too long or empty")
        m = self.add(room, BOT, text, parent=body.get("parentId"), file=file,
                     attachments=body.get("attachments"))
        self.record("messages", {**params, "id": m["id"]})
        return web.json_response(m)

    async def _list(self, request: web.Request) -> web.Response:
        if not self._ok(request):
            return self._error(401)
        room = request.query.get("roomId")
        self.record("list", {"room": room})
        with self.lock:
            items = [m for m in self.messages.values() if m["roomId"] == room]
        items.sort(key=lambda m: m["created"], reverse=True)
        return web.json_response({"items": items[:int(request.query.get("max", "50"))]})

    async def _get(self, request: web.Request) -> web.Response:
        mid = request.match_info["mid"]
        if not self._ok(request):
            return self._error(401)
        if (r := await self.misbehave(request, "get", {"id": mid}, self._error)) is not None:
            return r
        self.record("get", {"id": mid})
        m = self.messages.get(mid)
        return web.json_response(m) if m else self._error(404)

    async def _update(self, request: web.Request) -> web.Response:
        mid, body = request.match_info["mid"], await request.json()
        if not self._ok(request):
            return self._error(401)
        if (r := await self.misbehave(request, "update", {"id": mid}, self._error)):
            return r
        with self.lock:
            m = self.messages.get(mid)
            if m is None or m["roomId"] != body.get("roomId") or m["personId"] != BOT:
                self.record("update", {"id": mid}, "injected:400")
                return self._error(400)
            m["markdown"] = m["text"] = body.get("markdown") or body.get("text") or ""
            m.pop("attachments", None)
        self.record("update", {"id": mid})
        return web.json_response(m)

    async def _action(self, request: web.Request) -> web.Response:
        if not self._ok(request):
            return self._error(401)
        self.record("action", {"id": request.match_info["aid"]})
        a = self.actions.get(request.match_info["aid"])
        return web.json_response(a) if a else self._error(404)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        if not self._ok(request):
            return self._error(401)
        fid = request.match_info["fid"]
        self.record("download", {"id": fid})
        if fid not in self.files:
            return self._error(404)
        name, data, mime = self.files[fid]
        return web.Response(body=data, content_type=mime, headers={
            "Content-Disposition": f'attachment; filename="{name}"'})

    # ---- the device and its socket ------------------------------------------------------------
    async def _device(self, request: web.Request) -> web.Response:
        if not self._ok(request):
            return self._error(401)
        dev = f"dev{next(self.ids)}"
        self.devices.add(dev)
        self.record("device", {"id": dev})
        return web.json_response({"url": f"{self.url}/wdm/devices/{dev}",
                                  "webSocketUrl": f"ws://127.0.0.1:{self.port}/ws/{dev}"})

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["dev"] not in self.devices:
            self.record("ws", {"dev": request.match_info["dev"]}, "injected:404")
            return web.Response(status=404)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            first = await ws.receive_json(timeout=10)
        except (ValueError, asyncio.TimeoutError, TypeError):
            await ws.close(code=4400)
            return ws
        if first.get("type") != "authorization" or first.get("data", {}).get(
                "token") != f"Bearer {TOKEN}":
            self.record("ws", {"auth": False}, "injected:401")
            await ws.close(code=4401)
            return ws
        self.record("ws", {"auth": True})
        self.sockets.append(ws)
        try:
            async for _ in ws:
                pass
        finally:
            if ws in self.sockets:
                self.sockets.remove(ws)
        return ws

    def forget_devices(self) -> None:
        self.devices.clear()

    def online(self) -> bool:
        return bool(self.sockets)

    async def _push(self, frame: dict[str, Any]) -> int:
        n = 0
        for ws in list(self.sockets):
            try:
                await ws.send_json(frame)
                n += 1
            except Exception:
                pass
        return n

    def drop_sockets(self) -> None:
        async def _drop() -> None:
            for ws in list(self.sockets):
                await ws.close()
        self.run(_drop())

    # ---- users ----------------------------------------------------------------------------------
    def add(self, room: str, person: str, text: str, *, parent: str | None = None,
            file: tuple[str, bytes, str] | None = None, attachments: Any = None,
            direct: bool | None = None, mentions: bool = False) -> dict[str, Any]:
        u = str(uuid.uuid4())
        mid = rest_id("MESSAGE", u)
        direct = room.startswith("DM-") if direct is None else direct
        m: dict[str, Any] = {"id": mid, "uuid": u, "roomId": room,
                             "roomType": "direct" if direct else "group", "personId": person,
                             "personEmail": "ann@example.com" if person == ANN else
                             "claw@webex.bot", "text": text, "markdown": text,
                             "created": now_iso()}
        if parent:
            m["parentId"] = parent
        if mentions:
            m["mentionedPeople"] = [BOT]
        if attachments:
            m["attachments"] = attachments
        if file:
            fid = f"F{next(self.ids)}"
            self.files[fid] = file
            m["files"] = [f"{self.url}/v1/contents/{fid}"]
        with self.lock:
            self.messages[mid] = m
        return m

    def notify(self, m: dict[str, Any], verb: str = "post", resource: str = "messages",
               oid: str | None = None) -> None:
        """Tell the bot, as Webex does: a frame on the socket, or a signed webhook."""
        if self.mode == "webhook":
            assert self.sender is not None
            self.sender.deliver({"resource": resource, "event": "created", "data": {
                "id": oid or m["id"], "roomId": m["roomId"], "personId": m["personId"]}})
            return
        frame = {"id": str(uuid.uuid4()), "data": {"eventType": "conversation.activity",
                                                   "activity": {"id": m["uuid"], "verb": verb,
                                                                "actor": {"id": m["personId"]},
                                                                "target": {"id": m["roomId"]}}}}
        deadline = time.time() + 60
        while self.run(self._push(frame)) == 0:  # a connected device gets it
            if time.time() > deadline:
                raise AssertionError("no device socket to tell")
            time.sleep(0.05)

    def say(self, room: str, text: str, **kw: Any) -> dict[str, Any]:
        m = self.add(room, ANN, text, **kw)
        self.notify(m, "share" if kw.get("file") else "post")
        return m

    def submit(self, room: str, card_message: dict[str, Any], index: int,
               person: str = ANN) -> dict[str, Any]:
        data = card_message["attachments"][0]["content"]["actions"][index]["data"]
        u = str(uuid.uuid4())
        aid = rest_id("ATTACHMENT_ACTION", u)
        a = {"id": aid, "type": "submit", "messageId": card_message["id"], "inputs": data,
             "personId": person, "roomId": room, "created": now_iso()}
        self.actions[aid] = a
        self.notify({"uuid": u, "roomId": room, "personId": person}, "cardAction",
                    "attachmentActions", aid)
        return a

    # ---- PlatformFake ---------------------------------------------------------------------------
    def attach(self, host: Any) -> "WebexSender":
        if self.sender is None:
            self.sender = WebexSender(lambda: door_url(host))
        return self.sender

    def host_env(self) -> dict[str, str]:
        env = {"WEBEX_BOT_TOKEN": TOKEN, "WEBEX_API_BASE": f"{self.url}/v1",
               "WEBEX_DEVICE_URL": f"{self.url}/wdm/devices"}
        if self.mode == "webhook":
            env.update(WEBEX_MODE="webhook", WEBEX_WEBHOOK_SECRET=SECRET,
                       NANOCLAW_WEBHOOK_PORT="0")
        return env

    def connected(self, host: Any) -> bool:
        if self.mode == "webhook":
            self.attach(host)
            return bool(self.calls_of("me")) and door_url(host) is not None
        return self.online()

    def chat(self, n: int) -> str:
        return f"ROOM{n}"

    def new_thread(self, chat: str) -> str:
        return self.add(chat, ANN, "a thread's first message")["id"]

    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        return self.say(chat, text, parent=thread, file=file)["id"]

    def redeliver_last(self) -> None:
        with self.lock:
            last = max((m for m in self.messages.values() if m["personId"] == ANN),
                       key=lambda m: m["created"])
        self.notify(last)

    def press(self, chat: str, card: Sent, index: int) -> None:
        self.submit(chat, card.raw, index)

    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        with self.lock:
            mine = sorted((dict(m) for m in self.messages.values() if m["roomId"] == chat
                           and m["personId"] == BOT), key=lambda m: m["created"])
        out = []
        for m in mine:
            if thread is not None and m.get("parentId") != thread:
                continue
            text, buttons, files = m.get("markdown") or "", [], []
            for a in m.get("attachments") or []:
                if a.get("contentType") == CARD:
                    buttons = [(x["title"], x["data"]["ncq"]) for x in a["content"]["actions"]]
            for url in m.get("files") or []:
                name, data, _ = self.files[url.rpartition("/")[2]]
                files.append((name, data))
            out.append(Sent(m["id"], text, m.get("parentId"), None, buttons, files, [], m))
        return out

    def send_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("messages", None) if c.params.get("room") == chat]

    def typing_calls(self, chat: str) -> list[Call]:
        return []

    def rate_limit(self, chat: str, seconds: float) -> Rule:
        return self.inject("messages", status=429, retry_after=seconds, room=chat)

    def fail_sends(self, chat: str, count: int) -> Rule:
        return self.inject("messages", count=count, status=502, room=chat)

    def refuse_sends(self, chat: str) -> Rule:
        return self.inject("messages", status=403, room=chat,
                           description="The bot is not a member of the room")

    def land_then_stall(self, chat: str) -> Rule:
        return self.inject("messages", land_then_stall=True, room=chat)


def door_url(host: Any) -> str | None:
    try:
        rows = host.q("SELECT value FROM host_state WHERE key='webhook_url'")
    except Exception:
        return None
    return f"{rows[0]['value']}/webhook/webex" if rows and rows[0]["value"] else None


def sign(raw: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), raw, hashlib.sha1).hexdigest()


class WebexSender:
    def __init__(self, url: Callable[[], str | None]):
        self.url = url
        self.last: bytes | None = None
        self.lock = threading.Lock()

    def post(self, raw: bytes, signature: str | None | bool = True, timeout: float = 10) -> int:
        url = self.url()
        if url is None:
            raise ConnectionRefusedError("no door yet")
        h = {"Content-Type": "application/json"}
        if signature is True:
            h["X-Spark-Signature"] = sign(raw)
        elif isinstance(signature, str):
            h["X-Spark-Signature"] = signature
        req = urllib.request.Request(url, data=raw, method="POST", headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def deliver(self, body: dict[str, Any], deadline: float = 60) -> int:
        raw = json.dumps(body).encode()
        with self.lock:
            self.last = raw
        end, attempts = time.time() + deadline, 0
        while True:
            attempts += 1
            try:
                if 200 <= self.post(raw) < 300:
                    return attempts
            except OSError:
                pass
            if time.time() > end:
                raise AssertionError(f"the door never took the webhook after {attempts} tries")
            time.sleep(0.05)
