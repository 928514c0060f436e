"""The `openai` provider: any OpenAI-compatible Chat Completions server (OpenAI, Ollama,
vLLM, llama.cpp's server, OpenRouter) behind the host's broker, with our own tool loop.

The loop, the tools, retries, fallback and context-full archiving are the shared
`toolloop.py`, exactly as for `anthropic`; here is the Chat Completions side of it
(`OpenAIApi`): the conversation (kept in the Messages API's shape) written as chat
messages (`to_chat`: a `tool_use` block is a `tool_calls` entry, a `tool_result` a
`tool` message), the tools as `function`s, a streamed call asking for its usage chunk,
and the streamed `choices[].delta` (text, and tool calls whose arguments arrive in
pieces) read back into content blocks. The `openai` package talks to
`<broker>/up/<upstream>` with the session token as its key; the broker swaps in the
upstream's own key, if it has one.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Generator

import httpx
import openai

from agent_runner import broker
from agent_runner.providers import Activity, Event, ProviderError
from agent_runner.providers.toolloop import Failure, ToolLoopProvider, Turn

log = logging.getLogger("agent_runner")

TOOL_ID = re.compile(r"[^A-Za-z0-9_-]")
FINISH = {"tool_calls": "tool_use", "function_call": "tool_use", "length": "max_tokens",
          "stop": "end_turn", "content_filter": "end_turn"}


# --- the conversation, both ways -----------------------------------------------------------

def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(str(b.get("text", "")) for b in content or []
                     if isinstance(b, dict) and b.get("type") == "text")


def to_chat(system: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages API turns as Chat Completions messages."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in messages:
        content = m.get("content")
        if m.get("role") == "assistant":
            blocks = content if isinstance(content, list) else [
                {"type": "text", "text": str(content or "")}]
            msg: dict[str, Any] = {"role": "assistant", "content": _text(blocks) or None}
            calls = [{"id": b["id"], "type": "function",
                      "function": {"name": b["name"], "arguments": json.dumps(b.get("input"))}}
                     for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        if isinstance(content, str):
            out.append({"role": "user", "content": content})
            continue
        for b in content or []:  # tool results first: they answer the last assistant turn
            if isinstance(b, dict) and b.get("type") == "tool_result":
                text = _text(b.get("content"))
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                            "content": f"Error: {text}" if b.get("is_error")
                            and not text.startswith("Error") else text})
        text = _text(content)
        if text:
            out.append({"role": "user", "content": text})
    return out


def to_functions(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our tool specs (name, description, input_schema) as Chat Completions tools."""
    return [{"type": "function", "function": {"name": t["name"], "description":
                                              t.get("description", ""),
                                              "parameters": t["input_schema"]}}
            for t in specs]


