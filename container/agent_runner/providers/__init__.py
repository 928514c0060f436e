"""Providers: the model behind one small interface, chosen by name from a registry.

A provider turns a prompt into a `Query`, whose `events()` yields what happened (`Init`
with the continuation to persist, tool activity, `Retrying` while the model is busy,
`Waiting` while the host's broker does not answer (`agent_runner/broker.py`), a `Result`
per finished turn, a `Notice` for the user, or an `Error`, which ends the query). The
poll loop may `push()` more user input at any time (new messages, a nudge, a
correction); a query keeps going while pushed input is unanswered (`Result.more`) and
ends after a result that leaves nothing outstanding. `abort()` stops it on shutdown. A
provider that works in the background yields `Idle` every so often, so the loop can look
for new messages. `is_session_invalid(err)` says when stored history is unusable, so the
loop starts afresh instead of failing every turn.

Installed providers are the visible list at the bottom; modules load lazily so neither
SDK is imported unless its provider is chosen.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Union


class ProviderError(Exception):
    """A query failed in a way the user should hear about."""

    def __init__(self, message: str, retryable: bool = False, classification: str = "error"):
        super().__init__(message)
        self.retryable = retryable
        self.classification = classification


class StaleSession(ProviderError):
    """The stored continuation cannot be resumed; the loop clears it and starts fresh."""


class ProviderUnavailable(ProviderError):
    """The configured provider cannot run here (missing package, bad configuration)."""


# --- events ---
@dataclass(frozen=True)
class Init:
    continuation: str


@dataclass(frozen=True)
class Activity:
    what: str = "progress"


@dataclass(frozen=True)
class Idle:
    """Nothing happened for a moment (not a sign of progress: no heartbeat)."""


@dataclass(frozen=True)
class ToolStart:
    name: str
    timeout_ms: int | None = None


@dataclass(frozen=True)
class ToolEnd:
    name: str


@dataclass(frozen=True)
class Retrying:
    """The model refused for now (429, 529, 5xx, connection); the provider waits and retries."""

    attempt: int
    max_attempts: int
    delay_s: float
    reason: str
    status: int | None = None  # the HTTP status; None for a dropped connection
    unreachable: bool = False  # the broker is up but cannot reach the model API


@dataclass(frozen=True)
class Waiting:
    """A host worker the query needs (`what`: the broker) does not answer; the provider
    waits for it (up to `limit_s`) instead of failing. Not the model's failure: no
    attempt is counted and the user is not told at once; the poll loop beats on it."""

    what: str
    waited_s: float
    limit_s: float


@dataclass(frozen=True)
class Result:
    text: str
    more: bool = False  # pushed input is still unanswered: another Result will follow


@dataclass(frozen=True)
class Notice:
    """Something the user should hear while the query goes on (e.g. older context was
    set aside or summarised): sent to the batch's origin as is."""

    text: str


@dataclass(frozen=True)
class Error:
    error: ProviderError


Event = Union[Init, Activity, Idle, ToolStart, ToolEnd, Retrying, Waiting, Notice, Result,
              Error]


@dataclass(frozen=True)
class ToolOutcome:
    text: str
    is_error: bool = False


class Tools(Protocol):
    """What a provider may call on the agent's behalf (see agent_runner.tools)."""

    def specs(self, local: bool = True) -> list[dict[str, Any]]: ...

    def tools(self, local: bool = True) -> list[Any]: ...

    def timeout_ms(self, name: str, args: dict[str, Any]) -> int | None: ...

    def run(self, name: str, args: dict[str, Any]) -> ToolOutcome: ...


@dataclass
class QueryInput:
    prompt: str
    continuation: str | None
    cwd: str
    system: str
    tools: Tools | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Query(Protocol):
    def events(self) -> Iterator[Event]: ...

    def push(self, text: str) -> None: ...

    def end(self) -> None: ...

    def abort(self) -> None: ...


class Provider(Protocol):
    name: str
    supports_native_slash_commands: bool

    def query(self, q: QueryInput) -> Query: ...

    def is_session_invalid(self, err: BaseException) -> bool: ...

    def forget(self, continuation: str) -> None:
        """Drop a continuation's stored history (`/clear`)."""

    def close(self) -> None:
        """Release what the provider keeps between queries (a CLI process, a thread)."""


class Registry:
    """Provider name → lazily imported factory; duplicate names are refused."""

    def __init__(self) -> None:
        self._entries: dict[str, str] = {}

    def register(self, name: str, target: str) -> None:
        if name in self._entries:
            raise ValueError(f"provider {name!r} registered twice")
        self._entries[name] = target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def factory(self, name: str) -> Callable[..., Provider]:
        if name not in self._entries:
            raise ProviderUnavailable(
                f"unknown provider {name!r} (installed: {', '.join(self.names())})",
                classification="config")
        module, attr = self._entries[name].split(":")
        return getattr(importlib.import_module(module), attr)


REGISTRY = Registry()
REGISTRY.register("anthropic", "agent_runner.providers.anthropic:AnthropicProvider")
REGISTRY.register("claude", "agent_runner.providers.claude:ClaudeProvider")
REGISTRY.register("openai", "agent_runner.providers.openai:OpenAIProvider")
REGISTRY.register("opencode", "agent_runner.providers.opencode:OpenCodeProvider")
