"""Admin verbs for what an agent group may reach and spend: its extra mounts (checked
at the door by the rules the containers worker applies at each spawn, `mounts.py`) and
the tokens it used per day (`token_usage`, counted by the broker) beside its daily
budget (set with `nanoclaw groups update GROUP --daily-token-budget N`)."""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timedelta
from typing import Any, Callable
from zoneinfo import ZoneInfo

from nanoclaw.agents import mounts as mnt
from nanoclaw.cli.admin import _config_row, _group, _table, run_verb
from nanoclaw.cli.common import CliError
from nanoclaw.db.central import atomic
from nanoclaw.util import utcnow


def mounts(a: argparse.Namespace, store, settings) -> None:
    """A refused mount is one line and is not stored; `list` checks each one again."""
    if a.op == "list":
        allow, why = None, ""
        try:
            allow = mnt.Allowlist.load(settings.mount_allowlist)
        except mnt.MountError as e:
            why = str(e)
        groups = [_group(store, a.group)] if a.group else store.q(
            "SELECT * FROM agent_groups ORDER BY created_at")
        rows = []
        for g in groups:
            try:
                reqs = mnt.requests_of(store.container_config(g["id"]).get("additional_mounts"))
            except mnt.MountError as e:
                rows.append({"group": g["folder"], "status": f"refused: {e}"})
                continue
            for r in reqs:
                row = {"group": g["folder"], "name": mnt.name_of(r),
                       "host_path": r.get("hostPath", r.get("host_path"))}
                try:
                    if allow is None:
                        raise mnt.MountError(why)
                    m = mnt.check(r, allow, mnt.protected(settings))
                    row.update(mode="rw" if m.writable else "ro", status="ok")
                except mnt.MountError as e:
                    row.update(mode="-", status=f"refused: {e}")
                rows.append(row)
        _table(rows, ["group", "name", "host_path", "mode", "status"])
        return
    g = _group(store, a.group)
    try:
        current = mnt.requests_of(store.container_config(g["id"]).get("additional_mounts"))
    except mnt.MountError as e:
        raise CliError(f"{g['folder']}: {e}; fix container_configs first", 2) from None
    if a.op == "add":
        path = os.path.expanduser(a.path)
        request = {"hostPath": path if os.path.isabs(path) else os.path.abspath(path),
                   "containerPath": a.name, "readonly": not a.rw}
        try:
            m = mnt.check({k: v for k, v in request.items() if v is not None},
                          mnt.Allowlist.load(settings.mount_allowlist), mnt.protected(settings))
        except mnt.MountError as e:
            raise CliError(str(e), 2) from None
        if a.rw and not m.writable:
            raise CliError(f"extra mount {a.path} refused: --rw, but its allowed root is"
                           f" read-only (allowReadWrite in {settings.mount_allowlist})", 2)
        name = m.target.rsplit("/", 1)[1]
        if any(mnt.name_of(r) == name for r in current):
            raise CliError(f"{g['folder']} already has an extra mount named {name!r}"
                           " (choose another with --name)", 2)
        request["containerPath"] = name
        current.append(request)
        verb = f"added {m.target} ({'rw' if m.writable else 'ro'}) ← {m.source}"
    else:
        keep = [r for r in current if a.name not in (mnt.name_of(r), r.get("hostPath"))]
        if len(keep) == len(current):
            raise CliError(f"{g['folder']} has no extra mount {a.name!r}", 2)
        current = keep
        verb = f"removed {a.name}"
    with atomic(store.conn):
        _config_row(store, g["id"])
        store.conn.execute("UPDATE container_configs SET additional_mounts=?, updated_at=?"
                           " WHERE agent_group_id=?", (json.dumps(current), utcnow(), g["id"]))
    print(f"{verb} for {g['folder']} (from its next agent start)")


def usage(a: argparse.Namespace, store, settings) -> None:
    """Tokens per agent group and day, with the daily budget in effect now beside them."""
    if a.days < 1:
        raise CliError(f"--days must be 1 or more, not {a.days}", 2)
    today = datetime.now(ZoneInfo(settings.tz)).date()
    since = (today - timedelta(days=a.days - 1)).isoformat()
    where, args = "u.day >= ?", [since]
    if a.group:
        where += " AND u.agent_group_id = ?"
        args.append(_group(store, a.group)["id"])
    rows = store.q("SELECT COALESCE(g.folder, u.agent_group_id) AS grp, u.day, u.requests,"
                   " u.input_tokens AS input, u.output_tokens AS output,"
                   " u.cache_creation_input_tokens AS cache_write,"
                   " u.cache_read_input_tokens AS cache_read, c.daily_token_budget AS own"
                   " FROM token_usage u LEFT JOIN agent_groups g ON g.id=u.agent_group_id"
                   " LEFT JOIN container_configs c ON c.agent_group_id=u.agent_group_id"
                   f" WHERE {where} ORDER BY grp, u.day", tuple(args))
    for r in rows:
        r["group"] = r.pop("grp")
        r["total"] = r["input"] + r["output"] + r["cache_write"] + r["cache_read"]
        own = r.pop("own")
        budget = (own if own is not None else settings.daily_token_budget) or 0
        r["budget"] = (f"{budget} (used up)" if r["total"] >= budget else budget) \
            if budget else None
    print(f"token usage {since} .. {today} ({settings.tz})")
    _table(rows, ["group", "day", "requests", "input", "output", "cache_write", "cache_read",
                  "total", "budget"])


VERBS: dict[str, Callable] = {"mounts": mounts, "usage": usage}


def run(a: argparse.Namespace) -> int:
    return run_verb(VERBS[a.verb], a)


def add_parsers(sub: Any) -> None:
    def p(name: str, help: str) -> argparse.ArgumentParser:
        x = sub.add_parser(name, help=help)
        x.set_defaults(fn=run)
        return x

    mt = p("mounts", "host folders an agent group sees under /workspace/extra").add_subparsers(
        dest="op", required=True)
    mt.add_parser("list").add_argument("group", nargs="?")
    x = mt.add_parser("add")
    x.add_argument("group")
    x.add_argument("path", help="host folder, under a root of the mount allowlist")
    x.add_argument("--name", help="its name under /workspace/extra (default: the folder's)")
    x.add_argument("--rw", action="store_true", help="writable (if its root allows it)")
    x = mt.add_parser("remove")
    x.add_argument("group")
    x.add_argument("name", help="the mount's name (or its host path)")

    x = p("usage", "tokens used per agent group and day, beside the budget")
    x.add_argument("--days", type=int, default=7, help="this many days up to today (7)")
    x.add_argument("--group", help="one agent group")
