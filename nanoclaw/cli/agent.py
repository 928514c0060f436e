"""`ncl` for agents: the admin verbs of `nanoclaw`, asked for from inside a sandbox.

The agent's `ncl` tool writes a system row `{"action": "cli", "args": [...], "requestId"}`;
the delivery worker runs the handler below, which answers with a `cli_response` system
row in the session's `inbound.db` (trigger 0: it wakes nobody; the waiting tool reads
it and acks it). Every check is made here from the central DB; nothing the container
says about its group or its rights is trusted.

- `container_configs.cli_scope`: `disabled` refuses everything; `group` (the default)
  allows only the groups, destinations and members of the agent's own group (its id is
  filled in, any other group id is refused, `--cli-scope` cannot be changed); `global`
  allows every verb in `SPECS`. Host-only verbs (run, service, approvals approve, …)
  are never reachable.
- Reads answer at once. Every other command becomes a `cli_command` approval: the
  agent hears `approval-pending`; on approval the command is checked again (the scope
  may have changed meanwhile) and run as the host, recorded as made by the approving
  admin (`granted_by`, `added_by`), and its output reaches the agent as a note; on
  rejection the agent is told.
- Arguments are a list, never a shell line, parsed by the terminal's own argparse
  parser, and the verb runs in process with its output captured. Anything wrong is one
  line back to the agent, and nothing is written.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import sqlite3
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any

from nanoclaw import errors
from nanoclaw.approvals import requests as approvals
from nanoclaw.cli.common import CliError
from nanoclaw.config import Settings
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.delivery.actions import Ctx, action, card_problem, code, shown, shown_line
from nanoclaw.log import logger

SCOPES = ("disabled", "group", "global")
MAX_ARGS = 32
MAX_ARG_CHARS = 1000
MAX_TOTAL_CHARS = 8000
MAX_OUTPUT_CHARS = 12000
APPROVAL = "cli_command"
TITLE = "Agent command"


class Refused(errors.Refused):
    """One line for the agent: why its command was not run."""


@dataclass(frozen=True)
class Spec:
    read: bool                    # answered at once; otherwise an admin approves first
    group_scope: bool = False     # allowed when cli_scope is `group`
    refs: tuple[str, ...] = ()    # parsed fields that name an agent group
    own: str | None = None        # the field filled with the agent's own group


SPECS: dict[tuple[str, str | None], Spec] = {
    ("groups", "list"): Spec(True, True, ("group",), "group"),
    ("groups", "add"): Spec(False),
    ("groups", "update"): Spec(False, True, ("id",), "id"),
    ("groups", "remove"): Spec(False, True, ("id",), "id"),
    ("destinations", "list"): Spec(True, True, ("group",), "group"),
    ("destinations", "add"): Spec(False, True, ("group", "agent"), "group"),
    ("destinations", "remove"): Spec(False, True, ("group",), "group"),
    ("members", "list"): Spec(True, True, ("group",), "group"),
    ("members", "add"): Spec(False, True, ("group",), "group"),
    ("members", "remove"): Spec(False, True, ("group",), "group"),
    ("roles", "list"): Spec(True),
    ("roles", "grant"): Spec(False),
    ("roles", "revoke"): Spec(False),
    ("users", "list"): Spec(True),
    ("users", "add"): Spec(False),
    ("users", "remove"): Spec(False),
    ("wire", "list"): Spec(True),
    ("wire", "add"): Spec(False),
    ("wire", "remove"): Spec(False),
    ("mounts", "list"): Spec(True),
    ("mounts", "add"): Spec(False),
    ("mounts", "remove"): Spec(False),
    ("usage", None): Spec(True),
    ("tasks", "list"): Spec(True),
    ("tasks", "pause"): Spec(False),
    ("tasks", "resume"): Spec(False),
    ("tasks", "cancel"): Spec(False),
    ("approvals", "list"): Spec(True),
}
ALIASES = {("groups", "create"): "add", ("groups", "delete"): "remove"}
NEVER = {("approvals", "approve"): "an agent cannot answer approvals",
         ("approvals", "reject"): "an agent cannot answer approvals",
         ("init-first-agent", None): "init-first-agent is for the terminal only"}


@dataclass(frozen=True)
class Command:
    args: list[str]               # normalised: aliases resolved, own group filled in
    spec: Spec
    ns: argparse.Namespace | None  # None: the answer is `help` text already
    help: str = ""

    @property
    def line(self) -> str:
        """The command as an approver sees it and as it runs: every argument, each in
        its visible form (`actions.shown`), on one line."""
        return "ncl " + shown_line(self.args)


# ---- checking -----------------------------------------------------------------------------
def check_args(raw: Any) -> list[str]:
    """The request's `args`: a short list of short strings, or Refused."""
    if not isinstance(raw, list):
        raise Refused("args must be a list of strings, e.g. [\"groups\", \"list\"]")
    if len(raw) > MAX_ARGS:
        raise Refused(f"too many arguments ({len(raw)}; at most {MAX_ARGS})")
    if not all(isinstance(a, str) for a in raw):
        raise Refused("every argument must be a string")
    if any(len(a) > MAX_ARG_CHARS for a in raw) or sum(map(len, raw)) > MAX_TOTAL_CHARS:
        raise Refused(f"an argument is too long (at most {MAX_ARG_CHARS} characters each)")
    if any("\x00" in a for a in raw):
        raise Refused("arguments cannot contain NUL characters")
    return list(raw)


