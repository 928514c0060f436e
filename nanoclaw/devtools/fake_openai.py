"""A fake OpenAI-compatible Chat Completions API on 127.0.0.1 (what Ollama, vLLM,
OpenRouter and OpenAI serve), so the real `openai` client runs offline.

`POST /v1/chat/completions` answers as the real servers do: SSE chunks of
`choices[].delta` (`content`, then `tool_calls` with the arguments streamed), a final
chunk with `finish_reason`, a usage chunk when `stream_options.include_usage` asks for
it, then `data: [DONE]`; or one `chat.completion` JSON without `stream`. `GET /v1/models`
lists one model. Errors are `{"error": {"message", "type", "code"}}` with the right
status (429 with `retry-after`).

Replies come from the same script as the fake Anthropic API (`fake_replies.py`): the
OpenAI messages are read as Messages API turns (a `tool` message is a tool result), so a
`[[tool:name {json}]]` marker becomes a tool call, a tool result alone `done: …`, and
anything else is echoed. The state (recorded requests with their headers, so a test sees
which `Authorization` arrived, and `require_key = False` makes it a keyless local
server; injected errors, delays, stalls and drops; `/_fake/*`
over HTTP) is `FakeModel`'s. `context_tokens` makes a longer request fail with
`context_length_exceeded`, as the real API does.

Run standalone: `python -m nanoclaw.devtools.fake_openai --port 0 [--delay-ms D]`.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from nanoclaw.devtools.fake_http import Handler
from nanoclaw.devtools.fake_model import FakeModel, serve
from nanoclaw.devtools.fake_replies import script_reply

MODEL = "gpt-fake-1"
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               403: "permission_error", 404: "not_found_error", 429: "rate_limit_exceeded",
               500: "server_error", 502: "server_error", 503: "server_error"}


# --- the script, read in the Messages API's shape ------------------------------------------

def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(str(p.get("text", "")) for p in content or []
                     if isinstance(p, dict) and p.get("type") == "text")


def as_messages_api(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI chat messages as Messages API turns, for `fake_replies.script_reply`."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if role == "tool":
            out.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": m.get("tool_call_id"),
                 "content": _text(m.get("content"))}]})
        elif role in ("user", "assistant"):
            out.append({"role": role, "content": _text(m.get("content"))})
    # consecutive tool results answer one assistant turn: the last user turn holds them all
    return out


def reply_for(body: dict[str, Any], next_id: Any, reply: str | None) -> tuple[str, list[dict]]:
    """The reply's text and its tool calls (OpenAI shape)."""
    blocks = script_reply({"messages": as_messages_api(body.get("messages") or [])},
                          next_id, reply)
    text = "".join(b["text"] for b in blocks if b["type"] == "text")
    calls = [{"id": f"call_{b['id'].removeprefix('toolu_')}", "type": "function",
              "function": {"name": b["name"], "arguments": json.dumps(b["input"])}}
             for b in blocks if b["type"] == "tool_use"]
    return text, calls


def usage(body: dict[str, Any], text: str, calls: list[dict], extra_input: int = 0
          ) -> dict[str, Any]:
    prompt = len(json.dumps(body.get("messages", ""))) // 4 + 1 + extra_input
    completion = len(text + json.dumps(calls)) // 4 + 1
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}}


def completion(body: dict[str, Any], text: str, calls: list[dict], cid: str,
               extra_input: int = 0) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return {"id": cid, "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or MODEL,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if calls else "stop"}],
            "usage": usage(body, text, calls, extra_input)}


def chunks(body: dict[str, Any], text: str, calls: list[dict], cid: str,
           extra_input: int = 0) -> list[dict[str, Any]]:
    """The stream's chunks, in the order the real servers send them."""
    model = body.get("model") or MODEL

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": ""})]
    if text:
        out.append(chunk({"content": text}))
    for i, call in enumerate(calls):
        out.append(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                          "function": {"name": call["function"]["name"],
                                                       "arguments": ""}}]}))
        out.append(chunk({"tool_calls": [{"index": i, "function": {
            "arguments": call["function"]["arguments"]}}]}))
    out.append(chunk({}, "tool_calls" if calls else "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        out.append({"id": cid, "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [], "usage": usage(body, text, calls, extra_input)})
    return out


