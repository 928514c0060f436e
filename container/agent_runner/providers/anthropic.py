"""The `anthropic` provider: the Messages API with our own tool loop, no CLI.

The client reads ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY (the host's broker and a
per-session token). Retries are ours, not the SDK's, so each one is a visible `Retrying`
event (honouring `retry-after`) and a final failure an `Error`. Only an HTTP answer
(the upstream's, or the broker's own 502 saying the upstream failed) counts as an
attempt: a call that got none asks whether the broker is down or was restarted
(`agent_runner/broker.py`), waits for it (`Waiting` events, up to `broker_wait_s`) and
is repeated uncounted. When the model is still
rate limited or overloaded after them and the group has a `fallback_model`, that model
answers instead, for `FALLBACK_FOR_S`, and the user is told (a `Notice`). When the
context is full, the oldest turns are set aside, archived, and the user is told.
The conversation lives in memory and is saved after every finished
turn as `<session>/.provider/anthropic-<id>.json`; the id is the continuation the poll
loop stores in `session_state`. A missing or corrupt file is a `StaleSession`: the loop
clears it and starts afresh instead of failing every turn. A failed turn is rolled back
to the last finished one, so history never holds a dangling tool call.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from typing import Any, Generator, Iterator

from agent_runner import archive, broker
from agent_runner.config import Config
from agent_runner.providers import (
    Activity, Error, Event, Init, Notice, ProviderError, QueryInput, Result, Retrying,
    StaleSession, ToolEnd, ToolOutcome, ToolStart,
)
from agent_runner.providers.lazy_import import import_anthropic

anthropic = import_anthropic()

log = logging.getLogger("agent_runner")

MAX_TOKENS = 8192
MAX_TOOL_STEPS = 50
MAX_HISTORY = 400  # messages kept; older turns are dropped from the front
SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
# what the API says when the request is larger than the model's context window
CONTEXT_FULL = re.compile(r"prompt is too long|exceeds? (the )?context|context (window|limit)",
                          re.IGNORECASE)


def retries() -> int:
    """Read when a query runs, not at import: a warm runner imports before its session's
    environment arrives."""
    return int(os.environ.get("NANOCLAW_MODEL_RETRIES") or 3)
MAX_DELAY_S = 60.0
FALLBACK_FOR_S = 600.0  # after falling back, stay on the fallback model this long


def busy_reason(status: int) -> str:
    return {429: "rate limited", 529: "overloaded"}.get(status, "server error")


def upstream_failed(exc: Exception) -> bool:
    """The broker's own answer that it could not reach the model API (its 502 carries
    `broker.UPSTREAM_HEADER`): the broker is up, the upstream is not."""
    response = getattr(exc, "response", None)
    return response is not None and bool(response.headers.get(broker.UPSTREAM_HEADER))


def classify(exc: Exception) -> ProviderError:
    """Map an SDK error to what the user is told."""
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        detail = getattr(exc, "api_message", None) or ""
        if upstream_failed(exc):
            return ProviderError(f"the host could not reach the model API (HTTP {status});"
                                 " please try again in a moment", retryable=True,
                                 classification="upstream")
        if status in (408, 409, 429, 529) or status >= 500:
            return ProviderError(
                f"model overloaded/rate limited (HTTP {status}, {busy_reason(status)}); please"
                " try again in a moment", retryable=True,
                classification="quota" if status == 429 else "overloaded")
        if status in (401, 403):
            return ProviderError(f"model access denied (HTTP {status}) {detail}".strip(),
                                 classification="auth")
        if status in (400, 413) and CONTEXT_FULL.search(detail or str(exc)):
            return ProviderError(f"the conversation no longer fits the model's context"
                                 f" (HTTP {status}) {detail}; /clear starts afresh".strip(),
                                 classification="context_full")
        return ProviderError(f"model request rejected (HTTP {status}) {detail}".strip(),
                             classification="bad_request")
    if isinstance(exc, anthropic.APIConnectionError):
        return ProviderError("could not reach the model (connection failed)",
                             retryable=True, classification="connection")
    return ProviderError(f"model call failed: {exc}")


def retry_delay(exc: Exception, attempt: int) -> float:
    """`retry-after` when the API gives one, else 1, 2, 4 … s; capped."""
    response = getattr(exc, "response", None)
    header = response.headers.get("retry-after") if response is not None else None
    try:
        if header is not None:
            return min(max(float(header), 0.0), MAX_DELAY_S)
    except ValueError:
        pass
    return min(2.0 ** (attempt - 1), MAX_DELAY_S)


def _block(b: Any) -> dict[str, Any] | None:
    kind = getattr(b, "type", None)
    if kind == "text":
        return {"type": "text", "text": b.text}
    if kind == "tool_use":
        return {"type": "tool_use", "id": b.id, "name": b.name, "input": b.input}
    return None  # thinking and server blocks are not requested


def _prompt_at(messages: list[dict[str, Any]], i: int) -> bool:
    """A plain user prompt: a place where a history may start (no dangling tool result)."""
    return messages[i]["role"] == "user" and isinstance(messages[i]["content"], str)


def shed(messages: list[dict[str, Any]], keep_from: int) -> list[dict[str, Any]]:
    """Set aside the older half of `messages[:keep_from]` (the turns before the current
    one), cut at a plain user prompt; returns what was removed (also from `messages`)."""
    if keep_from <= 0:
        return []
    cut = keep_from // 2 or keep_from
    while cut < keep_from and not _prompt_at(messages, cut):
        cut += 1
    removed = messages[:cut]
    del messages[:cut]
    return removed


def _trim(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep at most MAX_HISTORY messages, starting at a plain user prompt."""
    if len(messages) <= MAX_HISTORY:
        return messages
    start = len(messages) - MAX_HISTORY
    while start < len(messages) and not (
            messages[start]["role"] == "user" and isinstance(messages[start]["content"], str)):
        start += 1
    return messages[start:]


