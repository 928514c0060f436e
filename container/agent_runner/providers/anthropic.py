"""The `anthropic` provider: the Messages API with our own tool loop, no CLI.

The loop, the history, retries, fallback and context-full archiving are the shared
`toolloop.py`; here is the Messages API's side of it (`AnthropicApi`): a streamed call
through the host's broker (`ANTHROPIC_BASE_URL`, the per-session token as the key), its
answer as content blocks, its errors as `Failure`s. An `openai` group whose fallback is
an Anthropic-style upstream uses the same class.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from typing import Any, Callable, Generator

from agent_runner import broker
from agent_runner.providers import Activity, Event, ProviderError
from agent_runner.providers.lazy_import import import_anthropic
from agent_runner.providers.toolloop import (
    HISTORY,
    MAX_TOKENS,
    Failure,
    ToolLoopProvider,
    Turn,
    classify_failure,
    encode_json,
)

anthropic = import_anthropic()
from anthropic.lib.streaming import MessageStreamManager  # noqa: E402 (after the lazy shim)

log = logging.getLogger("agent_runner")


def failure(exc: BaseException) -> Failure:
    """What the loop needs to know of an SDK error."""
    if isinstance(exc, anthropic.APIStatusError):
        detail = getattr(exc, "api_message", None) or str(exc)
        return Failure(exc.status_code, exc.response.headers, detail)
    return Failure(None, None, str(exc), no_answer=isinstance(exc, anthropic.APIConnectionError))


def upstream_failed(exc: Exception) -> bool:
    """The broker's own answer that it could not reach the model API (its 502 carries
    `broker.UPSTREAM_HEADER`): the broker is up, the upstream is not."""
    response = getattr(exc, "response", None)
    return response is not None and bool(response.headers.get(broker.UPSTREAM_HEADER))


def classify(exc: Exception) -> ProviderError:
    """Map an SDK error to what the user is told."""
    if isinstance(exc, (anthropic.APIStatusError, anthropic.APIConnectionError)):
        return classify_failure(failure(exc))
    return ProviderError(f"model call failed: {exc}")


def _block(b: Any) -> dict[str, Any] | None:
    kind = getattr(b, "type", None)
    if kind == "text":
        return {"type": "text", "text": b.text}
    if kind == "tool_use":
        return {"type": "tool_use", "id": b.id, "name": b.name, "input": b.input}
    return None  # thinking and server blocks are not requested


class AnthropicApi:
    """The Messages API behind the broker, at `base_url` (see toolloop.upstream_url)."""

    errors = (anthropic.AnthropicError,)

    def __init__(self, base_url: str, token: str, stall_s: float = 120.0,
                 http_client: Any = None) -> None:
        self.client = anthropic.Anthropic(  # `read`: the longest silence mid-answer
            api_key=token, base_url=base_url, max_retries=0,
            timeout=anthropic.Timeout(600.0, connect=10.0, read=stall_s),
            http_client=http_client or anthropic.DefaultHttpxClient(verify=tls_context()))
        self.body = Body()

    def failure(self, exc: BaseException) -> Failure:
        return failure(exc)

    def close(self) -> None:
        self.client.close()

    def stream(self, model: str, system: str, messages: list[dict[str, Any]],
               tools: list[dict[str, Any]] | None, effort: str | None,
               watch: broker.Watch, aborted: Callable[[], bool]
               ) -> Generator[Event, None, Turn]:
        body = self.body.encode(model, system, messages, tools, effort)
        request = functools.partial(
            self.client.post, "/v1/messages", content=body, cast_to=anthropic.types.Message,
            stream=True, stream_cls=anthropic.Stream[anthropic.types.RawMessageStreamEvent],
            options={"headers": _STREAM_HEADERS})
        with MessageStreamManager(request, output_format=anthropic.NOT_GIVEN) as stream:
            watch.note(getattr(getattr(stream, "response", None), "headers", None))
            for event in stream:
                if event.type in ("message_start", "content_block_stop"):
                    yield Activity("stream")
                if aborted():
                    raise ProviderError("aborted")
            final = stream.get_final_message()
        return Turn([b for b in map(_block, final.content) if b is not None],
                    final.stop_reason or "end_turn")


# What `messages.stream()` adds to its request, so the broker and the API see the same.
_STREAM_HEADERS = {"X-Stainless-Helper-Method": "stream", "X-Stainless-Stream-Helper": "messages"}


class Body:
    """The JSON of a streamed Messages request, made by us and handed to the SDK as bytes.

    `messages.stream()` copies the whole request into fresh containers (its check for
    file inputs to read) and encodes all of it at every call. Most of it does not change
    between calls: the tool schemas and the system prompt, about three quarters of a
    typical body. Here each is encoded once and its bytes kept while an equal value comes
    again, and each message of the conversation once (`toolloop.History`). The JSON is
    what the SDK would send for the same arguments (same keys, order and encoder
    settings); a test compares the two.
    """

    def __init__(self) -> None:
        self._kept: dict[str, tuple[Any, bytes]] = {}

    def _part(self, name: str, value: Any) -> bytes:
        last = self._kept.get(name)
        if last is not None and last[0] == value:
            return last[1]
        data = encode_json(value).encode()
        self._kept[name] = (copy.deepcopy(value), data)
        return data

    def encode(self, model: str, system: str, messages: list[dict[str, Any]],
               tools: list[dict[str, Any]] | None, effort: str | None) -> bytes:
        parts = [b'{"max_tokens":%d,"messages":' % MAX_TOKENS, HISTORY.encode(messages),
                 b',"model":', encode_json(model).encode()]
        if effort:
            parts += [b',"output_config":', encode_json({"effort": effort}).encode()]
        parts += [b',"system":', self._part("system", system)]
        if tools is not None:
            parts += [b',"tools":', self._part("tools", tools)]
        parts.append(b',"stream":true}')
        return b"".join(parts)


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


_TLS: Any = None


def tls_context() -> Any:
    """The TLS settings of the SDK's HTTP client (its own default: the system's CA
    bundle), made once per process. Each client would load the bundle again (~140
    certificates); made in the zygote's warm-up, every agent it forks shares it."""
    global _TLS
    if _TLS is None:
        _TLS = _http().create_ssl_context()
    return _TLS