# --- the HTTP side -------------------------------------------------------------------------

class OpenAIHandler(Handler):
    """Serves the Chat Completions API; `/_fake/*` controls as in `fake_http.Handler`."""

    def _send_error(self, status: int, message: str, retry_after: float | None = None,
                    code: str | None = None) -> None:
        extra = {"retry-after": str(retry_after)} if retry_after is not None else {}
        kind = ERROR_TYPES.get(status, "server_error")
        self._send_json(status, {"error": {"message": message, "type": kind, "param": None,
                                           "code": code or kind}}, extra)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0]
        if path.endswith("/models"):  # below any prefix: a runner may talk to it directly
            self._api(path, b"")
        else:
            super().do_GET()

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0]
        if path.startswith("/_fake/"):
            super().do_POST()
            return
        raw = self._read_body()
        if path.endswith("/chat/completions"):
            self._api(path, raw)
        else:
            self._send_error(404, f"not found: {path}")

    def _api(self, path: str, raw: bytes) -> None:
        try:
            body: Any = json.loads(raw) if raw else {}
        except ValueError:
            body = raw.decode("utf-8", "replace")
        fake = self.fake
        fake.record({"path": path, "method": self.command, "body": body,
                     "headers": {k.lower(): v for k, v in self.headers.items()}})
        inj = fake.take_injection()
        delay = (inj.delay_ms if inj and inj.delay_ms else 0) or fake.delay_ms
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
            self._send_error(inj.status, inj.message or f"injected {inj.status}",
                             inj.retry_after)
            return
        auth = self.headers.get("Authorization", "")
        if fake.require_key and not (auth.lower().startswith("bearer ") and len(auth) > 7):
            self._send_error(401, "You didn't provide an API key (Authorization: Bearer).",
                             code="invalid_api_key")
            return
        if path.endswith("/models"):
            self._send_json(200, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}]})
            return
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._send_error(400, "messages: a list is required")
            return
        used = len(json.dumps(body["messages"])) // 4 + 1
        if fake.context_tokens is not None and used > fake.context_tokens:
            self._send_error(400, f"This model's maximum context length is"
                             f" {fake.context_tokens} tokens. However, your messages resulted"
                             f" in {used} tokens.", code="context_length_exceeded")
            return
        text, calls = reply_for(body, fake.next_id, fake.reply)
        cid = f"chatcmpl-fake-{fake.next_id()}"
        if not body.get("stream"):
            self._send_json(200, completion(body, text, calls, cid, fake.extra_input_tokens))
            return
        parts = [f"data: {json.dumps(c)}\n\n".encode()
                 for c in chunks(body, text, calls, cid, fake.extra_input_tokens)]
        parts.append(b"data: [DONE]\n\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i, part in enumerate(parts):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                if i == 0 and inj and inj.stall_ms:
                    self.wfile.flush()
                    time.sleep(inj.stall_ms / 1000)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client gave up during a stall
            self.close_connection = True


class FakeOpenAI(FakeModel):
    """The fake OpenAI-compatible server; `url` is its base URL, `/v1` included."""

    handler = OpenAIHandler
    require_key = True  # False: a local server (Ollama) that takes calls without a key

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def authorizations(self) -> list[str]:
        """The `Authorization` header of every API request seen, in order."""
        with self._lock:
            return [r["headers"].get("authorization", "") for r in self.requests]


def main(argv: list[str] | None = None) -> int:
    return serve(FakeOpenAI, "Fake OpenAI-compatible API on 127.0.0.1", argv)

if __name__ == "__main__":
    raise SystemExit(main())
