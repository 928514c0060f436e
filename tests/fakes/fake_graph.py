"""A fake Meta Graph API (the WhatsApp Cloud API) on 127.0.0.1, and a webhook sender
that signs and delivers events as Meta does, for the real `whatsapp-cloud` channel:
its outbound worker calls the fake, and the sender POSTs to the host's webhook door.

Graph, under `/<version>/` (any `vN.N`), every call with `Authorization: Bearer <token>`
(a wrong or expired token answers 401 with code 190, as an OAuthException):
- `GET /{phone_id}`: the number (the adapter's start-up check);
- `POST /{phone_id}/messages`: text, interactive (button / list), reaction, image,
  document, template, and `{"status": "read", "typing_indicator"}`; validated as Meta
  does where it matters here (text 4096 characters, interactive body 1024, at most 3
  buttons of 20 characters with unique titles, at most 10 list rows of 24);
  a user whose 24-hour window is closed (`close_window`) gets 131047;
- `POST /{phone_id}/media` (multipart) stores a file; `GET /{media_id}` answers its
  `url`, which points back here (`media_url` overrides it), and `GET /download/{id}`
  serves the bytes (with the bearer).
Errors have Meta's shape `{"error": {"message", "type", "code", "fbtrace_id"}}`;
`graph_error(method, code, …)` scripts one (130429, 131056, 190, …) and `inject`
(FakeServer's) a bare HTTP status, a stall or a dropped connection. Calls are recorded
under the method names "phone", "messages", "read", "upload", "media", "download".

`MetaSender` builds `whatsapp_business_account` envelopes, signs the raw body with the
app secret (`X-Hub-Signature-256`) and POSTs it to the door, retrying on a connection
error or a non-2xx answer as Meta does (re-reading the door's address from the host,
which changes when a restarted door binds port 0 again).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from aiohttp import web

from fakes.base import Call, FakeServer, Rule
from fakes.contract import PlatformFake, Sent

PHONE_ID = "106540352242922"
TOKEN = "EAAG-test-token"
SECRET = "app-secret-for-tests"
VERIFY = "verify-me-please"
CODES = {400: (100, "OAuthException"), 401: (190, "OAuthException"), 403: (10, "OAuthException"),
         404: (100, "GraphMethodException"), 429: (130429, "OAuthException"),
         500: (131000, "OAuthException"), 502: (1, "OAuthException"),
         503: (131016, "OAuthException")}


class FakeGraph(FakeServer, PlatformFake):
    channel = "whatsapp-cloud"
    limit = 4096
    typing = True
    reply_refs = True
    threads = False      # WhatsApp chats have no threads
    edit_events = False  # Cloud API webhooks carry no user edits
    bot_edits = False    # a sent message cannot be edited

    user = "15550001000"

    def clicker(self, chat: str) -> str:
        return chat  # a DM: the one who clicks is the chat's own user

    def __init__(self, token: str = TOKEN, phone_id: str = PHONE_ID) -> None:
        super().__init__()
        self.token, self.phone_id = token, phone_id
        self.expired = False
        self.closed: set[str] = set()             # wa_ids outside the 24-hour window
        self.sent: list[dict[str, Any]] = []      # messages the bot sent, with "id"
        self.uploads: dict[str, tuple[str, bytes, str]] = {}  # media id → (name, data, mime)
        self.media_url: Callable[[str], str] | None = None
        self.ids = itertools.count(1)
        self.sender: MetaSender | None = None

    # ---- the API ------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/download/{media}", self._download)
        app.router.add_get("/{version}/{node}", self._get)
        app.router.add_post("/{version}/{phone}/messages", self._messages)
        app.router.add_post("/{version}/{phone}/media", self._upload)
        return app

    def _error(self, status: int, retry_after: float | None = None,
               description: str | None = None) -> web.Response:
        code, kind = CODES.get(status, (100, "OAuthException"))
        message = "error"
        if description:
            try:
                d = json.loads(description)
                code, message = d.get("code", code), d.get("message", message)
            except ValueError:
                message = description
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return web.json_response({"error": {"message": message, "type": kind, "code": code,
                                            "fbtrace_id": "Afake"}}, status=status,
                                 headers=headers)

    def graph_error(self, method: str, code: int, status: int = 400, count: int = 1,
                    retry_after: float | None = None, message: str = "scripted",
                    **match: Any) -> Rule:
        """The next `count` calls of `method` matching `match` fail with Graph `code`."""
        return self.inject(method, count=count, status=status, retry_after=retry_after,
                           description=json.dumps({"code": code, "message": message}), **match)

    def _authorized(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {self.token}" or self.expired:
            return self._error(401, description=json.dumps({
                "code": 190, "message": "Error validating access token: Session has expired"}))
        return None

    async def _get(self, request: web.Request) -> web.StreamResponse:
        node = request.match_info["node"]
        method = "phone" if node == self.phone_id else "media"
        params = {"node": node}
        if (bad := self._authorized(request)) is not None:
            self.record(method, params, "injected:401")
            return bad
        if (r := await self.misbehave(request, method, params, self._error)) is not None:
            return r
        self.record(method, params)
        if method == "phone":
            return web.json_response({"id": self.phone_id, "verified_name": "Andy",
                                      "display_phone_number": "+1 555-010-0000"})
        if node not in self.uploads:
            return self._error(404)
        name, data, mime = self.uploads[node]
        url = self.media_url(node) if self.media_url else f"{self.url}/download/{node}"
        return web.json_response({"messaging_product": "whatsapp", "url": url, "id": node,
                                  "mime_type": mime, "file_size": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        node = request.match_info["media"]
        if (bad := self._authorized(request)) is not None:
            return bad
        if (r := await self.misbehave(request, "download", {"node": node}, self._error)):
            return r
        self.record("download", {"node": node})
        if node not in self.uploads:
            return web.Response(status=404)
        return web.Response(body=self.uploads[node][1], content_type=self.uploads[node][2])

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        if (bad := self._authorized(request)) is not None:
            return bad
        form = await request.post()
        f = form.get("file")
        params = {"type": form.get("type"), "product": form.get("messaging_product")}
        if (r := await self.misbehave(request, "upload", params, self._error)) is not None:
            return r
        if not hasattr(f, "file") or form.get("messaging_product") != "whatsapp":
            self.record("upload", params, "injected:400")
            return self._error(400)
        mid = str(9000000 + next(self.ids))
        self.uploads[mid] = (f.filename, f.file.read(), str(form.get("type")))  # type: ignore
        self.record("upload", {**params, "id": mid, "name": f.filename})  # type: ignore
        return web.json_response({"id": mid})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return self._error(400)
        read = body.get("status") == "read"
        method = "read" if read else "messages"
        params = {"to": body.get("to"), "type": body.get("type"), **body}
        if (bad := self._authorized(request)) is not None:
            self.record(method, params, "injected:401")
            return bad
        if request.match_info["phone"] != self.phone_id:
            self.record(method, params, "injected:400")
            return self._error(400)
        if (r := await self.misbehave(request, method, params, self._error)) is not None:
            return r
        if read:
            self.record(method, params)
            return web.json_response({"success": True})
        problem = self._invalid(body)
        if problem:
            self.record(method, params, "injected:400")
            return self._error(400, description=json.dumps({"code": 100, "message": problem}))
        if body.get("to") in self.closed and body.get("type") != "template":
            self.record(method, params, "injected:400")
            return self._error(400, description=json.dumps({
                "code": 131047, "message": "Re-engagement message"}))
        wamid = f"wamid.OUT{next(self.ids):06d}"
        with self.lock:
            if body.get("type") == "reaction":
                target = next((m for m in self.sent
                               if m["id"] == body["reaction"].get("message_id")), None)
                if target is not None:
                    target.setdefault("reactions", []).append(body["reaction"].get("emoji"))
            self.sent.append({**body, "id": wamid, "at": time.time()})
        self.record(method, {**params, "id": wamid})
        return web.json_response({"messaging_product": "whatsapp", "contacts": [
            {"input": body.get("to"), "wa_id": body.get("to")}], "messages": [{"id": wamid}]})

    @staticmethod
    def _invalid(body: dict[str, Any]) -> str | None:
        if body.get("messaging_product") != "whatsapp" or not str(body.get("to", "")).isdigit():
            return "messaging_product and to are required"
        kind = body.get("type")
        if kind == "text":
            text = (body.get("text") or {}).get("body")
            if not isinstance(text, str) or not text or len(text) > 4096:
                return "text.body must be 1-4096 characters"
        elif kind == "interactive":
            i = body.get("interactive") or {}
            if not 0 < len((i.get("body") or {}).get("text") or "") <= 1024:
                return "interactive body must be 1-1024 characters"
            if i.get("type") == "button":
                titles = [b["reply"]["title"] for b in i["action"]["buttons"]]
                if not 0 < len(titles) <= 3 or any(not 0 < len(t) <= 20 for t in titles) or (
                        len(set(titles)) != len(titles)):
                    return "1-3 buttons with unique titles of 1-20 characters"
            elif i.get("type") == "list":
                rows = [r for s in i["action"]["sections"] for r in s["rows"]]
                if not 0 < len(rows) <= 10 or any(not 0 < len(r["title"]) <= 24 for r in rows):
                    return "1-10 rows with titles of 1-24 characters"
            else:
                return "unknown interactive type"
        elif kind not in ("reaction", "image", "document", "template"):
            return f"unsupported type {kind!r}"
        return None

    # ---- users (through the sender) -----------------------------------------------------
    def attach(self, host: Any) -> "MetaSender":
        self.sender = MetaSender(lambda: door_url(host), SECRET, self.phone_id)
        return self.sender

    def message(self, wa_id: str, kind: str = "text", name: str = "Ann", **fields: Any
                ) -> dict[str, Any]:
        """A user's message as Meta delivers it (`fields` is the type's object)."""
        self.closed.discard(wa_id)
        m = {"from": wa_id, "id": f"wamid.IN{next(self.ids):06d}{wa_id[-4:]}",
             "timestamp": str(int(time.time())), "type": kind, **fields}
        return {"message": m, "contact": {"profile": {"name": name}, "wa_id": wa_id}}

    def text(self, wa_id: str, text: str, **kw: Any) -> dict[str, Any]:
        return self.message(wa_id, "text", text={"body": text}, **kw)

    def file_message(self, wa_id: str, name: str, data: bytes, mime: str,
                     caption: str = "") -> dict[str, Any]:
        mid = str(8000000 + next(self.ids))
        self.uploads[mid] = (name, data, mime)
        kind = "image" if mime.startswith("image/") else "document"
        obj = {"id": mid, "mime_type": mime, "sha256": hashlib.sha256(data).hexdigest(),
               **({"caption": caption} if caption else {}),
               **({"filename": name} if kind == "document" else {})}
        return self.message(wa_id, kind, **{kind: obj})

    def click_message(self, wa_id: str, sent: dict[str, Any], index: int) -> dict[str, Any]:
        i = sent["interactive"]
        if i["type"] == "button":
            b = i["action"]["buttons"][index]["reply"]
            reply = {"type": "button_reply", "button_reply": {"id": b["id"], "title": b["title"]}}
        else:
            r = [r for s in i["action"]["sections"] for r in s["rows"]][index]
            reply = {"type": "list_reply", "list_reply": {"id": r["id"], "title": r["title"]}}
        return self.message(wa_id, "interactive", interactive=reply,
                            context={"from": "15550100000", "id": sent["id"]})

    def close_window(self, wa_id: str) -> None:
        self.closed.add(wa_id)

    # ---- PlatformFake ---------------------------------------------------------------------
    def host_env(self) -> dict[str, str]:
        return {"WHATSAPP_ACCESS_TOKEN": self.token, "WHATSAPP_PHONE_NUMBER_ID": self.phone_id,
                "WHATSAPP_APP_SECRET": SECRET, "WHATSAPP_VERIFY_TOKEN": VERIFY,
                "WHATSAPP_API_BASE": self.url, "NANOCLAW_WEBHOOK_PORT": "0"}

    def connected(self, host: Any) -> bool:
        if self.sender is None:
            self.attach(host)
        return bool(self.calls_of("phone")) and door_url(host) is not None

    def chat(self, n: int) -> str:
        return str(15550002000 + n)

    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        assert thread is None, "WhatsApp Cloud has no threads"
        ev = self.file_message(chat, *file, caption=text) if file else self.text(chat, text)
        assert self.sender is not None
        self.sender.deliver([ev])
        return ev["message"]["id"]

    def redeliver_last(self) -> None:
        assert self.sender is not None and self.sender.last is not None
        self.sender.post(self.sender.last)

    def press(self, chat: str, card: Sent, index: int) -> None:
        assert self.sender is not None
        self.sender.deliver([self.click_message(chat, card.raw, index)])

    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        out = []
        with self.lock:
            mine = [m for m in self.sent if m.get("to") == chat and m.get("type") != "reaction"]
        for m in mine:
            kind, text, buttons, files = m.get("type"), "", [], []
            if kind == "text":
                text = m["text"]["body"]
            elif kind == "interactive":
                i = m["interactive"]
                text = i["body"]["text"]
                if i["type"] == "button":
                    buttons = [(b["reply"]["title"], b["reply"]["id"])
                               for b in i["action"]["buttons"]]
                else:
                    buttons = [(r.get("description") or r["title"], r["id"])
                               for s in i["action"]["sections"] for r in s["rows"]]
            elif kind in ("image", "document"):
                name, data, _ = self.uploads.get(m[kind]["id"], ("?", b"", ""))
                files = [(m[kind].get("filename") or name, data)]
                text = m[kind].get("caption", "")
            out.append(Sent(m["id"], text, None, (m.get("context") or {}).get("message_id"),
                            buttons, files, list(m.get("reactions", [])), m))
        return out

    def send_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("messages", None) if c.params.get("to") == chat]

    def typing_calls(self, chat: str) -> list[Call]:
        ids = {m["message"]["id"] for m in (self.sender.events if self.sender else [])
               if m["message"]["from"] == chat}
        return [c for c in self.calls_of("read") if c.params.get("message_id") in ids
                and c.params.get("typing_indicator")]

    def land_then_stall(self, chat: str) -> Rule:
        return self.inject("messages", land_then_stall=True, to=chat)

    def rate_limit(self, chat: str, seconds: float) -> Rule:
        return self.graph_error("messages", 130429, status=429, retry_after=seconds, to=chat)

    def fail_sends(self, chat: str, count: int) -> Rule:
        return self.inject("messages", count=count, status=500, to=chat)

    def refuse_sends(self, chat: str) -> Rule:
        return self.graph_error("messages", 131026, to=chat, message="Message undeliverable")


def door_url(host: Any) -> str | None:
    try:
        rows = host.q("SELECT value FROM host_state WHERE key='webhook_url'")
    except Exception:
        return None
    return f"{rows[0]['value']}/webhook/whatsapp-cloud" if rows and rows[0]["value"] else None


def sign(raw: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


class MetaSender:
    """Meta's side of the webhook: envelopes, signatures, retries."""

    def __init__(self, url: Callable[[], str | None], secret: str = SECRET,
                 phone_id: str = PHONE_ID):
        self.url, self.secret, self.phone_id = url, secret, phone_id
        self.last: bytes | None = None
        self.retries = 0  # deliveries that needed more than one try
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def envelope(self, events: list[dict[str, Any]], statuses: list | None = None) -> bytes:
        value: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550100000", "phone_number_id": self.phone_id},
            "contacts": [e["contact"] for e in events],
            "messages": [e["message"] for e in events]}
        if statuses:
            value["statuses"] = statuses
        return json.dumps({"object": "whatsapp_business_account", "entry": [{
            "id": "WABA-1", "changes": [{"value": value, "field": "messages"}]}]},
            ensure_ascii=False).encode()

    def post(self, raw: bytes, signature: str | None | bool = True, timeout: float = 10,
             headers: dict[str, str] | None = None) -> int:
        """One POST as is; the HTTP status (OSError if the door is not there)."""
        url = self.url()
        if url is None:
            raise ConnectionRefusedError("no door yet")
        h = {"Content-Type": "application/json", **(headers or {})}
        if signature is True:
            h["X-Hub-Signature-256"] = sign(raw, self.secret)
        elif isinstance(signature, str):
            h["X-Hub-Signature-256"] = signature
        req = urllib.request.Request(url, data=raw, method="POST", headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def deliver(self, events: list[dict[str, Any]], deadline: float = 60) -> int:
        """Sign and POST until the door answers 2xx, as Meta retries; the attempts."""
        raw = self.envelope(events)
        with self.lock:
            self.last = raw
            self.events.extend(events)
        end, attempts = time.time() + deadline, 0
        while True:
            attempts += 1
            try:
                if 200 <= self.post(raw) < 300:
                    return attempts
            except OSError:
                pass
            if attempts == 1:
                with self.lock:
                    self.retries += 1
            if time.time() > end:
                raise AssertionError(f"the door never took the event after {attempts} tries")
            time.sleep(0.05)

    def handshake(self, token: str, challenge: str = "1158201444", mode: str = "subscribe"
                  ) -> tuple[int, str]:
        from urllib.parse import urlencode

        url = f"{self.url()}?" + urlencode({"hub.mode": mode, "hub.verify_token": token,
                                            "hub.challenge": challenge})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
