"""The tool loop the `anthropic` and `openai` providers share: one conversation, one
implementation of the nanoclaw and local tools, one retry and fallback policy.

A provider here is a `ToolLoopProvider` with one or two `Route`s: an `Api` (the wire
protocol: `anthropic.AnthropicApi`, `openai.OpenAIApi`), a model and the upstream the
host's broker forwards to (`<broker>/up/NAME`, the bare broker URL for the default
`anthropic` upstream). The conversation is kept in the Messages API's shape (text,
tool_use and tool_result blocks) whatever the API; an `Api` translates it on the way
out and its answer back (`Turn`), so a turn may start on Claude and finish on a local
model.

Retries are ours, not the SDKs', so each one is a visible `Retrying` event (honouring
`retry-after`) and a final failure an `Error`. Only an HTTP answer (the upstream's, or
the broker's own 502 saying the upstream failed) counts as an attempt: a call that got
none asks whether the broker is down or was restarted (`agent_runner/broker.py`), waits
for it (`Waiting` events, up to `broker_wait_s`) and is repeated uncounted. When the
model is still rate limited or overloaded after them and the group has a fallback (a
`fallback_model`, or a `fallback_upstream`, possibly of the other API), the fallback
answers instead, for `FALLBACK_FOR_S`, and the user is told (a `Notice`). When the
context is full, the oldest turns are set aside, archived, and the user is told.
The conversation lives in memory and is saved after every finished turn as
`<session>/.provider/<provider>-<id>.json`; the id is the continuation the poll loop
stores in `session_state`. A missing or corrupt file is a `StaleSession`: the loop clears
it and starts afresh instead of failing every turn. A failed turn is rolled back to the
last finished one, so history never holds a dangling tool call.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Protocol

from agent_runner import archive, broker
from agent_runner.config import DEFAULT_MODEL_STALL_S, Config
from agent_runner.providers import (
    Error,
    Event,
    Init,
    Notice,
    ProviderError,
    QueryInput,
    Result,
    Retrying,
    StaleSession,
    ToolEnd,
    ToolOutcome,
    ToolStart,
)

log = logging.getLogger("agent_runner")

MAX_TOKENS = 8192
MAX_TOOL_STEPS = 50
MAX_HISTORY = 400  # messages kept; older turns are dropped from the front
SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
# what the APIs say when the request is larger than the model's context window
CONTEXT_FULL = re.compile(r"prompt is too long|exceeds? (the )?context|context (window|limit)"
                          r"|maximum context length|context_length_exceeded", re.IGNORECASE)
MAX_DELAY_S = 60.0
FALLBACK_FOR_S = 600.0  # after falling back, stay on the fallback this long


def retries() -> int:
    """Read when a query runs, not at import: a warm runner imports before its session's
    environment arrives."""
    return int(os.environ.get("NANOCLAW_MODEL_RETRIES") or 3)


def busy_reason(status: int | None) -> str:
    return {429: "rate limited", 529: "overloaded"}.get(status or 0, "server error")


# --- what an API reports ------------------------------------------------------------------

@dataclass(frozen=True)
class Turn:
    """One model answer: content blocks (Messages API shape) and why it stopped
    (`end_turn`, `tool_use`, `pause_turn`, `max_tokens`)."""

    content: list[dict[str, Any]]
    stop_reason: str


@dataclass(frozen=True)
class Failure:
    """An API call that failed, as the loop needs to see it."""

    status: int | None  # the HTTP status; None when no answer came
    headers: Any = None  # the answer's headers (None without one)
    detail: str = ""  # the API's own message
    no_answer: bool = False  # connection-level: no HTTP response (maybe the broker)


class Api(Protocol):
    """A wire protocol to a model behind the broker."""

    errors: tuple[type[BaseException], ...]  # what `stream` raises for a failed call

    def stream(self, model: str, system: str, messages: list[dict[str, Any]],
               tools: list[dict[str, Any]] | None, effort: str | None,
               watch: broker.Watch, aborted: Callable[[], bool]
               ) -> Generator[Event, None, Turn]: ...

    def failure(self, exc: BaseException) -> Failure: ...

    def close(self) -> None: ...


def upstream_failed(f: Failure) -> bool:
    """The broker's own answer that it could not reach the model API (its 502 carries
    `broker.UPSTREAM_HEADER`): the broker is up, the upstream is not."""
    return f.headers is not None and bool(f.headers.get(broker.UPSTREAM_HEADER))


def classify_failure(f: Failure) -> ProviderError:
    """Map a failed call to what the user is told."""
    status, detail = f.status, f.detail
    if status is None:
        return ProviderError("could not reach the model (connection failed)",
                             retryable=True, classification="connection")
    if upstream_failed(f):
        return ProviderError(f"the host cannot reach the model API (HTTP {status}: {detail});"
                             " the owner can check the address and the network with"
                             " `nanoclaw doctor`", retryable=True, classification="upstream")
    if status in (408, 409, 429, 529) or status >= 500:
        return ProviderError(
            f"model overloaded/rate limited (HTTP {status}, {busy_reason(status)}); please"
            " try again in a moment", retryable=True,
            classification="quota" if status == 429 else "overloaded")
    if status in (401, 403) and "NanoClaw" in detail:  # the host's broker said no (a
        return ProviderError(detail, classification="auth")  # budget): its words are it
    if status in (401, 403):
        return ProviderError(f"the model API refused the host's key (HTTP {status}: {detail});"
                             " the owner should check it with `nanoclaw doctor` (the key is"
                             " ANTHROPIC_API_KEY, OPENAI_API_KEY or the upstream's own)",
                             classification="auth")
    if status in (400, 413) and CONTEXT_FULL.search(detail):
        return ProviderError(f"the conversation no longer fits the model's context"
                             f" (HTTP {status}) {detail}; /clear starts afresh".strip(),
                             classification="context_full")
    return ProviderError(f"model request rejected (HTTP {status}) {detail}".strip(),
                         classification="bad_request")


def retry_delay(f: Failure, attempt: int) -> float:
    """`retry-after` when the API gives one, else 1, 2, 4 … s; capped."""
    header = f.headers.get("retry-after") if f.headers is not None else None
    try:
        if header is not None:
            return min(max(float(header), 0.0), MAX_DELAY_S)
    except ValueError:
        pass
    return min(2.0 ** (attempt - 1), MAX_DELAY_S)


# --- history -------------------------------------------------------------------------------

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


# The Anthropic SDK's own JSON settings: its request body is what ours must match.
encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class History:
    """The conversation as JSON, each message encoded once. A turn's request carries the
    whole history and the file saved after it holds it again: encoded afresh each time,
    that is the agent's largest cost after the SDK, growing with the conversation. The
    loop never changes a message once it is in the list (each is a new dict), so a
    message's bytes are kept with it, found by identity, while it stays in the list.
    """

    def __init__(self) -> None:
        self._kept: dict[int, tuple[dict[str, Any], bytes]] = {}

    def encode(self, messages: list[dict[str, Any]]) -> bytes:
        kept, fresh = self._kept, {}
        parts = []
        for m in messages:
            entry = kept.get(id(m))
            if entry is None or entry[0] is not m:
                entry = (m, encode_json(m).encode())
            fresh[id(m)] = entry
            parts.append(entry[1])
        self._kept = fresh
        return b"[" + b",".join(parts) + b"]"


HISTORY = History()  # one conversation per agent process


def _trim(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep at most MAX_HISTORY messages, starting at a plain user prompt."""
    if len(messages) <= MAX_HISTORY:
        return messages
    start = len(messages) - MAX_HISTORY
    while start < len(messages) and not _prompt_at(messages, start):
        start += 1
    return messages[start:]


