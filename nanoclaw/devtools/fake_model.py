"""A fake Anthropic Messages API on 127.0.0.1, so the real clients run offline.

The `anthropic` SDK and the Claude Code CLI talk to it exactly as they would to the real
API (facts it honours: shared/reference/anthropic-api-fake.md): SSE for streaming,
JSON errors with the right status, both auth headers, Nagle off so a round trip costs a
few ms. Replies are scripted and deterministic, every request is recorded, and errors,
delays and dropped connections can be injected in-process or over HTTP (`/_fake/*`).
Token counts are estimated (4 characters a token); in-process, `context_tokens` makes a
longer request fail as the real API does ("prompt is too long", HTTP 400), and
`extra_input_tokens` inflates the usage a reply reports (a conversation that looks long).

Run standalone: `python -m nanoclaw.devtools.fake_model --port 0 [--delay-ms D]`.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "claude-fake-1"
TOOL_MARKER = re.compile(
    r"\[\[tool:(?P<name>[A-Za-z0-9_\-]+)(?:\s+(?P<json>\{.*?\}))?\s*\]\]", re.S)
MESSAGE_BLOCK = re.compile(r"<message\b(?P<attrs>[^>]*)>(?P<body>.*?)</message>", re.S)
FROM_ATTR = re.compile(r"""\bfrom\s*=\s*(?:"([^"]*)"|'([^']*)')""")
SYSTEM_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.S)
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 503: "api_error", 529: "overloaded_error",
}


@dataclass
class Injection:
    """One scripted misbehaviour, applied to the next `count` API requests."""

    count: int = 1
    status: int | None = None
    retry_after: float | None = None
    delay_ms: int = 0
    drop: bool = False
    message: str | None = None


# --- scripted replies (pure) -------------------------------------------------------------

def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "\n".join(parts)


def _last_user(messages: list[Any]) -> dict[str, Any] | None:
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return msg
    return None


def _tool_result_text(content: Any) -> str | None:
    if not isinstance(content, list):
        return None
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            return _text_of(block.get("content", ""))
    return None


def _find_tool_marker(text: str) -> tuple[str, dict[str, Any]] | None:
    for candidate in (text, html.unescape(text)):
        for m in TOOL_MARKER.finditer(candidate):
            try:
                args = json.loads(m.group("json")) if m.group("json") else {}
            except json.JSONDecodeError:
                continue
            if isinstance(args, dict):
                return m.group("name"), args
    return None


def _echo(text: str, reply: str | None) -> str:
    last = None
    for m in MESSAGE_BLOCK.finditer(text):
        attr = FROM_ATTR.search(m.group("attrs"))
        if attr:
            last = (html.unescape(attr.group(1) or attr.group(2) or ""), m.group("body"))
    if last is not None:
        sender, body = last
        said = reply if reply is not None else f"echo: {html.unescape(body).strip()}"
        return f'<message to="{html.escape(sender)}">{said}</message>'
    plain = SYSTEM_REMINDER.sub("", text).strip()
    return reply if reply is not None else f"echo: {plain or 'ok'}"


def script_reply(body: dict[str, Any], next_tool_id: Any, reply: str | None = None) -> list[dict]:
    """The content blocks the fake answers `body` with (see the module docstring)."""
    user = _last_user(body.get("messages") or [])
    if user is None:
        return [{"type": "text", "text": "ok"}]
    result = _tool_result_text(user.get("content"))
    text = SYSTEM_REMINDER.sub("", _text_of(user.get("content")))  # the CLI's context notes
    if result is not None and not text.strip():  # (new text beside a result wins: the CLI
        return [{"type": "text", "text": f"done: {result[:200]}"}]  # folds late input in)
    marker = _find_tool_marker(text)
    if marker is not None:
        name, args = marker
        return [{"type": "tool_use", "id": f"toolu_{next_tool_id()}", "name": name, "input": args}]
    return [{"type": "text", "text": _echo(text, reply)}]


