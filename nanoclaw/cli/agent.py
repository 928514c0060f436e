"""`ncl` for agents: the admin verbs of `nanoclaw`, asked for from inside a sandbox.

The agent's `ncl` tool writes a system row `{"action": "cli", "args": [...], "requestId"}`;
the delivery worker runs the handler below, which answers with a `cli_response` system
row in the session's `inbound.db` (trigger 0: it wakes nobody; the waiting tool reads
it and acks it). Every check is made here from the central DB; nothing the container
says about its group or its rights is trusted (the request is read in `agent_args.py`).

- `container_configs.cli_scope`: `disabled` refuses everything; `group` (the default)
  allows only the groups, destinations and members of the agent's own group (its id is
  filled in, any other group id is refused, `--cli-scope` cannot be changed); `global`
  allows every admin operation. What each operation allows is declared with it in the
  registry (`cli/ops.py`: `read`, `group_scope`, `refs`, `own`, `never`); host verbs
  (run, service, …) are not in it, and `never` ones (approvals approve, …) are refused.
- Reads answer at once. Every other command becomes a `cli_command` approval: the
  agent hears `approval-pending`; on approval the command is checked again (the scope
  may have changed meanwhile) and run as the host, recorded as made by the approving
  admin (`granted_by`, `added_by`), and its output reaches the agent as a note; on
  rejection the agent is told.
- Arguments are a list, never a shell line, parsed by a parser built from the same
  registry as the terminal's (the own group as the default of its field), and the
  operation runs in process with its output captured. What is approved and run is the
  parsed command written out whole (`canonical`). Anything wrong is one line back to
  the agent, and nothing is written.
"""

from __future__ import annotations

import hashlib
import io
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from nanoclaw import errors
from nanoclaw.approvals import requests as approvals
from nanoclaw.cli import ops
from nanoclaw.cli.agent_args import Command, Refused, op_parser, parse, scope_of, usage
from nanoclaw.cli.common import CliError
from nanoclaw.config import Settings
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.delivery.actions import Ctx, action, card_problem, code, shown
from nanoclaw.log import logger

# the request's reading is `agent_args`; these names are this module's API too
__all__ = ["APPROVAL", "Command", "Refused", "execute", "op_parser", "parse", "scope_of",
           "shown", "usage"]
MAX_OUTPUT_CHARS = 12000
APPROVAL = "cli_command"
TITLE = "Agent command"


# ---- running ------------------------------------------------------------------------------
def execute(store: Store, settings: Settings, cmd: Command, actor: str | None = None) -> str:
    """Run a parsed command as the terminal would, output captured; Refused on an error.
    `actor` (the approving admin) is recorded as the one who made the change."""
    assert cmd.op is not None and cmd.ns is not None
    cmd.ns.actor = actor
    out = io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(out):
            ops.call(cmd.op, cmd.ns, store, settings)
    except CliError as e:
        raise Refused(f"{cmd.line}: {e}") from None
    return cap(out.getvalue().rstrip() or "(done, no output)")


def cap(text: str) -> str:
    if len(text) <= MAX_OUTPUT_CHARS:
        return text
    return text[:MAX_OUTPUT_CHARS] + f"\n… ({len(text) - MAX_OUTPUT_CHARS} more characters)"


def respond(paths: sessiondb.SessionPaths, row_id: str, request_id: str, status: str,
            output: str) -> None:
    """The answer the waiting tool reads: a system row that wakes nobody."""
    rid = "cli-" + hashlib.sha1(row_id.encode("utf-8", "replace")).hexdigest()[:20]
    sessiondb.SessionInbound(paths).insert(id=rid, kind="system", trigger=False,
                             content={"type": "cli_response", "requestId": request_id,
                                      "status": status, "output": output})


@action("cli")
def _handle(ctx: Ctx) -> None:
    """Answer one request; every outcome, even a host bug, is a response row."""
    rid = ctx.content.get("requestId")
    rid = rid if isinstance(rid, str) and 0 < len(rid) <= 100 else str(ctx.row["id"])
    ag = ctx.session["agent_group_id"]
    try:
        status, output = _answer(ctx, ag)
    except Refused as e:
        status, output = "error", str(e)
    except Exception as e:  # a bug must not leave the agent waiting 30 s in silence
        logger.exception("session {}: ncl failed", ctx.session["id"])
        status, output = "error", f"the host failed to run this command: {type(e).__name__}"
    logger.info("session {}: ncl {} -> {}", ctx.session["id"],
                str(ctx.content.get("args"))[:200], status)
    respond(ctx.paths, str(ctx.row["id"]), rid, status, output)
    return None


def _answer(ctx: Ctx, ag: str) -> tuple[str, str]:
    cmd = parse(ctx.store, ag, scope_of(ctx.store, ag), ctx.content.get("args"))
    if cmd.ns is None or cmd.op is None:
        return "ok", cmd.help
    if cmd.op.read:
        return "ok", execute(ctx.store, ctx.settings, cmd)
    aid = ctx.store.approval_for_request(ctx.row["id"], APPROVAL)
    if aid is None:  # (a re-run of the same row after a crash asks only once)
        question = _question(ctx, cmd)
        problem = card_problem(TITLE, question)
        if problem:  # an admin could not read it whole: refused, nothing is queued
            raise Refused(f"ncl {' '.join(cmd.args[:2])}: refused, {problem}; nothing was"
                          " asked (shorten the arguments)")
        try:
            aid = approvals.request(ctx.store, ctx.settings, ctx.session, APPROVAL,
                                    {"args": cmd.args, "requestId": ctx.row["id"]},
                                    TITLE, question)
        except errors.Refused as e:
            raise Refused(f"{cmd.line}: {e}") from None
    return "approval-pending", (f"approval-pending: an admin was asked to approve `{cmd.line}`"
                                f" (approval {aid}); you will get its outcome in a note")


def _question(ctx: Ctx, cmd: Command) -> str:
    """The whole command, never cut: what the admin approves is exactly what runs. It is
    a code block of visible forms, so padding, newlines or Markdown in an argument (or in
    the group's own name) cannot hide or fake any part of it."""
    g = ctx.store.agent_group(ctx.session["agent_group_id"]) or {}
    who = shown(str(g.get("name") or g.get("folder") or "?"))
    return f"Agent {who} asks to run:\n{code(cmd.line)}"


def _approved(store: Store, settings: Settings, row: dict[str, Any],
              payload: dict[str, Any]) -> str:
    """Checked again with today's scope, then run as the host; raises with the reason."""
    ag = row["agent_group_id"]
    try:
        cmd = parse(store, ag, scope_of(store, ag), payload.get("args"))
        if cmd.ns is None or cmd.op is None or cmd.op.read:
            raise Refused("not a command that needs approval")
        output = execute(store, settings, cmd, actor=row.get("decided_by"))
    except Refused as e:
        raise RuntimeError(str(e)) from None
    logger.info("agent group {}: `{}` approved by {} ran", ag, cmd.line, row.get("decided_by"))
    return f"Your command `{cmd.line}` was approved and ran:\n{output}"


approvals.on_approve(APPROVAL, _approved)
