"""Token usage read off model responses as they stream through the broker.

`Meter.feed(chunk)` sees every chunk on its way to the agent and keeps nothing but the
bytes of the current SSE line: it parses only `data:` lines that mention `"usage"`
(`message_start` carries the input and cache counts, each `message_delta` the running
output count), so text deltas pass at the cost of a substring search. A plain JSON
answer is kept (up to a cap) and read at the end. `Meter.usage` is then the request's
usage, ready for `Store.add_usage`.

Both answer formats are read: the Messages API's (above) and Chat Completions' (the
`usage` of the last stream chunk, or of the `chat.completion` JSON: `prompt_tokens`, of
which `prompt_tokens_details.cached_tokens` were cache reads, and `completion_tokens`),
counted in the same four fields. `estimate` stands in (4 bytes a token) for an answer
that reported no usage at all.
"""

from __future__ import annotations

import json
from typing import Any

FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
          "cache_read_input_tokens")
JSON_CAP = 4 * 1024 * 1024
LINE_CAP = 1024 * 1024


def total(usage: dict[str, int]) -> int:
    """What a budget counts: every token the request was billed for."""
    return sum(int(usage.get(k) or 0) for k in FIELDS)


class Meter:
    def __init__(self, content_type: str):
        self.sse = "text/event-stream" in (content_type or "")
        self.buf = bytearray()
        self.usage: dict[str, int] = {}

    def feed(self, chunk: bytes) -> None:
        if not self.sse:
            if len(self.buf) + len(chunk) <= JSON_CAP:
                self.buf += chunk
            return
        self.buf += chunk
        start = 0
        while True:
            end = self.buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self.buf[start:end])
            start = end + 1
            if line.startswith(b"data:") and b'"usage"' in line:
                self._event(line[5:])
        del self.buf[:start]
        if len(self.buf) > LINE_CAP:  # a line this long carries no usage we can use
            self.buf.clear()

    def _event(self, data: bytes) -> None:
        try:
            ev = json.loads(data)
        except ValueError:
            return
        if not isinstance(ev, dict):
            return
        if "choices" in ev or str(ev.get("object", "")).startswith("chat.completion"):
            self._take_openai(ev.get("usage"))
        elif ev.get("type") == "message_start":
            self._take((ev.get("message") or {}).get("usage"))
        elif ev.get("type") == "message_delta":
            self._take(ev.get("usage"))  # cumulative counts: the latest wins

    def _take(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for k in FIELDS:
                if isinstance(usage.get(k), int):
                    self.usage[k] = usage[k]

    def _take_openai(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        cached = cached if isinstance(cached, int) and cached > 0 else 0
        if isinstance(prompt, int):
            self.usage["input_tokens"] = max(prompt - cached, 0)
            self.usage["cache_read_input_tokens"] = cached
        if isinstance(completion, int):
            self.usage["output_tokens"] = completion

    def finish(self) -> dict[str, int]:
        if not self.sse and self.buf:
            try:
                body = json.loads(bytes(self.buf))
                if isinstance(body, dict) and body.get("type") == "message":
                    self._take(body.get("usage"))
                elif isinstance(body, dict) and body.get("object") == "chat.completion":
                    self._take_openai(body.get("usage"))
            except ValueError:
                pass
            self.buf.clear()
        return self.usage


def estimate(request_bytes: int, answer_bytes: int) -> dict[str, int]:
    """Usage for an answer that reported none (some local servers): 4 bytes a token."""
    if not answer_bytes:
        return {}
    return {"input_tokens": request_bytes // 4 + 1, "output_tokens": answer_bytes // 4 + 1}