def _http() -> Any:
    try:  # the SDK's own HTTP package: httpx2 in newer releases, httpx before
        import httpx2 as httpx  # type: ignore[import-not-found]
    except ImportError:
        import httpx
    return httpx


# What a real request loads beyond the canned one below (its transport, HTTP/1.1 and /2
# state machines): imported in the warm-up, so an agent forked from the zygote shares
# them instead of importing its own copy at its first call.
_TRANSPORT = ("httpcore2._sync.connection_pool", "httpcore2._sync.http11",
              "httpcore2._sync.http2", "httpcore2._backends.sync", "h11", "h2.connection",
              "anyio.streams.tls", "encodings.idna")


def warm_up() -> None:
    """Run one streamed call against a canned in-memory reply, so a warm agent has every
    module a real turn loads (request building, SSE parsing, the message types) imported
    before its session arrives. No network, no credential."""
    import importlib

    httpx = _http()
    for name in _TRANSPORT:
        try:
            importlib.import_module(name)
        except ImportError:  # another SDK release, another stack: it loads at first use
            pass
    anthropic.DefaultHttpxClient(verify=tls_context()).close()
    body = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in _WARM_EVENTS)

    def reply(request: Any) -> Any:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=body.encode())

    class Quiet:
        def note(self, headers: Any) -> None:
            pass

    with httpx.Client(transport=httpx.MockTransport(reply)) as http:
        api = AnthropicApi("http://warm.invalid", "warm", http_client=http)
        turn = api.stream("warm", "warm", [{"role": "user", "content": "warm"}],
                          [{"name": "bash", "description": "warm",
                            "input_schema": {"type": "object"}}], None, Quiet(), lambda: False)
        for _ in turn:
            pass


class AnthropicProvider(ToolLoopProvider):
    name = "anthropic"
    api = "anthropic"
