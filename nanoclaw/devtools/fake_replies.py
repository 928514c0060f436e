"""The fake model's answers, pure: what it replies to a Messages API request and how
that reply is written on the wire (a JSON message, or the SSE stream the real API sends).

The reply is scripted and deterministic: a `[[tool:name {json}]]` marker in the last user
turn becomes that tool call; a tool result alone is answered `done: <result>`; anything
else is echoed (`echo: <text>`, or a `<message to=...>` reply to the last `<message
from=...>`), unless a fixed reply is set. Token counts are estimated (4 characters a token).
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

MODEL = "claude-fake-1"
TOOL_MARKER = re.compile(
    r"\[\[tool:(?P<name>[A-Za-z0-9_\-]+)(?:\s+(?P<json>\{.*?\}))?\s*\]\]", re.S)
MESSAGE_BLOCK = re.compile(r"<message\b(?P<attrs>[^>]*)>(?P<body>.*?)</message>", re.S)
FROM_ATTR = re.compile(r"""\bfrom\s*=\s*(?:"([^"]*)"|'([^']*)')""")
SYSTEM_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.S)


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


def usage(body: dict[str, Any], blocks: list[dict], extra_input: int = 0) -> dict[str, int]:
    return {
        "input_tokens": len(json.dumps(body.get("messages", ""))) // 4 + 1 + extra_input,
        "output_tokens": len(json.dumps(blocks)) // 4 + 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def api_message(body: dict[str, Any], blocks: list[dict], msg_id: str,
                extra_input: int = 0) -> dict[str, Any]:
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    return {
        "id": msg_id, "type": "message", "role": "assistant", "model": body.get("model") or MODEL,
        "content": blocks, "stop_reason": stop, "stop_sequence": None,
        "usage": usage(body, blocks, extra_input),
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
