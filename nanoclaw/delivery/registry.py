"""The registry of system actions an agent asks of the host (`messages_out` rows of kind
`system`, content `{"action": name, ...}`): handlers by name, and the context each one
gets. Nothing the container says about who asked is trusted: `Ctx.asker` is the sender
of the inbound row the action answers, read from the host's own inbound.db.

A handler returns a note for the agent (or None) and raises ActionError for a refusal
or a bad request; either way the agent hears about failures, never silence. The
handlers register with `@action`; `actions.py` imports every built-in one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from nanoclaw.agents import scheduling
from nanoclaw.config import Settings
from nanoclaw.db.session import SessionInbound, SessionPaths
from nanoclaw.db.store import Store
from nanoclaw.errors import Refused


class ActionError(Refused):
    """Refused or malformed; the message is told to the agent."""


@dataclass
class Ctx:
    store: Store
    settings: Settings
    session: dict[str, Any]
    paths: SessionPaths
    row: dict[str, Any]          # the messages_out row
    content: dict[str, Any]

    @property
    def asker(self) -> str | None:
        """The user whose message the action answers (host-side truth), if any."""
        src = self.source()
        if src is None:
            return None
        try:
            return json.loads(src["content"]).get("senderId")
        except (ValueError, AttributeError):
            return None

    def source(self) -> dict[str, Any] | None:
        mid = self.row.get("in_reply_to")
        return SessionInbound(self.paths).message(mid) if mid else None

    def routing(self) -> tuple[str | None, str | None, str | None]:
        src = self.source()
        if src is not None and src["channel_type"] not in (None, "agent"):
            return (src["channel_type"], src["platform_id"], src["thread_id"])
        return SessionInbound(self.paths).routing()

    def str_arg(self, key: str, required: bool = True) -> str | None:
        v = self.content.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, str) or (required and not v.strip()):
            raise ActionError(f"{key} must be a non-empty string")
        return v


Handler = Callable[[Ctx], "str | None"]
ACTIONS: dict[str, Handler] = {}


def action(name: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        if name in ACTIONS:
            raise ValueError(f"action {name!r} registered twice")
        ACTIONS[name] = fn
        return fn
    return deco


def run(ctx: Ctx) -> str | None:
    name = ctx.content.get("action") or ctx.content.get("type")
    fn = ACTIONS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ActionError(f"unknown action {name!r}")
    try:
        return fn(ctx)
    except scheduling.TaskError as e:
        raise ActionError(str(e)) from None