def scope_of(store: Store, agent_group_id: str) -> str:
    scope = store.container_config(agent_group_id).get("cli_scope") or "group"
    return scope if scope in SCOPES else "disabled"  # unknown: fail closed


def usage(scope: str) -> str:
    lines = [f"ncl: the admin commands you may use (cli_scope {scope}); pass them as a list,"
             " e.g. [\"groups\", \"list\"]; add \"--help\" for a command's options."]
    for (verb, op), spec in SPECS.items():
        if scope == "global" or (scope == "group" and spec.group_scope):
            lines.append(f"  {verb}{' ' + op if op else ''}"
                         f"{'' if spec.read else '   (needs an admin approval)'}")
    return "\n".join(lines)


def parse(store: Store, agent_group_id: str, scope: str, raw: Any) -> Command:
    """Check a request against the scope and parse it; Refused says why not."""
    args = check_args(raw)
    if scope == "disabled":
        raise Refused("ncl is disabled for this agent group (cli_scope disabled)")
    if not args or args[0] in ("help", "-h", "--help"):
        return Command(args, Spec(True), None, usage(scope))
    verb, op = args[0], None
    if verb not in {v for v, _ in [*SPECS, *NEVER]}:
        raise Refused(f"unknown command {verb!r}; `ncl help` lists yours")
    ops = [o for v, o in SPECS if v == verb and o]
    if ops:
        if len(args) < 2:
            raise Refused(f"{verb} needs one of: {', '.join(ops)}")
        if args[1] in ("-h", "--help"):
            return Command(args, Spec(True), None, _parse(args[:2], f"ncl {verb}")[1])
        op = ALIASES.get((verb, args[1]), args[1])
        args = [verb, op, *args[2:]]
    if (verb, op) in NEVER:
        raise Refused(NEVER[(verb, op)])
    spec = SPECS.get((verb, op))
    if spec is None:
        raise Refused(f"unknown operation {verb} {op!r}; known: {', '.join(ops)}")
    if scope == "group" and not spec.group_scope:
        raise Refused(f"{verb}{' ' + op if op else ''} is outside this agent's cli_scope"
                      " (group: only its own groups, destinations and members)")
    own = store.q1("SELECT id, folder FROM agent_groups WHERE id=?", (agent_group_id,))
    if own is None:
        raise Refused("this agent group no longer exists")
    sub = _subparser(verb, op)
    if spec.own and not any(a in ("-h", "--help") for a in args):
        args = _fill(sub, args, 2 if op else 1, spec.own, own["id"], scope == "group")
    ns, text = _parse(args, "ncl " + " ".join(args[:2] if op else args[:1]))
    if ns is None:
        return Command(args, spec, None, text)
    if scope == "group":
        for field in spec.refs:
            value = getattr(ns, field, None)
            if value is not None and value not in (own["id"], own["folder"]):
                raise Refused(f"with cli_scope group you may only name your own agent group"
                              f" ({own['id']}), not {value!r}")
        if getattr(ns, "cli_scope", None) is not None:
            raise Refused("cli_scope cannot be changed from inside the agent (cli_scope group)")
    return Command(args, spec, ns)


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    """`ncl`'s own parser: the admin verbs only (all `SPECS` ever names). Not `nanoclaw`'s
    whole parser: importing `cli` from here closed a cycle through the host (review M2b)."""
    from nanoclaw.cli import admin
    from nanoclaw.cli import limits as admin_limits

    p = argparse.ArgumentParser(prog="ncl")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    admin.add_parsers(sub)
    admin_limits.add_parsers(sub)
    return p


def _subparser(verb: str, op: str | None) -> argparse.ArgumentParser:
    p = _choices(_parser())[verb]
    return _choices(p)[op] if op else p


