"""`ncl`: the host's admin commands (`nanoclaw groups list`, …), asked for from here.

The agent cannot reach the central database, so a command is a request: a system row
`{"action": "cli", "args": [...], "requestId"}` in `outbound.db`, then a wait (bounded:
30 s, checking a cheap file signal every few ms) for the host's `cli_response` system
row in `inbound.db`, which is acked so the host marks it done. Every permission check
(`cli_scope`, approvals) is the host's; the checks here only catch an obviously bad call
at once. The same request runs from Bash as `python3 -m agent_runner.ncl ARGS…`.
"""

from __future__ import annotations

import time
from typing import Any

from agent_runner.tools.base import Tool, ToolContext, ToolError

NCL_TIMEOUT_S = 30.0
NCL_POLL_S = 0.01       # a stat() of inbound.db; the file is read only when it moved
NCL_RECHECK_S = 0.5     # … and re-read anyway this often (a coarse mtime can hide a write)
MAX_ARGS = 32           # the host's limits exactly
MAX_ARG_CHARS = 1000


def check(args: list[Any]) -> list[str]:
    if len(args) > MAX_ARGS:
        raise ToolError(f"too many arguments (at most {MAX_ARGS})")
    if any(not isinstance(a, str) for a in args):
        raise ToolError("every argument must be a string")
    if any(len(a) > MAX_ARG_CHARS for a in args):
        raise ToolError(f"an argument is too long (at most {MAX_ARG_CHARS} characters)")
    return list(args)


def request(ctx: ToolContext, args: list[str], timeout: float = NCL_TIMEOUT_S) -> tuple[str, str]:
    """Send one command to the host and wait for its answer: (status, output), status
    being `ok`, `approval-pending` or `error`. ToolError when no answer comes in time."""
    rid = ctx.system_action("cli", {"args": check(args)})
    deadline = time.monotonic() + timeout
    seen, last_read, last_beat = None, 0.0, time.monotonic()
    while True:
        now = time.monotonic()
        signal = ctx.inbound.change_signal()
        if signal != seen or now - last_read >= NCL_RECHECK_S:
            seen, last_read = signal, now
            answer = ctx.inbound.system_reply("cli_response", "requestId", rid)
            if answer is not None:
                ctx.outbound.complete([answer.id])
                return (str(answer.content.get("status") or "error"),
                        str(answer.content.get("output") or ""))
        if now >= deadline:
            raise ToolError(f"no answer from the host within {timeout:g} s (request {rid});"
                            " it may be busy or stopped, try again later")
        if ctx.should_stop():
            raise ToolError("stopped: the agent is shutting down before the host answered")
        if now - last_beat >= 1.0:
            ctx.heartbeat()
            last_beat = now
        time.sleep(NCL_POLL_S)


def _ncl(ctx: ToolContext, args: dict[str, Any]) -> str:
    status, output = request(ctx, args.get("args") or [])
    if status == "error":
        raise ToolError(output or "the host refused the command")
    return output


DESCRIPTION = (
    "Run a NanoClaw admin command on the host, as a list of arguments (no shell), e.g."
    " [\"groups\", \"list\"], [\"destinations\", \"list\"], [\"members\", \"add\","
    " \"telegram:42\"], [\"groups\", \"update\", \"--name\", \"Helper\"]. [\"help\"] lists"
    " the commands you may use; add \"--help\" for a command's options. Your own agent"
    " group is filled in when you leave it out. Reading (list, usage) answers at once;"
    " a change (add, remove, update, grant, revoke, …) returns `approval-pending`: an"
    " admin is asked, and the outcome (with the command's output) comes later in a"
    " <system> note. What you may reach is set by the host (cli_scope: disabled, group"
    " — your own group's groups, destinations and members —, or global)."
)
TOOLS = [
    Tool("ncl", DESCRIPTION,
         {"type": "object", "properties": {"args": {
             "type": "array", "maxItems": MAX_ARGS, "description": "the command and its"
             " arguments, one per item, e.g. [\"groups\", \"list\"]",
             "items": {"type": "string", "maxLength": MAX_ARG_CHARS}}},
          "required": ["args"], "additionalProperties": False},
         _ncl, timeout_s=lambda a: int(NCL_TIMEOUT_S) + 15),
]
