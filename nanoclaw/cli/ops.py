"""The registry of admin operations: each is declared once, beside its code, with `@op`.

    @op("groups", "update", read=False, group_scope=True, own="id",
        args=[arg("id"), arg("--name"), ...])
    def groups_update(a, store, settings): ...

From the registry `nanoclaw`'s parser is built (`add_parsers`), the agent's `ncl`
(`cli/agent.py`) learns what an agent may ask for (`read`, `group_scope`, `refs`, `own`,
`never`), and the docs test checks that every operation is in the README. The topic
modules (`ops_*.py`) declare; `cli/admin.py` imports them all, in the order `nanoclaw
--help` lists them. An operation raises the host's errors (`nanoclaw.errors`); `call`
turns them into the one-line `CliError`.
"""

from __future__ import annotations

import argparse
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Callable

from nanoclaw.cli.common import CliError, load_settings, open_store
from nanoclaw.errors import ConfigError, DataError, NotAllowed, NotFound, Refused

Fn = Callable[[argparse.Namespace, Any, Any], None]  # (args, store, settings)
DOMAIN_ERRORS = (NotFound, NotAllowed, Refused, DataError, ConfigError)


@dataclass(frozen=True)
class Arg:
    """One `add_argument` call: its flags (or positional name) and keywords."""
    flags: tuple[str, ...]
    kw: dict[str, Any] = field(default_factory=dict)

    @property
    def positional(self) -> bool:
        return not self.flags[0].startswith("-")

    @property
    def dest(self) -> str:
        if "dest" in self.kw:
            return self.kw["dest"]
        if self.positional:
            return self.flags[0]
        long = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return long.lstrip("-").replace("-", "_")

    @property
    def default(self) -> Any:
        return self.kw.get("default", False if self.kw.get("action") == "store_true" else None)


def arg(*flags: str, **kw: Any) -> Arg:
    return Arg(flags, kw)


@dataclass(frozen=True)
class Op:
    verb: str
    name: str | None              # None: the verb takes its arguments itself (`usage`)
    fn: Fn
    read: bool                    # answered at once for an agent; else an admin approves
    group_scope: bool = False     # an agent with cli_scope `group` may use it
    refs: tuple[str, ...] = ()    # parsed fields that name an agent group (own included)
    own: str | None = None        # the field an agent's own group fills when left out
    args: tuple[Arg, ...] = ()
    help: str | None = None
    aliases: tuple[str, ...] = ()  # other names `ncl` accepts (agents guess `create`)
    never: str | None = None      # why an agent may never ask for it; None: it may (with
    # `agent=True` at `@op`: an operation is the terminal's only unless it says so)

    @property
    def words(self) -> str:
        return self.verb + (f" {self.name}" if self.name else "")


@dataclass(frozen=True)
class Verb:
    help: str
    default: str | None = None    # the operation run when none is named (`skills`)


VERBS: dict[str, Verb] = {}
OPS: dict[tuple[str, str | None], Op] = {}


def verb(name: str, help: str, default: str | None = None) -> None:
    """Declare a verb (a topic of operations) with its one-line help."""
    VERBS[name] = Verb(help, default)


def op(verb: str, name: str | None = None, *, read: bool, group_scope: bool = False,
       refs: tuple[str, ...] = (), own: str | None = None, args: list[Arg] = (),
       help: str | None = None, aliases: tuple[str, ...] = (),
       never: str | None = None, agent: bool = False) -> Callable[[Fn], Fn]:
    """Register the decorated function as `nanoclaw VERB NAME`, and as `ncl VERB NAME`
    only with `agent=True`: what agents may ask for is opted into, one operation at a
    time, never inherited by a new one."""
    if not agent and never is None:
        never = f"{verb}{' ' + name if name else ''} is for the terminal only"
    if verb not in VERBS:
        raise ValueError(f"declare the verb {verb!r} before its operations")
    dests = {a.dest for a in args}
    for f in ((own,) if own else ()) + tuple(refs):
        if f not in dests:
            raise ValueError(f"{verb} {name}: no argument {f!r}")

    def register(fn: Fn) -> Fn:
        if (verb, name) in OPS:
            raise ValueError(f"{verb} {name} is declared twice")
        OPS[(verb, name)] = Op(verb, name, fn, read, group_scope,
                               tuple(dict.fromkeys(((own,) if own else ()) + tuple(refs))),
                               own, tuple(args), help, tuple(aliases), never)
        return fn
    return register


def of(verb: str) -> list[Op]:
    return [o for (v, _), o in OPS.items() if v == verb]


def find(verb: str, name: str | None) -> Op | None:
    """The operation named `name` or one of its aliases."""
    return OPS.get((verb, name)) or next(
        (o for o in of(verb) if name in o.aliases), None)


# ---- running ------------------------------------------------------------------------------
def call(o: Op, a: argparse.Namespace, store, settings) -> None:
    """Run one operation; any refusal is a one-line CliError (exit 2)."""
    try:
        o.fn(a, store, settings)
    except DOMAIN_ERRORS as e:
        raise CliError(str(e), 2) from None
    except sqlite3.IntegrityError as e:
        raise CliError(f"refused by the database: {e}", 2) from None


def runner(o: Op) -> Callable[[argparse.Namespace], int]:
    """What `nanoclaw VERB OP` runs: open settings and store, then the operation."""
    def run(a: argparse.Namespace) -> int:
        settings = load_settings()
        call(o, a, open_store(settings), settings)
        return 0
    run.op = o  # type: ignore[attr-defined]  # which one it runs (tests)
    return run


# ---- the terminal's parser ----------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, o: Op) -> None:
    for a in o.args:
        p.add_argument(*a.flags, **a.kw)


def add_parsers(sub: Any) -> None:
    """One sub-parser per verb, one sub-sub-parser per operation, from the registry."""
    for name, v in VERBS.items():
        p = sub.add_parser(name, help=v.help)
        ops = of(name)
        if ops and ops[0].name is None:
            add_arguments(p, ops[0])
            p.set_defaults(fn=runner(ops[0]))
            continue
        s = p.add_subparsers(dest="op", required=v.default is None)
        for o in ops:
            x = s.add_parser(o.name, help=o.help)
            add_arguments(x, o)
            x.set_defaults(fn=runner(o))
        if v.default:
            p.set_defaults(fn=runner(OPS[(name, v.default)]))
