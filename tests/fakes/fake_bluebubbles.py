"""A fake BlueBubbles Server on 127.0.0.1 for the real `imessage` channel: the REST API
under `/api/v1` in BlueBubbles' shapes (`{status, message, data, metadata}`; errors add
`error: {type, message}`; every route wants `?password=`, else 401), and, for webhook
mode, `BlueBubblesSender`, which POSTs `{type, data}` events to the host's door with the
shared secret in the URL (BlueBubbles signs nothing).

Routes (calls recorded under the names in brackets):
- `GET /api/v1/server/info` [info], `GET /api/v1/ping` [ping];
- `POST /api/v1/message/query` [query] (`chatGuid`, `after` in epoch ms, `sort`
  ASC/DESC by dateCreated, `limit`, `offset`, `with`: `chat`, `attachment`);
  `GET /api/v1/message/{guid}` [get];
- `POST /api/v1/message/text` and `POST /api/v1/message/attachment` (multipart) [send]
  with `chatGuid`, `tempGuid`, `method`; the answer is the message made, `tempGuid`
  echoed; a send whose `tempGuid` is still being sent answers 400 "already queued"
  (the server's send cache; `send_delay` makes sends take that long); `POST /api/v1/message/react` [react] (a tapback: a message of its own
  whose `associatedMessageGuid` is `p:0/<guid>`); `POST /api/v1/message/{guid}/edit`
  [edit]; `POST /api/v1/chat/{guid}/typing` [typing];
- `GET /api/v1/attachment/{guid}/download` [download]: 404 while the file is still
  "arriving" (`late=True` in `say`, until `arrive(guid)`: the message reports it with
  transferState 3 and totalBytes 0 meanwhile, as the real server does);
- `POST /api/v1/contact/query` [contact] (every +1555 number is "Ann").
`inject` scripts a status (with Retry-After), a stall, a dropped connection or a send
that lands but whose answer never comes (`land_then_stall`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Callable
from urllib.parse import quote

from aiohttp import web

from fakes.base import Call, FakeServer, Rule
from fakes.contract import PlatformFake, Sent

PASSWORD = "bb-password"
SECRET = "bb-webhook-secret"
ANN = "+15550001111"
DONE, ARRIVING = 5, 3
TAPBACK = {"love": "❤️", "like": "👍", "dislike": "👎", "laugh": "😂", "emphasize": "‼️",
           "question": "❓"}


def dm(address: str) -> str:
    return f"iMessage;-;{address}"


class FakeBlueBubbles(FakeServer, PlatformFake):
    channel = "imessage"
    limit = 4_000
    typing = True            # with the Private API on (this server's info says so)
    reply_refs = False       # apple-script sends cannot reply inline
    threads = False          # iMessage has inline replies, not threads
    edit_events = False      # the poll lists by creation date: a user's edit is never seen
    bot_edits = True         # `message/{guid}/edit` (Private API, macOS 13+)
    bot_reactions = True     # tapbacks through `message/react` (Private API)
    idempotent_sends = True  # find_sent reads the chat's own messages back
    user = f"imessage:{ANN}"

    def __init__(self, mode: str = "poll") -> None:
        super().__init__()
        self.mode = mode
        self.messages: dict[str, dict[str, Any]] = {}   # guid → message, as served
        self.files: dict[str, dict[str, Any]] = {}      # attachment guid → {name, data, mime}
        self.rowids = itertools.count(1)
        self.last_ms = 0
        self.sender: BlueBubblesSender | None = None
        self.events: list[dict[str, Any]] = []          # every webhook event sent
        self.inflight: set[Any] = set()                  # tempGuids being sent
        self.send_delay = 0.0                            # seconds a send takes on the Mac

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        r = app.router
        r.add_get("/api/v1/server/info", self._info)
        r.add_get("/api/v1/ping", self._ping)
        r.add_post("/api/v1/message/query", self._query)
        r.add_post("/api/v1/message/text", self._text)
        r.add_post("/api/v1/message/attachment", self._attachment)
        r.add_post("/api/v1/message/react", self._react)
        r.add_post("/api/v1/message/{guid}/edit", self._edit)
        r.add_get("/api/v1/message/{guid}", self._get)
        r.add_post("/api/v1/chat/{guid}/typing", self._typing)
        r.add_get("/api/v1/attachment/{guid}/download", self._download)
        r.add_post("/api/v1/contact/query", self._contacts)
        return app

    # ---- the wire ---------------------------------------------------------------------
    def _error(self, status: int, retry_after: float | None = None,
               description: str | None = None) -> web.Response:
        headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else {}
        kind = {401: "Authentication Error", 404: "Not Found"}.get(status, "Server Error")
        return web.json_response({"status": status, "message": description or "scripted",
                                  "error": {"type": kind, "message": description or "scripted"}},
                                 status=status, headers=headers)

    def _ok(self, data: Any, message: str = "Success", **extra: Any) -> web.Response:
        return web.json_response({"status": 200, "message": message, "data": data, **extra})

    def _authed(self, request: web.Request) -> bool:
        return PASSWORD in (request.query.get("password"), request.query.get("guid"))

    def _denied(self, method: str) -> web.Response:
        self.record(method, {}, "injected:401")
        return self._error(401, description="You are not authorized to access this resource")

    def _now_ms(self) -> int:
        with self.lock:
            self.last_ms = max(self.last_ms + 1, int(time.time() * 1000))
            return self.last_ms

    def _served(self, m: dict[str, Any], chats: bool = True,
                attachments: bool = True) -> dict[str, Any]:
        out = json.loads(json.dumps(m))
        if not chats:
            out.pop("chats", None)
        if not attachments:
            out["attachments"] = []
        return out

    # ---- routes ----------------------------------------------------------------------------
    async def _info(self, request: web.Request) -> web.Response:
        if not self._authed(request):
            return self._denied("info")
        self.record("info", {})
        return self._ok({"os_version": "14.5", "server_version": "1.9.9", "private_api": True,
                         "helper_connected": True, "detected_icloud": "claw@icloud.com"})

    async def _ping(self, request: web.Request) -> web.Response:
        if not self._authed(request):
            return self._denied("ping")
        return self._ok("pong")

    async def _query(self, request: web.Request) -> web.Response:
        if not self._authed(request):
            return self._denied("query")
        body = await request.json()
        params = {"chat": body.get("chatGuid"), "after": body.get("after")}
        if (r := await self.misbehave(request, "query", params, self._error)) is not None:
            return r
        self.record("query", params)
        with_ = [str(w).lower() for w in body.get("with") or []]
        with self.lock:
            items = list(self.messages.values())
        if body.get("chatGuid"):
            items = [m for m in items if m["chats"][0]["guid"] == body["chatGuid"]]
        if body.get("after") is not None:
            items = [m for m in items if m["dateCreated"] >= int(body["after"])]
        items.sort(key=lambda m: (m["dateCreated"], m["originalROWID"]),
                   reverse=str(body.get("sort", "DESC")).upper() == "DESC")
        off, lim = int(body.get("offset") or 0), int(body.get("limit") or 100)
        page = [self._served(m, bool({"chat", "chats"} & set(with_)),
                             bool({"attachment", "attachments"} & set(with_)))
                for m in items[off:off + lim]]
        return self._ok(page, "Successfully fetched messages!",
                        metadata={"offset": off, "limit": lim, "total": len(items),
                                  "count": len(page)})

    async def _get(self, request: web.Request) -> web.Response:
        if not self._authed(request):
            return self._denied("get")
        guid = request.match_info["guid"]
        self.record("get", {"guid": guid})
        m = self.messages.get(guid)
        if m is None:
            return self._error(404, description="Message does not exist!")
        return self._ok(self._served(m))

    async def _text(self, request: web.Request) -> web.Response:
        if not self._authed(request):
            return self._denied("send")
        body = await request.json()
        return await self._send(request, body, str(body.get("message") or ""), None)

    async def _attachment(self, request: web.Request) -> web.Response:
        if not self._authed(request):
            return self._denied("send")
        form = await request.post()
        body = {k: v for k, v in form.items() if isinstance(v, str)}
        f = form.get("attachment")
        if not hasattr(f, "file"):
            return self._error(400, description="No attachment provided")
        file = (str(body.get("name") or f.filename), f.file.read(),  # type: ignore[union-attr]
                f.content_type or "application/octet-stream")  # type: ignore[union-attr]
        return await self._send(request, body, "", file)

    async def _send(self, request: web.Request, body: dict[str, Any], text: str,
                    file: tuple[str, bytes, str] | None) -> web.Response:
        chat = body.get("chatGuid")
        params = {"chat": chat, "kind": "attachment" if file else "text",
                  "tempGuid": body.get("tempGuid"), "method": body.get("method")}
        if (r := await self.misbehave(request, "send", params, self._error)) is not None:
            return r
        temp = body.get("tempGuid")
        if not isinstance(chat, str) or chat.count(";") != 2 or not (text or file and file[1]):
            self.record("send", params, "injected:400")
            return self._error(400, description="Chat GUID and a message are required")
        with self.lock:
            busy = temp in self.inflight
            self.inflight.add(temp)
        if busy:  # the real server's sendCache: one send per tempGuid at a time
            self.record("send", params, "injected:400")
            return self._error(400, description=f"Message is already queued to be sent!"
                                                f" (Temp GUID: {temp})")
        try:
            if self.send_delay:
                await asyncio.sleep(self.send_delay)
            m = self.add(chat, None, text, file=file, reply_to=body.get("selectedMessageGuid"))
        finally:
            with self.lock:
                self.inflight.discard(temp)
        self.record("send", {**params, "guid": m["guid"]})
        return self._ok({**self._served(m), "tempGuid": body.get("tempGuid")}, "Message sent!")

    async def _react(self, request: web.Request) -> web.Response:
        if not self._authed(request):
            return self._denied("react")
        body = await request.json()
        target, kind = body.get("selectedMessageGuid"), body.get("reaction")
        params = {"chat": body.get("chatGuid"), "target": target, "reaction": kind}
        if (r := await self.misbehave(request, "react", params, self._error)) is not None:
            return r
        if target not in self.messages or str(kind).lstrip("-") not in TAPBACK:
            self.record("react", params, "injected:400")
            return self._error(400, description="Selected message does not exist!")
        m = self.add(body["chatGuid"], None, "", tapback=kind, target=target)
        self.record("react", params)
        return self._ok(self._served(m), "Reaction sent!")

    async def _edit(self, request: web.Request) -> web.Response:
        if not self._authed(request):
            return self._denied("edit")
        guid, body = request.match_info["guid"], await request.json()
        if (r := await self.misbehave(request, "edit", {"guid": guid}, self._error)):
            return r
        with self.lock:
            m = self.messages.get(guid)
            if m is None or not m["isFromMe"] or not body.get("editedMessage"):
                self.record("edit", {"guid": guid}, "injected:400")
                return self._error(400, description="Selected message does not exist!")
            m["text"] = body["editedMessage"]
            m["dateEdited"] = int(time.time() * 1000)
        self.record("edit", {"guid": guid})
        return self._ok(self._served(m), "Message edited!")

    async def _typing(self, request: web.Request) -> web.Response:
        if not self._authed(request):
            return self._denied("typing")
        self.record("typing", {"chat": request.match_info["guid"]})
        return self._ok(None, "Started typing!")

    async def _download(self, request: web.Request) -> web.StreamResponse:
        if not self._authed(request):
            return self._denied("download")
        guid = request.match_info["guid"]
        f = self.files.get(guid)
        if f is None or not f["arrived"]:
            self.record("download", {"guid": guid}, "injected:404")
            return self._error(404, description="Attachment does not exist!")
        self.record("download", {"guid": guid})
        return web.Response(body=f["data"], content_type=f["mime"], headers={
            "Content-Disposition": f'attachment; filename="{f["name"]}"'})

    async def _contacts(self, request: web.Request) -> web.Response:
        if not self._authed(request):
            return self._denied("contact")
        body = await request.json()
        self.record("contact", {"addresses": body.get("addresses")})
        return self._ok([{"displayName": "Ann", "firstName": "Ann", "lastName": "",
                          "phoneNumbers": [{"address": a}], "emails": []}
                         for a in body.get("addresses") or [] if str(a).startswith("+1555")])

    # ---- the Mac's messages -----------------------------------------------------------------
    def add(self, chat: str, sender: str | None, text: str, *,
            file: tuple[str, bytes, str] | None = None, late: bool = False,
            tapback: str | None = None, target: str | None = None,
            reply_to: str | None = None) -> dict[str, Any]:
        """A message in `chat` from `sender` (None: from the Mac's account, the bot)."""
        guid = str(uuid.uuid4()).upper()
        atts = []
        if file:
            ag = f"at_0_{uuid.uuid4()}".upper()
            self.files[ag] = {"name": file[0], "data": file[1], "mime": file[2],
                              "arrived": not late}
            atts.append({"originalROWID": next(self.rowids), "guid": ag, "uti": "public.data",
                         "mimeType": file[2], "transferName": file[0],
                         "totalBytes": 0 if late else len(file[1]),
                         "transferState": ARRIVING if late else DONE, "isOutgoing": sender is None,
                         "hideAttachment": False, "isSticker": False})
            text = "\ufffc" + text if text else "\ufffc"
        m = {"originalROWID": next(self.rowids), "guid": guid, "text": text,
             "handle": None if sender is None else {"originalROWID": 7, "address": sender,
                                                     "service": "iMessage", "country": "us"},
             "handleId": 0 if sender is None else 7, "attachments": atts, "subject": None,
             "error": 0, "dateCreated": self._now_ms(), "dateRead": None,
             "dateDelivered": None, "isFromMe": sender is None, "itemType": 0,
             "groupTitle": None, "associatedMessageGuid": f"p:0/{target}" if target else None,
             "associatedMessageType": tapback, "threadOriginatorGuid": reply_to,
             "dateEdited": None, "chats": [{"guid": chat, "style": 43 if ";+;" in chat else 45,
                                            "chatIdentifier": chat.split(";")[-1],
                                            "displayName": ""}]}
        with self.lock:
            self.messages[guid] = m
        return m

    def arrive(self, message: dict[str, Any]) -> None:
        """The files of a message finish arriving on the Mac."""
        with self.lock:
            for a in self.messages[message["guid"]]["attachments"]:
                self.files[a["guid"]]["arrived"] = True
                a["transferState"] = DONE
                a["totalBytes"] = len(self.files[a["guid"]]["data"])

    def say(self, chat: str, text: str, sender: str | None = None, **kw: Any) -> dict[str, Any]:
        """A user writes: the message is on the Mac (the poll finds it) and, in webhook
        mode, BlueBubbles POSTs a `new-message` event too."""
        m = self.add(chat, sender or chat.split(";")[-1], text, **kw)
        if self.mode == "webhook":
            self.notify(m)
        return m

    def notify(self, m: dict[str, Any], kind: str = "new-message") -> None:
        assert self.sender is not None, "attach(host) first"
        event = {"type": kind, "data": self._served(m)}
        self.events.append(event)
        self.sender.deliver(event)

    def resend_old(self, n: int = 1) -> None:
        """BlueBubbles re-sends events it sent before (after a reconnect or restart)."""
        for event in self.events[-n:]:
            assert self.sender is not None
            self.sender.deliver(event)

    # ---- PlatformFake ------------------------------------------------------------------------
    def attach(self, host: Any) -> "BlueBubblesSender":
        if self.sender is None:
            self.sender = BlueBubblesSender(lambda: door_url(host))
        return self.sender

    def host_env(self) -> dict[str, str]:
        env = {"BLUEBUBBLES_URL": self.url, "BLUEBUBBLES_PASSWORD": PASSWORD,
               "BLUEBUBBLES_POLL_INTERVAL": "0.2"}
        if self.mode == "webhook":
            env.update(BLUEBUBBLES_WEBHOOK_SECRET=SECRET, NANOCLAW_WEBHOOK_PORT="0")
        return env

    def connected(self, host: Any) -> bool:
        if self.mode == "webhook":
            self.attach(host)
            return bool(self.calls_of("info")) and door_url(host) is not None
        return len(self.calls_of("query")) >= 2  # the cursor is set, and polled from

    def clicker(self, chat: str) -> str:
        return f"imessage:{chat.split(';')[-1]}"

    def chat(self, n: int) -> str:
        return dm(f"+1555000{n:04d}")

    def new_thread(self, chat: str) -> str:
        raise NotImplementedError("iMessage has no threads")

    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        return self.say(chat, text, file=file)["guid"]

    def redeliver_last(self) -> None:
        if self.mode == "webhook":
            self.resend_old(1)
            return
        seen = len(self.calls_of("query"))  # the poll reads its window again: wait for it
        deadline = time.time() + 10
        while len(self.calls_of("query")) < seen + 2 and time.time() < deadline:
            time.sleep(0.05)

    def press(self, chat: str, card: Sent, index: int) -> None:
        self.say(chat, str(index + 1))

    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        with self.lock:
            mine = sorted((json.loads(json.dumps(m)) for m in self.messages.values()
                           if m["chats"][0]["guid"] == chat and m["isFromMe"]),
                          key=lambda m: m["originalROWID"])
        taps: dict[str, list[str]] = {}
        for m in mine:
            if m["associatedMessageType"]:
                target = m["associatedMessageGuid"].rpartition("/")[2]
                taps.setdefault(target, []).append(TAPBACK[m["associatedMessageType"]])
        out = []
        for m in mine:
            if m["associatedMessageType"]:
                continue
            text = m["text"].replace("\ufffc", "")
            buttons = [(line.split(". ", 1)[1], line.split(". ", 1)[0])
                       for line in text.splitlines() if line[:1].isdigit() and ". " in line] \
                if ("Reply with the number." in text or "Chosen:" in text) else []
            files = [(self.files[a["guid"]]["name"], self.files[a["guid"]]["data"])
                     for a in m["attachments"]]
            out.append(Sent(m["guid"], text, None, m["threadOriginatorGuid"], buttons, files,
                            taps.get(m["guid"], []), m))
        return out

    def send_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("send", None) if c.params.get("chat") == chat]

    def typing_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("typing") if c.params.get("chat") == chat]

    def rate_limit(self, chat: str, seconds: float) -> Rule:
        return self.inject("send", status=429, retry_after=seconds, chat=chat)

    def fail_sends(self, chat: str, count: int) -> Rule:
        return self.inject("send", count=count, status=500, chat=chat)

    def refuse_sends(self, chat: str) -> Rule:
        return self.inject("send", status=400, chat=chat, description="Chat does not exist!")

    def land_then_stall(self, chat: str) -> Rule:
        return self.inject("send", land_then_stall=True, chat=chat)


def door_url(host: Any) -> str | None:
    try:
        rows = host.q("SELECT value FROM host_state WHERE key='webhook_url'")
    except Exception:
        return None
    return f"{rows[0]['value']}/webhook/imessage" if rows and rows[0]["value"] else None


class BlueBubblesSender:
    """POSTs events as BlueBubbles does: to the URL configured, the secret in its query."""

    def __init__(self, url: Callable[[], str | None]):
        self.url = url
        self.lock = threading.Lock()

    def post(self, raw: bytes, secret: str | None = SECRET, timeout: float = 10) -> int:
        url = self.url()
        if url is None:
            raise ConnectionRefusedError("no door yet")
        if secret is not None:
            url += f"?secret={quote(secret, safe='')}"
        req = urllib.request.Request(url, data=raw, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def deliver(self, event: dict[str, Any], deadline: float = 60) -> int:
        raw = json.dumps(event).encode()
        end, attempts = time.time() + deadline, 0
        while True:
            attempts += 1
            try:
                if 200 <= self.post(raw) < 300:
                    return attempts
            except OSError:
                pass
            if time.time() > end:
                raise AssertionError(f"the door never took the event after {attempts} tries")
            time.sleep(0.05)
