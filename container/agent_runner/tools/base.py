"""What every tool shares: its definition, input checking, and the context it acts in.

A tool is a name, a description, a JSON schema and a function `(ctx, args) -> str`. The
schema is checked here before the function runs, so a bad call gets one clear sentence
back ("`text` is required", "`options` must be a list") instead of a traceback; a
refusal inside a tool is a `ToolError`. The context knows the current batch, so rows
written by tools carry the thread and `in_reply_to` of the conversation they answer.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agent_runner.batch import Batch
from agent_runner.config import Config
from agent_runner.db import Address, Inbound, Outbound, iso, new_out_id

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class ToolError(Exception):
    """A refused or invalid call; the message goes back to the agent as a tool error."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    schema: dict[str, Any]
    run: Callable[["ToolContext", dict[str, Any]], str]
    local: bool = False  # a shell/file tool; the claude provider has the CLI's own
    sends: bool = False  # writes a chat row the user sees (no bare-text nudge needed)
    timeout_s: Callable[[dict[str, Any]], int | None] | None = None

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "input_schema": self.schema}


def obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


def string(description: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": "string", **({"description": description} if description else {}), **extra}


def new_id(prefix: str) -> str:
    rand = "".join(secrets.choice(_B36) for _ in range(6))
    return f"{prefix}-{int(time.time() * 1000)}-{rand}"


# --- input checking ---------------------------------------------------------------------

_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}
_NAMES = {"string": "a string", "integer": "a whole number", "number": "a number",
          "boolean": "true or false", "array": "a list", "object": "an object"}


def _coerce(schema: dict[str, Any], value: Any) -> Any:
    """Models often send numbers as strings ("12"); accept those for integer fields."""
    if schema.get("type") == "integer":
        if isinstance(value, str) and value.strip().isdigit():
            return int(value.strip())
        if isinstance(value, float) and value.is_integer():
            return int(value)
    return value


def _check(name: str, schema: dict[str, Any], value: Any) -> Any:
    value = _coerce(schema, value)
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if kinds and not any(_TYPES[k](value) for k in kinds):
        raise ToolError(f"`{name}` must be {' or '.join(_NAMES[k] for k in kinds)}")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolError(f"`{name}` must be one of: {', '.join(map(str, schema['enum']))}")
    if isinstance(value, str):
        if len(value.strip()) < schema.get("minLength", 0):
            raise ToolError(f"`{name}` must not be empty")
        if len(value) > schema.get("maxLength", 1 << 30):
            raise ToolError(f"`{name}` is too long (at most {schema['maxLength']} characters)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", float("-inf")) or value > schema.get("maximum",
                                                                            float("inf")):
            raise ToolError(f"`{name}` must be between {schema.get('minimum')} and "
                            f"{schema.get('maximum')}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise ToolError(f"`{name}` needs at least {schema['minItems']} item(s)")
        if len(value) > schema.get("maxItems", 1 << 30):
            raise ToolError(f"`{name}` has too many items (at most {schema['maxItems']})")
        if "items" in schema:
            value = [_check(f"{name}[{i}]", schema["items"], v) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if "properties" in schema:
            value = validate(schema, value, prefix=f"{name}.")
        elif isinstance(schema.get("additionalProperties"), dict):
            value = {k: _check(f"{name}.{k}", schema["additionalProperties"], v)
                     for k, v in value.items()}
    return value


def validate(schema: dict[str, Any], args: Any, prefix: str = "") -> dict[str, Any]:
    """Check `args` against an object schema; returns them with integers coerced."""
    if not isinstance(args, dict):
        raise ToolError("the arguments must be a JSON object")
    props = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        unknown = sorted(k for k in args if k not in props)
        if unknown:
            shown = [k if k.isprintable() else repr(k) for k in (prefix + k for k in unknown)]
            raise ToolError(f"unknown parameter(s) {', '.join(shown)};"
                            f" expected: {', '.join(prefix + k for k in props) or 'none'}")
    for name in schema.get("required", []):
        if args.get(name) is None:
            raise ToolError(f"`{prefix}{name}` is required")
    return {k: (v if v is None or k not in props else _check(prefix + k, props[k], v))
            for k, v in args.items()}


# --- the context ------------------------------------------------------------------------

@dataclass
class ToolContext:
    config: Config
    inbound: Inbound
    outbound: Outbound
    should_stop: Callable[[], bool] = lambda: False
    heartbeat: Callable[[], None] = lambda: None
    batch: Batch = field(default_factory=lambda: Batch([], [], None))
    sent: int = 0

    def destination_names(self) -> str:
        return ", ".join(d.name for d in self.batch.destinations) or "(none)"

    def resolve(self, to: str | None) -> tuple[Address, str | None]:
        """Where a message goes: a named destination, else the conversation's own chat,
        else the only destination; and the row it answers."""
        batch = self.batch
        if to:
            dest = batch.destination(to)
            if dest is None:
                raise ToolError(f"unknown destination {to!r}; known: {self.destination_names()}")
            channel = dest.channel
        elif batch.routing is not None:
            channel = batch.routing.channel
        elif (origin := batch.origin()) is not None:
            channel = origin[0].channel
        else:
            raise ToolError("there is no default destination here; pass `to` (one of: "
                            f"{self.destination_names()})")
        address, reply_id = batch.address_for(channel)
        return address, reply_id or batch.asker_id

    def write(self, kind: str, content: dict[str, Any], to: Address, in_reply_to: str | None,
              out_id: str | None = None) -> tuple[str, int]:
        return self.outbound.write_message(kind, content, to, in_reply_to, out_id)

    def system_action(self, action: str, params: dict[str, Any]) -> str:
        """Write a self-describing system row for the host; returns the request id."""
        request_id = new_id("req")
        content = {"action": action, **{k: v for k, v in params.items() if v is not None},
                   "requestId": request_id}
        origin = self.batch.origin()
        address = origin[0] if origin else Address(None, None)
        self.write("system", content, address, self.batch.asker_id)
        return request_id

    # -- files
    def roots(self, writable: bool) -> list[str]:
        c = self.config
        roots = [c.group_dir, c.session_dir, "/tmp"]
        return roots if writable else roots + [c.global_dir, *c.extra_dirs,
                                               os.path.join(c.runner_root, "skills")]

    def path(self, path: str, writable: bool = False) -> str:
        """An absolute, symlink-resolved path inside the folders the agent may use."""
        if not path:
            raise ToolError("`path` is empty")
        full = path if os.path.isabs(path) else os.path.join(self.config.group_dir, path)
        real = os.path.realpath(full)
        roots = self.roots(writable)
        for root in roots:
            r = os.path.realpath(root)
            if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
                return real
        raise ToolError(f"{path} is outside the folders you may "
                        f"{'write' if writable else 'read'}: {', '.join(roots)}")

    def local_time(self, stamp: str | None) -> str:
        from agent_runner.formatter import local_time, zone

        return local_time(stamp, zone(self.config.tz)) if stamp else "-"


def now_iso() -> str:
    return iso(time.time())


__all__ = ["Tool", "ToolContext", "ToolError", "new_id", "new_out_id", "obj", "string",
           "validate", "now_iso"]