_WARM_EVENTS = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_warm", "type": "message", "role": "assistant", "model": "warm", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "ok"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_warm", "name": "bash", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use",
                                                          "stop_sequence": None},
                       "usage": {"output_tokens": 2}}),
    ("message_stop", {"type": "message_stop"}),
]


def warm_up() -> None:
    """Run one streamed call against a canned in-memory reply, so a warm agent has every
    module a real turn loads (request building, SSE parsing, the message types) imported
    before its session arrives. No network, no credential."""
    try:  # the SDK's own HTTP package: httpx2 in newer releases, httpx before
        import httpx2 as httpx  # type: ignore[import-not-found]
    except ImportError:
        import httpx

    body = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in _WARM_EVENTS)

    def reply(request: Any) -> Any:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=body.encode())

    with httpx.Client(transport=httpx.MockTransport(reply)) as http:
        client = anthropic.Anthropic(api_key="warm", base_url="http://warm.invalid",
                                     http_client=http, max_retries=0)
        with client.messages.stream(model="warm", max_tokens=1,
                                    messages=[{"role": "user", "content": "warm"}],
                                    tools=[{"name": "bash", "description": "warm",
                                            "input_schema": {"type": "object"}}]) as stream:
            for _ in stream:
                pass
            stream.get_final_message()


