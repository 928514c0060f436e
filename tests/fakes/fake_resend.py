"""A fake Resend API on 127.0.0.1 (FakeServer: calls recorded, fault rules) and an
Svix-style webhook sender, for the `email` channel's Resend transport.

Mirrors Resend's shapes (resend.com/docs, api-reference): `Authorization: Bearer <key>`;
`POST /emails` {from, to, subject, text, html, headers, attachments} → {id}, where an
`Idempotency-Key` (1–256 characters) seen before with the same body answers the same id
and sends nothing (another body: 409 `invalid_idempotent_request`); `GET
/emails/receiving` {object: list, data}; `GET /emails/receiving/{id}` → the received
email (from, to, subject, text, html, headers, message_id, attachments metadata, and
`raw.download_url`, a signed link to the message as received); `GET
/emails/receiving/{email_id}/attachments/{id}` → {download_url}. Errors are
`{statusCode, name, message}`; a 429 carries `retry-after`. Sends are recorded as
"send" with `to`.

`SvixSender` posts `email.received` events (metadata only, as Resend does) to the
host's door, signed as Svix signs: `svix-id`, `svix-timestamp`, `svix-signature:
v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`, key the base64 after `whsec_`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web

from fakes.base import FakeServer

KEY = "re_test_key"
SECRET = "whsec_" + base64.b64encode(b"resend-webhook-secret-for-tests").decode()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


def svix_sign(raw: bytes, sid: str, ts: int, secret: str = SECRET) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    return "v1," + base64.b64encode(hmac.new(key, f"{sid}.{ts}.".encode() + raw,
                                             hashlib.sha256).digest()).decode()


class FakeResend(FakeServer):
    def __init__(self, key: str = KEY) -> None:
        super().__init__()
        self.key = key
        self.sent: list[dict[str, Any]] = []                # bodies of emails sent
        self.idem: dict[str, tuple[str, str]] = {}          # key → (body digest, id)
        self.received: dict[str, dict[str, Any]] = {}       # id → the received email
        self.raws: dict[str, bytes] = {}
        self.ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=40 << 20)
        app.router.add_post("/emails", self._send)
        app.router.add_get("/emails/receiving", self._list)
        app.router.add_get("/emails/receiving/{id}", self._get)
        app.router.add_get("/emails/receiving/{id}/attachments/{aid}", self._attachment)
        app.router.add_get("/raw/{id}", self._raw)
        return app

    @staticmethod
    def _error(status: int, retry_after: float | None = None,
               description: str | None = None) -> web.Response:
        names = {429: "rate_limit_exceeded", 401: "missing_api_key", 403: "invalid_api_key",
                 422: "validation_error", 409: "invalid_idempotent_request"}
        headers = {"retry-after": str(int(retry_after or 1))} if status == 429 else {}
        return web.json_response({"statusCode": status, "name": names.get(
            status, "application_error"), "message": description or "error"}, status=status,
            headers=headers)

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.key}"

    async def _send(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            self.record("send", {}, "injected:401")
            return self._error(401)
        body = await request.json()
        to = (body.get("to") or [""])[0]
        params = {"to": to, "idem": request.headers.get("Idempotency-Key")}
        if (r := await self.misbehave(request, "send", params, self._error)) is not None:
            return r
        key = request.headers.get("Idempotency-Key")
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if key is not None and not 1 <= len(key) <= 256:
            return self._error(400, description="invalid_idempotency_key")
        with self.lock:
            seen = self.idem.get(key) if key is not None else None
            if seen is None:
                eid = str(uuid.uuid4())
                if key is not None:
                    self.idem[key] = (digest, eid)
                self.sent.append({**body, "id": eid, "idempotency_key": key})
        if seen is not None:  # the same send again: answered as before, nothing sent
            if seen[0] != digest:
                return self._error(409, description="same key, another body")
            self.record("send", {**params, "replayed": True})
            return web.json_response({"id": seen[1]})
        self.record("send", params)
        return web.json_response({"id": eid})

    async def _list(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._error(401)
        with self.lock:
            data = [{k: v for k, v in e.items() if k in (
                "id", "to", "from", "created_at", "subject", "message_id")}
                for e in reversed(list(self.received.values()))]
        return web.json_response({"object": "list", "has_more": False, "data": data})

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._error(401)
        eid = request.match_info["id"]
        if (r := await self.misbehave(request, "get", {"id": eid}, self._error)) is not None:
            return r
        got = self.received.get(eid)
        self.record("get", {"id": eid}, "ok" if got else "injected:404")
        if got is None:
            return self._error(404, description="not found")
        return web.json_response({**got, "raw": {"download_url": f"{self.url}/raw/{eid}?sig=x",
                                                 "expires_at": iso(time.time() + 3600)}})

    async def _attachment(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._error(401)
        return self._error(404, description="attachments come with the raw message here")

    async def _raw(self, request: web.Request) -> web.StreamResponse:
        raw = self.raws.get(request.match_info["id"])
        self.record("raw", {"id": request.match_info["id"]})
        return web.Response(body=raw, content_type="message/rfc822") if raw else \
            web.Response(status=404)

    # ---- mail arriving at Resend -------------------------------------------------------------
    def receive(self, raw: bytes, sender: str, to: str, subject: str, message_id: str) -> dict:
        """Resend received a mail: kept for the API; the `email.received` event to post."""
        eid = str(uuid.uuid4())
        now = time.time()
        with self.lock:
            self.raws[eid] = raw
            self.received[eid] = {"object": "email", "id": eid, "to": [to], "from": sender,
                                  "created_at": iso(now), "subject": subject,
                                  "message_id": f"<{message_id}>", "bcc": [], "cc": [],
                                  "reply_to": [], "html": None, "text": None,
                                  "headers": {}, "attachments": []}
        return {"type": "email.received", "created_at": iso(now), "data": {
            "email_id": eid, "created_at": iso(now), "from": sender, "to": [to], "bcc": [],
            "cc": [], "message_id": f"<{message_id}>", "subject": subject,
            "attachments": []}}


class SvixSender:
    """Resend's side of the webhook, signed as Svix signs it."""

    def __init__(self, url: Callable[[], str | None], secret: str = SECRET):
        self.url, self.secret = url, secret

    def post(self, event: dict[str, Any] | bytes, *, sid: str | None = None,
             ts: int | None = None, signature: str | None | bool = True,
             secret: str | None = None) -> int:
        url = self.url()
        if url is None:
            raise ConnectionRefusedError("no door")
        raw = event if isinstance(event, bytes) else json.dumps(event).encode()
        sid = sid or f"msg_{uuid.uuid4().hex}"
        ts = int(time.time()) if ts is None else ts
        h = {"Content-Type": "application/json", "svix-id": sid, "svix-timestamp": str(ts)}
        if signature is True:
            h["svix-signature"] = svix_sign(raw, sid, ts, secret or self.secret)
        elif isinstance(signature, str):
            h["svix-signature"] = signature
        req = urllib.request.Request(url, data=raw, method="POST", headers=h)
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


def door_url(host: Any) -> str | None:
    try:
        rows = host.q("SELECT value FROM host_state WHERE key='webhook_url'")
    except Exception:
        return None
    return f"{rows[0]['value']}/webhook/resend" if rows and rows[0]["value"] else None
