"""The fake model's HTTP side: one request handler serving the Messages API as the real
one does (both auth headers, JSON errors with the right status, SSE for streaming, Nagle
off) and the `/_fake/*` controls (recorded requests, injections, reset). Which reply to
send is `fake_replies`; the state it reads and records is the `FakeModel` it serves.
"""

from __future__ import annotations

import json
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from nanoclaw.devtools.fake_replies import MODEL, api_message, script_reply, sse_events, usage

if TYPE_CHECKING:
    from nanoclaw.devtools.fake_model import FakeModel

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 503: "api_error", 529: "overloaded_error",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    fake: FakeModel

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # -- plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, data: Any, extra: dict[str, str] | None = None) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("request-id", f"req_fake_{self.fake.next_id()}")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def _send_error(self, status: int, message: str, retry_after: float | None = None) -> None:
        extra = {}
        if retry_after is not None:
            extra["retry-after"] = (str(int(retry_after)) if float(retry_after).is_integer()
                                    else str(retry_after))
        body = {"type": "error",
                "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}
        self._send_json(status, body, extra)

    def _send_sse(self, data: bytes, stall_ms: int = 0) -> None:
        """The events as one chunked body; with `stall_ms`, the first half of the events,
        then silence that long (a model API stalling mid-stream), then the rest."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if stall_ms:
            events = data.split(b"\n\n")
            head = b"\n\n".join(events[:len(events) // 2]) + b"\n\n"
            data = data[len(head):]
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(head), head))
                self.wfile.flush()
                time.sleep(stall_ms / 1000)
            except OSError:
                return
        try:
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
        except OSError:  # the client gave up during the stall
            pass

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return bool(self.headers.get("x-api-key")) or (
            auth.lower().startswith("bearer ") and len(auth) > 7)

    # -- verbs
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0]
        if path == "/_fake/requests":
            with self.fake._lock:
                recorded = list(self.fake.requests)
            self._send_json(200, recorded)
            return
        if path == "/v1/models":
            self._api(path, b"")
            return
        self._send_error(404, f"not found: {path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0]
        raw = self._read_body()
        if path == "/_fake/inject":
            try:
                self.fake.inject(**json.loads(raw or b"{}"))
            except (TypeError, ValueError) as exc:
                self._send_error(400, f"bad injection: {exc}")
                return
            self._send_json(200, {"ok": True})
        elif path == "/_fake/reset":
            self.fake.clear()
            self._send_json(200, {"ok": True})
        elif path.startswith("/v1/"):
            self._api(path, raw)
        else:
            self._send_error(404, f"not found: {path}")

    def _too_long(self, body: dict[str, Any]) -> bool:
        """Over `context_tokens`: answered with the real API's error."""
        limit = self.fake.context_tokens
        used = usage(body, [])["input_tokens"]
        if limit is None or used <= limit:
            return False
        self._send_error(400, f"prompt is too long: {used} tokens > {limit} maximum")
        return True

    def _api(self, path: str, raw: bytes) -> None:
        try:
            body: Any = json.loads(raw) if raw else {}
        except ValueError:
            body = raw.decode("utf-8", "replace")
        query = self.path.split("?", 1)[1] if "?" in self.path else ""
        self.fake.record({"path": path, "query": query, "method": self.command,
                          "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": body, "peer_port": self.client_address[1]})
        inj = self.fake.take_injection()
        delay = (inj.delay_ms if inj and inj.delay_ms else 0) or self.fake.delay_ms
        if delay:
            time.sleep(delay / 1000)
        if inj and inj.drop:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if inj and inj.status:
            self._send_error(inj.status, inj.message or f"injected {inj.status}", inj.retry_after)
            return
        if not self._authorized():
            self._send_error(401, "missing x-api-key or Authorization: Bearer header")
            return
        if path == "/v1/models":
            model = {"type": "model", "id": MODEL, "display_name": "Fake model",
                     "created_at": "2025-01-01T00:00:00Z"}
            self._send_json(200, {"data": [model], "has_more": False,
                                  "first_id": MODEL, "last_id": MODEL})
        elif not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._send_error(400, "messages: field required (a list)")
        elif path == "/v1/messages/count_tokens":
            self._send_json(200, {"input_tokens": usage(body, [])["input_tokens"]})
        elif path == "/v1/messages" and self._too_long(body):
            return
        elif path == "/v1/messages":
            blocks = script_reply(body, self.fake.next_id, self.fake.reply)
            message = api_message(body, blocks, f"msg_fake_{self.fake.next_id()}",
                                  self.fake.extra_input_tokens)
            if body.get("stream"):
                self._send_sse(sse_events(message), inj.stall_ms if inj else 0)
            else:
                self._send_json(200, message)
        else:
            self._send_error(404, f"not found: {path}")