class Assembler:
    """Streamed chunks → the answer's content blocks, in order: text, then tool calls
    (their arguments concatenated by index)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.usage: Any = None

    def feed(self, chunk: Any) -> None:
        self.usage = getattr(chunk, "usage", None) or self.usage
        for choice in getattr(chunk, "choices", None) or []:
            delta = choice.delta
            if delta is not None and delta.content:
                self.text.append(delta.content)
            for tc in (delta.tool_calls if delta is not None else None) or []:
                entry = self.calls.setdefault(tc.index if tc.index is not None else len(
                    self.calls), {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                if tc.function is not None:
                    entry["name"] = tc.function.name or entry["name"]
                    entry["arguments"] += tc.function.arguments or ""
            self.finish = choice.finish_reason or self.finish

    def turn(self) -> Turn:
        content: list[dict[str, Any]] = []
        text = "".join(self.text)
        if text:
            content.append({"type": "text", "text": text})
        for i, call in sorted(self.calls.items()):
            try:
                args = json.loads(call["arguments"]) if call["arguments"].strip() else {}
            except ValueError:
                args = {"_unparsed_arguments": call["arguments"][:2000]}  # the tool says so
            ident = TOOL_ID.sub("_", call["id"] or "")[:64] or f"call_{i}"
            content.append({"type": "tool_use", "id": ident, "name": call["name"],
                            "input": args if isinstance(args, dict) else {"value": args}})
        stop = "tool_use" if self.calls else FINISH.get(self.finish or "stop", "end_turn")
        return Turn(content, stop)


# --- the API -------------------------------------------------------------------------------

def failure(exc: BaseException) -> Failure:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        detail = body.get("message") if isinstance(body, dict) else None
        return Failure(exc.status_code, exc.response.headers, str(detail or exc.message))
    # no answer at all, or the stream broke off (httpx's own error, mid-stream)
    return Failure(None, None, str(exc), no_answer=isinstance(
        exc, (openai.APIConnectionError, httpx.TransportError)))


class OpenAIApi:
    """Chat Completions behind the broker, at `base_url` (`<broker>/up/<upstream>`)."""

    errors = (openai.OpenAIError, httpx.TransportError)

    def __init__(self, base_url: str, token: str, stall_s: float = 120.0) -> None:
        self.client = openai.OpenAI(  # `read`: the longest silence mid-answer
            api_key=token, base_url=base_url, max_retries=0,
            timeout=openai.Timeout(600.0, connect=10.0, read=stall_s))

    def failure(self, exc: BaseException) -> Failure:
        return failure(exc)

    def close(self) -> None:
        self.client.close()

    def stream(self, model: str, system: str, messages: list[dict[str, Any]],
               tools: list[dict[str, Any]] | None, effort: str | None,
               watch: broker.Watch, aborted: Callable[[], bool]
               ) -> Generator[Event, None, Turn]:
        kwargs: dict[str, Any] = {"model": model, "messages": to_chat(system, messages),
                                  "stream": True, "stream_options": {"include_usage": True}}
        if tools:
            kwargs["tools"] = to_functions(tools)
        raw = self.client.chat.completions.with_raw_response.create(**kwargs)
        watch.note(raw.headers)
        stream = raw.parse()
        answer = Assembler()
        try:
            yield Activity("stream")
            for chunk in stream:
                answer.feed(chunk)
                if aborted():
                    raise ProviderError("aborted")
        finally:
            stream.close()
        if answer.usage is not None:
            log.info("model usage prompt=%s completion=%s",
                     getattr(answer.usage, "prompt_tokens", None),
                     getattr(answer.usage, "completion_tokens", None))
        return answer.turn()


def warm_up() -> None:
    """One streamed call against a canned in-memory reply, so a warm agent has what a
    real turn loads imported before its session arrives. No network, no credential."""
    chunks = [{"id": "w", "object": "chat.completion.chunk", "created": 0, "model": "warm",
               "choices": [{"index": 0, "delta": {"content": "ok", "tool_calls": [
                   {"index": 0, "id": "call_w", "type": "function",
                    "function": {"name": "bash", "arguments": "{}"}}]},
                   "finish_reason": "tool_calls"}]},
              {"id": "w", "object": "chat.completion.chunk", "created": 0, "model": "warm",
               "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                        "total_tokens": 2}}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def reply(request: Any) -> Any:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=body.encode())

    with httpx.Client(transport=httpx.MockTransport(reply)) as http:
        api = OpenAIApi.__new__(OpenAIApi)
        api.client = openai.OpenAI(api_key="warm", base_url="http://warm.invalid",
                                   http_client=http, max_retries=0)
        gen = api.stream("warm", "warm", [{"role": "user", "content": "warm"}],
                         [{"name": "bash", "description": "warm",
                           "input_schema": {"type": "object"}}], None,
                         broker.Watch(1.0, base_url=lambda: ""), lambda: False)
        try:
            while True:
                next(gen)
        except StopIteration:
            pass


class OpenAIProvider(ToolLoopProvider):
    name = "openai"
    api = "openai"