def _choices(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


def _fill(sub: argparse.ArgumentParser, args: list[str], start: int, dest: str, own: str,
          as_option: bool) -> list[str]:
    """Name the agent's own group where the command needs one and none was given: a
    missing required positional always, an option (a list's filter) only in group scope."""
    act = next((a for a in sub._actions if a.dest == dest), None)
    if act is None:
        return args
    if act.option_strings:
        if not as_option or _given(sub, args[start:], act):
            return args
        return [*args, act.option_strings[-1], own]
    positionals = [a for a in sub._actions if not a.option_strings]
    required = [a for a in positionals if a.nargs is None]
    slots = _positional_slots(sub, args[start:])
    index = positionals.index(act)
    if len(slots) != len(required) - 1:
        return args
    # before the value now in its place, else just after the positional before it
    at = start + (slots[index] if index < len(slots) else slots[index - 1] + 1 if index else 0)
    return [*args[:at], own, *args[at:]]


def _option(sub: argparse.ArgumentParser, token: str) -> argparse.Action | None:
    head = token.split("=", 1)[0]
    table = sub._option_string_actions
    if head in table:
        return table[head]
    hits = {a for s, a in table.items() if s.startswith("--") and s.startswith(head)}
    return hits.pop() if len(hits) == 1 else None


def _given(sub: argparse.ArgumentParser, tokens: list[str], act: argparse.Action) -> bool:
    return any(t.startswith("-") and _option(sub, t) is act for t in tokens)


def _positional_slots(sub: argparse.ArgumentParser, tokens: list[str]) -> list[int]:
    """Where the positional values are in `tokens` (argparse's own reading, roughly)."""
    slots, i, rest = [], 0, False
    while i < len(tokens):
        t = tokens[i]
        if rest or not t.startswith("-") or t == "-":
            slots.append(i)
        elif t == "--":
            rest = True
        else:
            act = _option(sub, t)
            if act is not None and "=" not in t and act.nargs != 0:
                i += 1  # its value
        i += 1
    return slots


def _parse(args: list[str], name: str) -> tuple[argparse.Namespace | None, str]:
    """(namespace, '') or (None, help text); a usage error is Refused."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            ns = _parser().parse_args(args)
    except SystemExit as e:
        if e.code == 0:
            return None, out.getvalue().strip()
        last = (err.getvalue().strip().splitlines() or ["error: bad arguments"])[-1]
        raise Refused(f"{name}: {last.split(': error: ', 1)[-1]}") from None
    return ns, ""


# ---- running ------------------------------------------------------------------------------
def execute(store: Store, settings: Settings, cmd: Command, actor: str | None = None) -> str:
    """Run a parsed command as the terminal would, output captured; Refused on an error.
    `actor` (the approving admin) is recorded as the one who made the change."""
    from nanoclaw.cli import admin
    from nanoclaw.cli import limits as admin_limits

    ns = cmd.ns
    assert ns is not None
    ns.actor = actor
    fn = admin.VERBS.get(ns.verb) or admin_limits.VERBS[ns.verb]
    out = io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(out):
            fn(ns, store, settings)
    except CliError as e:
        raise Refused(f"{cmd.line}: {e}") from None
    except sqlite3.IntegrityError as e:
        raise Refused(f"{cmd.line}: refused by the database: {e}") from None
    return cap(out.getvalue().rstrip() or "(done, no output)")


def cap(text: str) -> str:
    if len(text) <= MAX_OUTPUT_CHARS:
        return text
    return text[:MAX_OUTPUT_CHARS] + f"\n… ({len(text) - MAX_OUTPUT_CHARS} more characters)"


def respond(paths: sessiondb.SessionPaths, row_id: str, request_id: str, status: str,
            output: str) -> None:
    """The answer the waiting tool reads: a system row that wakes nobody."""
    rid = "cli-" + hashlib.sha1(row_id.encode("utf-8", "replace")).hexdigest()[:20]
    sessiondb.insert_message(paths, id=rid, kind="system", trigger=False,
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
    if cmd.ns is None:
        return "ok", cmd.help
    if cmd.spec.read:
        return "ok", execute(ctx.store, ctx.settings, cmd)
    done = ctx.store.q1("SELECT approval_id FROM pending_approvals WHERE request_id=? AND"
                        " action=?", (ctx.row["id"], APPROVAL))
    if done is None:  # (a re-run of the same row after a crash asks only once)
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
    else:
        aid = done["approval_id"]
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
        if cmd.ns is None or cmd.spec.read:
            raise Refused("not a command that needs approval")
        output = execute(store, settings, cmd, actor=row.get("decided_by"))
    except Refused as e:
        raise RuntimeError(str(e)) from None
    logger.info("agent group {}: `{}` approved by {} ran", ag, cmd.line, row.get("decided_by"))
    return f"Your command `{cmd.line}` was approved and ran:\n{output}"


approvals.ON_APPROVE.setdefault(APPROVAL, _approved)
