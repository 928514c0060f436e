"""Reading an agent's `ncl` request: the argument checks, its `cli_scope`, and a parser
for the one operation it names, built from the registry (`cli/ops.py`) with the agent's
own group as the default of the operation's `own` field. `parse` returns the command
written out whole (`canonical`): what an admin approves is exactly what runs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from nanoclaw import errors
from nanoclaw.cli import admin, ops
from nanoclaw.db.store import Store
from nanoclaw.delivery.actions import shown_line
from nanoclaw.log import one_line

SCOPES = ("disabled", "group", "global")
MAX_ARGS = 32
MAX_ARG_CHARS = 1000
MAX_TOTAL_CHARS = 8000


class Refused(errors.Refused):
    """One line for the agent: why its command was not run."""


@dataclass(frozen=True)
class Command:
    args: list[str]               # normalised: the operation's own name, own group filled in
    op: ops.Op | None             # None: the answer is `help` text already
    ns: argparse.Namespace | None
    help: str = ""

    @property
    def line(self) -> str:
        """The command as an approver sees it and as it runs: every argument, each in
        its visible form (`actions.shown`), on one line."""
        return "ncl " + shown_line(self.args)


class _Help(Exception):
    """A parser's help text, asked for with -h/--help (the answer, not an error)."""


class _Parser(argparse.ArgumentParser):
    """Says what is wrong as Refused, and gives help as text, instead of printing and
    exiting; notes the options as they are given (`given`, for `canonical`)."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.given: list[tuple[argparse.Action, Any]] = []

    def error(self, message: str):
        raise Refused(one_line(f"{self.prog}: {message}"))

    def print_help(self, file=None) -> None:
        raise _Help(self.format_help().strip())


class _Store(argparse.Action):
    """argparse's `store`, noting each option given, in the order given."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        parser.given.append((self, values))


class _Flag(_Store):
    """argparse's `store_true`, noted the same way."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, required=required,
                         help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, True, option_string)


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


def allowed(o: ops.Op, scope: str) -> bool:
    """Whether an agent with this cli_scope may ask for the operation at all."""
    return o.never is None and (scope == "global" or (scope == "group" and o.group_scope))


def usage(scope: str) -> str:
    lines = [f"ncl: the admin commands you may use (cli_scope {scope}); pass them as a list,"
             " e.g. [\"groups\", \"list\"]; add \"--help\" for a command's options."]
    for o in admin.OPS.values():
        if allowed(o, scope):
            lines.append(f"  {o.words}{'' if o.read else '   (needs an admin approval)'}")
    return "\n".join(lines)


def parse(store: Store, agent_group_id: str, scope: str, raw: Any) -> Command:
    """Check a request against the scope and parse it; Refused says why not."""
    args = check_args(raw)
    if scope == "disabled":
        raise Refused("ncl is disabled for this agent group (cli_scope disabled)")
    if not args or args[0] in ("help", "-h", "--help"):
        return Command(args, None, None, usage(scope))
    try:
        o, rest = _operation(args)
    except _Help as h:
        return Command(args, None, None, str(h))
    if scope == "group" and not o.group_scope:
        raise Refused(f"{o.words} is outside this agent's cli_scope"
                      " (group: only its own groups, destinations and members)")
    own = store.agent_group(agent_group_id)
    if own is None:
        raise Refused("this agent group no longer exists")
    p = op_parser(o, own["id"], scope)
    try:
        ns = p.parse_intermixed_args(rest)
    except _Help as h:
        return Command(args, o, None, str(h))
    if scope == "group":
        for field in o.refs:
            value = getattr(ns, field, None)
            if value is not None and value not in (own["id"], own["folder"]):
                raise Refused(f"with cli_scope group you may only name your own agent group"
                              f" ({own['id']}), not {value!r}")
        if getattr(ns, "cli_scope", None) is not None:
            raise Refused("cli_scope cannot be changed from inside the agent (cli_scope group)")
    return Command(canonical(o, ns, p.given), o, ns)


def _operation(args: list[str]) -> tuple[ops.Op, list[str]]:
    """The operation `args` name (by its name or an alias), and the arguments after it;
    Refused if it is unknown or never an agent's. (`verb --help` is answered as _Help.)"""
    verb = args[0]
    known = ops.of(verb)
    if not known:
        raise Refused(f"unknown command {verb!r}; `ncl help` lists yours")
    if known[0].name is None:
        o, rest = known[0], args[1:]
    else:
        names = [o.name for o in known if o.never is None]
        if not names:
            raise Refused(known[0].never or "")
        if len(args) < 2:
            raise Refused(f"{verb} needs one of: {', '.join(names)}")
        if args[1] in ("-h", "--help"):
            raise _Help(_verb_help(verb, [o for o in known if o.never is None]))
        found = ops.find(verb, args[1])
        if found is None:
            raise Refused(f"unknown operation {verb} {args[1]!r}; known: {', '.join(names)}")
        o, rest = found, args[2:]
    if o.never:
        raise Refused(o.never)
    return o, rest


def op_parser(o: ops.Op, own: str, scope: str) -> _Parser:
    """`ncl VERB OP`'s parser, from the registry: its own-group field defaults to the
    agent's group (a positional always, as `nargs="?"`; a list's filter option only in
    group scope, so lists show only the own group there)."""
    p = _Parser(prog=f"ncl {o.words}", description=o.help)
    for a in o.args:
        kw = dict(a.kw)
        if not a.positional:
            kw["action"] = _Flag if kw.get("action") == "store_true" else _Store
        if a.dest == o.own and a.positional:
            kw.update(nargs="?", default=own)
        elif a.dest == o.own and scope == "group":
            kw["default"] = own
        p.add_argument(*a.flags, **kw)
    return p


def _verb_help(verb: str, known: list[ops.Op]) -> str:
    p = _Parser(prog=f"ncl {verb}", description=ops.VERBS[verb].help)
    sub = p.add_subparsers(dest="op", metavar="OPERATION")
    for o in known:
        sub.add_parser(o.name, help=o.help)
    return p.format_help().strip()


def canonical(o: ops.Op, ns: argparse.Namespace,
              given: list[tuple[argparse.Action, Any]]) -> list[str]:
    """The command written out whole, as it will run: the operation's own name, its
    positionals in order (the own group included where it was filled in), then every
    option as given, in the agent's order, by its full name; an own-group option filled
    in last. What an approver sees is exactly what runs, and every argument is on it."""
    positionals = [str(getattr(ns, a.dest)) for a in o.args
                   if a.positional and getattr(ns, a.dest) is not None]
    options: list[str] = []

    def put(act: argparse.Action, value: Any) -> None:
        flag = max(act.option_strings, key=len)
        if act.nargs == 0:
            options.append(flag)
        elif str(value).startswith("-"):
            options.append(f"{flag}={value}")
        else:
            options.extend([flag, str(value)])

    for act, value in given:
        put(act, value)
    seen = {act.dest for act, _ in given}
    for a in o.args:
        if a.dest == o.own and not a.positional and a.dest not in seen \
                and getattr(ns, a.dest) is not None:
            options.extend([max(a.flags, key=len), str(getattr(ns, a.dest))])
    # a positional parsed as one (`-`, `-5`) is read as one again in the same place
    return [o.verb, *([o.name] if o.name else []), *positionals, *options]
