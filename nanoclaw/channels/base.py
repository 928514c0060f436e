"""The adapter contract (reference §9) and its error vocabulary, sorted by what the
channel worker does next: `Unavailable` (nobody to send to yet: wait, don't count),
`RetryAfter` (the platform said when), `SendError` (count it; `permanent` fails now)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from nanoclaw.config import Settings


class Unavailable(Exception):
    """Cannot deliver now (no client, not connected); try again later, uncounted."""


class RetryAfter(Exception):
    def __init__(self, seconds: float, message: str = "rate limited"):
        super().__init__(message)
        self.seconds = seconds


class ChannelDead(Exception):
    """The connection is dead and cannot be repaired in-process: the worker exits
    non-zero, so the orchestrator restarts it under the crash-loop breaker."""


class SendError(Exception):
    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass
class OutboundMessage:
    """One send. A message the platform takes in several parts (a long text split, then
    its files) keeps the ids of the parts already sent in `parts`, which the worker
    stores as each is sent (`sent`): an attempt after a failure, or after a crash of the
    worker, resumes at the first part not yet sent instead of repeating the others.

    `uncertain_since` is set when an earlier attempt may have been cut off inside the
    platform's call (a crash, a timeout): the part then in flight may have reached the
    platform. An adapter that can tell (`find_sent`) is asked before it is sent again."""

    idem_key: str
    kind: str
    content: dict[str, Any]
    in_reply_to: str | None = None  # the platform message id being answered, if any
    parts: list[str] = field(default_factory=list)
    uncertain_since: float | None = None
    record: Callable[[str], None] | None = field(default=None, repr=False)

    def sent(self, platform_message_id: Any) -> None:
        """Part `len(parts)` reached the platform under this id: stored before the next."""
        pid = str(platform_message_id)
        if self.record is not None:
            self.record(pid)
        self.parts.append(pid)

    def part_key(self, index: int) -> str:
        """A short stable key for one part of this send (a nonce, a marker), at most 25
        characters: the same for every attempt, different for every part and send."""
        return hashlib.sha256(f"{self.idem_key}\0{index}".encode()).hexdigest()[:25]


class ChannelHost(Protocol):
    """What an adapter may call back into."""

    async def inbound(self, platform_id: str, message_id: str, payload: dict[str, Any],
                      thread_id: str | None = None, kind: str = "chat") -> bool:
        """Store one platform event durably; True if new, False if seen before.

        kind `chat`: payload {text, sender_id, sender_name, is_mention, is_group,
        attachments: [{name, type, data (base64) | url}], reply_to: {id, text, sender}?}.
        kind `action` (a button click): payload {question_id, option, user_id} where
        user_id is the clicker's platform handle; message_id must be unique per click."""

    def question(self, card_id: str, platform_id: str | None = None) -> dict[str, Any] | None:
        """The card this channel sent under that host-made id to that chat (its outbound
        content); never another chat's card, never an agent's card for an approval id."""

    def kick(self, platform_id: str | None = None) -> None:
        """Something changed (e.g. a client connected): retry parked sends now."""


class Channel:
    name = "channel"
    supports_threads = False

    def __init__(self, settings: Settings, host: ChannelHost):
        self.settings, self.host = settings, host
        self.dead: str | None = None  # set by die(): why the connection is beyond repair
        self.fatal: str | None = None  # set by halt(): why it must not reconnect at all

    def die(self, reason: str) -> None:
        """Liveness failed for good: the channel worker stops and exits non-zero (the
        orchestrator restarts it under the crash-loop breaker)."""
        if self.dead is None:
            self.dead = reason
        self.host.kick()

    def halt(self, reason: str) -> None:
        """The platform says a reconnect cannot help (logged out, a second client took
        over, a revoked token): the worker exits with the bad-configuration code and is
        not restarted until asked, so no reconnect loop runs against the platform."""
        if self.fatal is None:
            self.fatal = reason
        self.host.kick()

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return False

    async def setup(self) -> None: ...

    async def teardown(self) -> None: ...

    def is_connected(self) -> bool:
        return True

    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        raise NotImplementedError

    # Optional: `async set_typing(platform_id, thread_id)`; `async open_dm(handle) ->
    # platform_id` (the runner resolves `@dm:<handle>` destinations with it);
    # `async find_sent(platform_id, thread_id, message, since) -> {part index: id}`: the
    # parts of `message` the platform shows as sent since `since` (epoch seconds), asked
    # before an uncertain part is sent again (`OutboundMessage.uncertain_since`).


class Registry:
    def __init__(self) -> None:
        self._classes: dict[str, type[Channel]] = {}

    def register(self, cls: type[Channel]) -> type[Channel]:
        if cls.name in self._classes:
            raise ValueError(f"channel {cls.name!r} is registered twice")
        self._classes[cls.name] = cls
        return cls

    def register_lazy(self, name: str, target: str, enabled: Callable[[Settings], bool],
                      supports_threads: bool = False) -> type[Channel]:
        """Register `module:Class` without importing it: a platform's client library is
        loaded only by the worker that runs it, not by the host or the other workers."""
        module, _, attr = target.partition(":")

        def _new(cls: type, settings: Settings, host: ChannelHost) -> Channel:
            import importlib

            return getattr(importlib.import_module(module), attr)(settings, host)

        lazy = type(f"Lazy_{name}", (Channel,), {
            "name": name, "supports_threads": supports_threads, "__new__": _new,
            "enabled": classmethod(lambda cls, settings: bool(enabled(settings)))})
        return self.register(lazy)

    def get(self, name: str) -> type[Channel]:
        try:
            return self._classes[name]
        except KeyError:
            raise KeyError(f"unknown channel {name!r}") from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def threaded(self) -> frozenset[str]:
        return frozenset(n for n, c in self._classes.items() if c.supports_threads)