# --- routes: which API, model and upstream answer ------------------------------------------

APIS = {"anthropic": "agent_runner.providers.anthropic:AnthropicApi",
        "openai": "agent_runner.providers.openai:OpenAIApi"}


def make_api(api: str, base_url: str, token: str, stall_s: float = DEFAULT_MODEL_STALL_S) -> Api:
    """The client of one model API; a call whose answer goes silent for `stall_s` is
    given up (a timeout: the normal retry path), never waited on for good."""
    if api not in APIS:
        raise ProviderError(f"unknown model API {api!r}", classification="config")
    module, attr = APIS[api].split(":")
    return getattr(importlib.import_module(module), attr)(base_url, token, stall_s)


def upstream_url(broker_url: str, upstream: str, api: str) -> str:
    """Where the broker serves `upstream`: the bare broker URL for the default
    `anthropic` upstream (what the Claude CLI uses), else `<broker>/up/NAME`."""
    broker_url = broker_url.rstrip("/")
    if api == "anthropic" and upstream == "anthropic":
        return broker_url
    return f"{broker_url}/up/{upstream}"


@dataclass
class Route:
    api_name: str
    model: str
    upstream: str
    api: Api | None = None  # made on first use
    stall_s: float = DEFAULT_MODEL_STALL_S

    def label(self, other: "Route") -> str:
        """The model's name, with its upstream when the other route's differs."""
        return self.model if self.upstream == other.upstream else (
            f"{self.model} ({self.upstream})")

    def client(self) -> Api:
        if self.api is None:
            self.api = make_api(self.api_name,
                                upstream_url(os.environ.get("ANTHROPIC_BASE_URL", ""),
                                             self.upstream, self.api_name),
                                os.environ.get("ANTHROPIC_API_KEY") or "no-token",
                                self.stall_s)
        return self.api