class AnthropicProvider:
    name = "anthropic"
    supports_native_slash_commands = False
    reads_claude_md = False

    def __init__(self, config: Config) -> None:
        self.model = config.model
        self.fallback = config.fallback_model if config.fallback_model != config.model else None
        self.fallback_until = 0.0
        self.effort = config.effort
        self.dir = config.provider_dir
        self.archive_dir = os.path.join(config.group_dir, "conversations")
        self.client = anthropic.Anthropic(max_retries=0)
        self.watch = broker.Watch(config.broker_wait_s)
        self._id: str | None = None
        self._history: list[dict[str, Any]] = []

    def current_model(self) -> str:
        """The group's model, or its fallback for a while after the model stayed busy."""
        if self.fallback and time.monotonic() < self.fallback_until:
            return self.fallback
        return self.model

    # -- continuation files
    def _path(self, cid: str) -> str:
        if not SAFE_ID.match(cid):
            raise StaleSession(f"bad continuation id {cid!r}")
        return os.path.join(self.dir, f"anthropic-{cid}.json")

    def _load(self, cid: str) -> list[dict[str, Any]]:
        try:
            with open(self._path(cid), encoding="utf-8") as fh:
                data = json.load(fh)
            messages = data["messages"]
            if not all(isinstance(m, dict) and m.get("role") in ("user", "assistant")
                       for m in messages):
                raise ValueError("bad message entry")
        except StaleSession:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StaleSession(f"conversation {cid} cannot be resumed: {exc}") from exc
        return messages

    def _save(self, cid: str, messages: list[dict[str, Any]]) -> None:
        os.makedirs(self.dir, exist_ok=True)
        path = self._path(cid)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            # dumps, not dump: json.dump streams through the pure-Python encoder (~10x slower)
            fh.write(json.dumps({"version": 1, "id": cid, "model": self.model,
                                 "messages": messages}))
        os.replace(tmp, path)

    def resume(self, cid: str | None) -> tuple[str, list[dict[str, Any]]]:
        if cid is None:
            self._id, self._history = uuid.uuid4().hex, []
            return self._id, []
        if cid == self._id:
            return cid, list(self._history)
        return cid, self._load(cid)

    def commit(self, cid: str, messages: list[dict[str, Any]]) -> None:
        self._id, self._history = cid, _trim(list(messages))
        self._save(cid, self._history)

    def forget(self, continuation: str) -> None:
        if continuation == self._id:
            self._id, self._history = None, []
        try:
            os.unlink(self._path(continuation))
        except (OSError, StaleSession):
            pass

    def is_session_invalid(self, err: BaseException) -> bool:
        return isinstance(err, StaleSession)

    def close(self) -> None:
        self.client.close()

    def query(self, q: QueryInput) -> "AnthropicQuery":
        return AnthropicQuery(self, q)