def _usage(body: dict[str, Any], blocks: list[dict], extra_input: int = 0) -> dict[str, int]:
    return {
        "input_tokens": len(json.dumps(body.get("messages", ""))) // 4 + 1 + extra_input,
        "output_tokens": len(json.dumps(blocks)) // 4 + 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _message(body: dict[str, Any], blocks: list[dict], msg_id: str,
             extra_input: int = 0) -> dict[str, Any]:
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    return {
        "id": msg_id, "type": "message", "role": "assistant", "model": body.get("model") or MODEL,
        "content": blocks, "stop_reason": stop, "stop_sequence": None,
        "usage": _usage(body, blocks, extra_input),
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def sse_events(message: dict[str, Any]) -> bytes:
    """The whole SSE stream for one message, in the order the real API sends it."""
    start = dict(message, content=[], stop_reason=None)
    start["usage"] = dict(message["usage"], output_tokens=1)
    out = [_sse("message_start", {"type": "message_start", "message": start}),
           _sse("ping", {"type": "ping"})]
    for i, block in enumerate(message["content"]):
        if block["type"] == "tool_use":
            head = dict(block, input={})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        else:
            head = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        out.append(_sse("content_block_start",
                        {"type": "content_block_start", "index": i, "content_block": head}))
        out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                "delta": delta}))
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(_sse("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": message["usage"]["output_tokens"]},
    }))
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return b"".join(out)


# --- the server --------------------------------------------------------------------------

class FakeModel:
    """The fake API server; `start()` serves on a daemon thread until `stop()`."""

    def __init__(self, port: int = 0, delay_ms: int = 0, reply: str | None = None) -> None:
        self.port = port
        self.delay_ms = delay_ms
        self.reply = reply
        self.context_tokens: int | None = None  # longer requests fail: "prompt is too long"
        self.extra_input_tokens = 0             # added to the input usage replies report
        self.requests: list[dict[str, Any]] = []
        self._injections: list[Injection] = []
        self._lock = threading.RLock()  # re-entrant: handlers call helpers that lock too
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeModel":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-model",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def inject(self, status: int | None = None, count: int = 1, retry_after: float | None = None,
               delay_ms: int = 0, drop: bool = False, message: str | None = None) -> None:
        """Make the next `count` API requests fail, wait or drop (queued in order)."""
        if status == 429 and retry_after is None:
            retry_after = 1
        with self._lock:
            self._injections.append(Injection(count, status, retry_after, delay_ms, drop, message))

    def clear(self) -> None:
        """Forget recorded requests and pending injections."""
        with self._lock:
            self.requests.clear()
            self._injections.clear()

    def next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    def take_injection(self) -> Injection | None:
        with self._lock:
            if not self._injections:
                return None
            inj = self._injections[0]
            inj.count -= 1
            if inj.count <= 0:
                self._injections.pop(0)
            return inj


class _Handler(BaseHTTPRequestHandler):
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

    def _send_sse(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))

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
        used = _usage(body, [])["input_tokens"]
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
                          "body": body})
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
            self._send_json(200, {"input_tokens": _usage(body, [])["input_tokens"]})
        elif path == "/v1/messages" and self._too_long(body):
            return
        elif path == "/v1/messages":
            blocks = script_reply(body, self.fake.next_id, self.fake.reply)
            message = _message(body, blocks, f"msg_fake_{self.fake.next_id()}",
                               self.fake.extra_input_tokens)
            if body.get("stream"):
                self._send_sse(sse_events(message))
            else:
                self._send_json(200, message)
        else:
            self._send_error(404, f"not found: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake Anthropic Messages API on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=int, default=0, help="added to every API answer")
    parser.add_argument("--reply", default=None, help="fixed reply text instead of the echo")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fake = FakeModel(port=args.port, delay_ms=args.delay_ms, reply=args.reply).start()
    print(f"listening on {fake.url}", flush=True)
    while not stop.wait(0.5):
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