def routes(config: Config, api: str) -> tuple[Route, Route | None]:
    """The group's route and its fallback's (None without one) from container.json."""
    upstream = config.upstream or ("anthropic" if api == "anthropic" else "openai")
    stall = config.model_stall_s
    primary = Route(config.upstream_api or api, config.model, upstream, stall_s=stall)
    fb_up = config.fallback_upstream
    if fb_up and fb_up != upstream:
        fb_api = config.fallback_upstream_api or primary.api_name
        return primary, Route(fb_api, config.fallback_model or config.model, fb_up,
                              stall_s=stall)
    if config.fallback_model and config.fallback_model != config.model:
        return primary, Route(primary.api_name, config.fallback_model, upstream, stall_s=stall)
    return primary, None


# --- the provider --------------------------------------------------------------------------

class ToolLoopProvider:
    """A provider whose tool loop is ours. Subclasses set `name` and `api`."""

    name = "toolloop"
    api = "anthropic"
    supports_native_slash_commands = False
    reads_claude_md = False

    def __init__(self, config: Config) -> None:
        self.model = config.model
        self.primary, self.fallback = routes(config, self.api)
        self.primary.client()  # a misconfiguration shows at start, not at the first turn
        self.fallback_until = 0.0
        self.effort = config.effort
        self.dir = config.provider_dir
        self.archive_dir = os.path.join(config.group_dir, "conversations")
        self.watch = broker.Watch(config.broker_wait_s)
        self._id: str | None = None
        self._history: list[dict[str, Any]] = []

    def current(self) -> Route:
        """The group's route, or its fallback for a while after the model stayed busy."""
        if self.fallback and time.monotonic() < self.fallback_until:
            return self.fallback
        return self.primary

    # -- continuation files
    def _path(self, cid: str) -> str:
        if not SAFE_ID.match(cid):
            raise StaleSession(f"bad continuation id {cid!r}")
        return os.path.join(self.dir, f"{self.name}-{cid}.json")

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
        head = encode_json({"version": 1, "id": cid, "model": self.model})[:-1]
        with open(tmp, "wb") as fh:
            fh.write(b"".join([head.encode(), b',"messages":', HISTORY.encode(messages), b"}"]))
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
        for route in (self.primary, self.fallback):
            if route is not None and route.api is not None:
                route.api.close()

    def query(self, q: QueryInput) -> "ToolLoopQuery":
        return ToolLoopQuery(self, q)


class ToolLoopQuery:
    """One prompt and any pushed follow-ups; each finished turn yields a `Result`."""

    def __init__(self, provider: ToolLoopProvider, q: QueryInput) -> None:
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
            content = final.content
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

    def _call(self, messages: list[dict[str, Any]]) -> Generator[Event, None, Turn]:
        tools = self.q.tools.specs(local=True) if self.q.tools is not None else None
        route = self.p.current()
        attempt = 0
        repeated, waited = 0, 0.0  # calls repeated for a broker outage, time waited for it
        watch = self.p.watch
        watch.learn()
        while True:
            attempt += 1
            api = route.client()
            try:
                return (yield from api.stream(route.model, self.q.system, messages, tools,
                                              self.p.effort, watch, lambda: self._aborted))
            except api.errors as exc:
                f = api.failure(exc)
                if f.status is not None:
                    watch.note(f.headers)  # an answer: the broker is up
                elif f.no_answer and repeated < broker.MAX_FREE_RETRIES:
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
                err = classify_failure(f)
                log.warning("model call failed error_type=%s attempt=%d upstream=%s",
                            type(exc).__name__, attempt, route.upstream)
                fallback = self.p.fallback
                if (attempt > retries() and fallback and route is not fallback
                        and err.classification in ("quota", "overloaded")):
                    self.p.fallback_until = time.monotonic() + FALLBACK_FOR_S
                    log.warning("model %s (%s) stayed busy; falling back to %s (%s)",
                                route.model, route.upstream, fallback.model, fallback.upstream)
                    yield Notice(f"({route.label(fallback)} is still busy"
                                 f" ({busy_reason(f.status)}), so {fallback.label(route)}"
                                 " answers for now.)")
                    route, attempt = fallback, 0
                    continue
                if not err.retryable or attempt > retries():
                    if err.retryable and attempt > 1:
                        err = ProviderError(f"{err} (gave up after {attempt} attempts)",
                                            True, err.classification)
                    raise err from exc
                delay = retry_delay(f, attempt)
                reason = (f"HTTP {f.status}, the host cannot reach the model API"
                          if upstream_failed(f) else
                          f"HTTP {f.status}, {busy_reason(f.status)}" if f.status
                          else "connection failed")
                yield Retrying(attempt, retries() + 1, delay, reason, f.status,
                               upstream_failed(f))
                self._sleep(delay)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._aborted and time.monotonic() < end:
            time.sleep(min(0.05, max(end - time.monotonic(), 0)))
        if self._aborted:
            raise ProviderError("aborted")

    def _run_tools(self, content: list[dict[str, Any]]) -> Generator[Event, None, list]:
        """Run each tool call of an answer through the one Toolbox; the results as
        tool_result blocks, in order."""
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