class AnthropicQuery:
    """One prompt and any pushed follow-ups; each finished turn yields a `Result`."""

    def __init__(self, provider: AnthropicProvider, q: QueryInput) -> None:
        self.p = provider
        self.q = q
        self._pushed: list[str] = []
        self._ended = False
        self._aborted = False

    def push(self, text: str) -> None:
        self._pushed.append(text)

    def end(self) -> None:
        self._ended = True

    def abort(self) -> None:
        self._aborted = True

    def events(self) -> Iterator[Event]:
        try:
            cid, messages = self.p.resume(self.q.continuation)
        except StaleSession as exc:
            yield Error(exc)
            return
        yield Init(cid)
        messages.append({"role": "user", "content": self.q.prompt})
        turn = len(messages) - 1  # where the unanswered input starts
        texts: list[str] = []
        steps = 0
        while not self._aborted:
            try:
                final = yield from self._call(messages)
            except ProviderError as exc:
                if exc.classification == "context_full":
                    removed = shed(messages, turn)
                    if removed:
                        turn -= len(removed)
                        yield Notice(self._set_aside(cid, removed))
                        continue
                yield Error(exc)
                return
            content = [b for b in map(_block, final.content) if b is not None]
            if content:
                messages.append({"role": "assistant", "content": content})
            texts += [b["text"] for b in content if b["type"] == "text"]
            if final.stop_reason in ("tool_use", "pause_turn") and steps < MAX_TOOL_STEPS:
                steps += 1
                if final.stop_reason == "tool_use":
                    results = yield from self._run_tools(content)
                    messages.append({"role": "user", "content": results})
                continue
            self.p.commit(cid, messages)
            yield Result("\n".join(texts), more=bool(self._pushed))
            texts, steps = [], 0
            if not self._pushed or self._aborted:
                return
            turn = len(messages)
            messages.append({"role": "user", "content": "\n\n".join(self._pushed)})
            self._pushed.clear()

    def _set_aside(self, cid: str, removed: list[dict[str, Any]]) -> str:
        """Archive what no longer fits; returns what the user is told."""
        where = ""
        try:
            path = archive.archive_messages(removed, self.p.archive_dir, cid,
                                            "when the context was full")
            where = f" They are kept in conversations/{os.path.basename(path)}."
        except OSError as exc:
            log.warning("cannot archive set-aside messages error=%s", exc)
        log.warning("context full: set aside messages=%d", len(removed))
        return (f"(My context was full, so I set aside the oldest {len(removed)} messages of"
                f" our conversation and no longer see them.{where})")

    def _call(self, messages: list[dict[str, Any]]) -> Generator[Event, None, Any]:
        kwargs: dict[str, Any] = {"model": self.p.current_model(), "max_tokens": MAX_TOKENS,
                                  "system": self.q.system, "messages": messages}
        if self.q.tools is not None:
            kwargs["tools"] = self.q.tools.specs(local=True)
        if self.p.effort:
            kwargs["output_config"] = {"effort": self.p.effort}
        attempt = 0
        repeated, waited = 0, 0.0  # calls repeated for a broker outage, time waited for it
        watch = self.p.watch
        watch.learn()
        while True:
            attempt += 1
            try:
                with self.p.client.messages.stream(**kwargs) as stream:
                    watch.note(getattr(getattr(stream, "response", None), "headers", None))
                    for event in stream:
                        if event.type in ("message_start", "content_block_stop"):
                            yield Activity("stream")
                        if self._aborted:
                            raise ProviderError("aborted")
                    return stream.get_final_message()
            except anthropic.AnthropicError as exc:
                if isinstance(exc, anthropic.APIStatusError):
                    watch.note(exc.response.headers)  # an answer: the broker is up
                elif (isinstance(exc, anthropic.APIConnectionError)
                      and repeated < broker.MAX_FREE_RETRIES):
                    # no answer: is the broker down (wait for it) or restarted?
                    began = time.monotonic()
                    verdict = yield from watch.settle(lambda: self._aborted,
                                                      max(watch.limit_s - waited, 1.0))
                    waited += time.monotonic() - began
                    if verdict == "down":
                        raise broker.unreachable_error(waited) from exc
                    if verdict in ("back", "restarted"):  # not the model's failure
                        attempt -= 1
                        repeated += 1
                        continue
                err = classify(exc)
                log.warning("model call failed error_type=%s attempt=%d", type(exc).__name__,
                            attempt)
                fallback = self.p.fallback
                if (attempt > retries() and fallback and kwargs["model"] != fallback
                        and err.classification in ("quota", "overloaded")):
                    self.p.fallback_until = time.monotonic() + FALLBACK_FOR_S
                    log.warning("model %s stayed busy; falling back to %s", kwargs["model"],
                                fallback)
                    yield Notice(f"({kwargs['model']} is still busy"
                                 f" ({busy_reason(getattr(exc, 'status_code', 0))}), so"
                                 f" {fallback} answers for now.)")
                    kwargs["model"], attempt = fallback, 0
                    continue
                if not err.retryable or attempt > retries():
                    if err.retryable and attempt > 1:
                        err = ProviderError(f"{err} (gave up after {attempt} attempts)",
                                            True, err.classification)
                    raise err from exc
                delay = retry_delay(exc, attempt)
                status = getattr(exc, "status_code", None)
                reason = (f"HTTP {status}, the host cannot reach the model API"
                          if upstream_failed(exc) else
                          f"HTTP {status}, {busy_reason(status)}" if status
                          else "connection failed")
                yield Retrying(attempt, retries() + 1, delay, reason, status)
                self._sleep(delay)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._aborted and time.monotonic() < end:
            time.sleep(min(0.05, max(end - time.monotonic(), 0)))
        if self._aborted:
            raise ProviderError("aborted")

    def _run_tools(self, content: list[dict[str, Any]]) -> Generator[Event, None, list]:
        results = []
        for block in content:
            if block["type"] != "tool_use":
                continue
            name, args = block["name"], block["input"] if isinstance(block["input"], dict) else {}
            tools = self.q.tools
            yield ToolStart(name, tools.timeout_ms(name, args) if tools else None)
            outcome = tools.run(name, args) if tools else ToolOutcome("no tools here", True)
            yield ToolEnd(name)
            results.append({"type": "tool_result", "tool_use_id": block["id"],
                            "content": outcome.text, "is_error": outcome.is_error})
        return results
