"""`nanoclaw mounts …` and `usage`: what an agent group may reach and spend. Extra mounts
are checked at the door by the rules the containers worker applies at each spawn
(`agents/mounts.py`); usage is the tokens per day the broker counted (`token_usage`)
beside the daily budget (`nanoclaw groups update GROUP --daily-token-budget N`), and
with `--web` the egress door's log of destinations (`egress_log`)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from nanoclaw.agents import mounts as mnt
from nanoclaw.cli.common import table
from nanoclaw.cli.ops import arg, op, verb
from nanoclaw.errors import Refused

# ---- mounts -------------------------------------------------------------------------------
verb("mounts", "host folders an agent group sees under /workspace/extra")


@op("mounts", "list", read=True, agent=True, args=[arg("group", nargs="?")])
def mounts_list(a, store, settings) -> None:
    """Every group's extra mounts (or one's), each checked again as a spawn would."""
    allow, why = None, ""
    try:
        allow = mnt.Allowlist.load(settings.mount_allowlist)
    except mnt.MountError as e:
        why = str(e)
    groups = [store.find_agent_group(a.group)] if a.group else store.agent_groups()
    rows: list[dict[str, Any]] = []
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
    table(rows, ["group", "name", "host_path", "mode", "status"])


def _current(store, g: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        return mnt.requests_of(store.container_config(g["id"]).get("additional_mounts"))
    except mnt.MountError as e:
        raise Refused(f"{g['folder']}: {e}; fix container_configs first") from None


def _save(store, g: dict[str, Any], mounts: list[dict[str, Any]], verb: str) -> None:
    store.update_group_config(g["id"], additional_mounts=json.dumps(mounts))
    print(f"{verb} for {g['folder']} (from its next agent start)")


@op("mounts", "add", read=False, agent=True, args=[
    arg("group"), arg("path", help="host folder, under a root of the mount allowlist"),
    arg("--name", help="its name under /workspace/extra (default: the folder's)"),
    arg("--rw", action="store_true", help="writable (if its root allows it)")])
def mounts_add(a, store, settings) -> None:
    """A refused mount is one line and is not stored."""
    g = store.find_agent_group(a.group)
    current = _current(store, g)
    path = os.path.expanduser(a.path)
    request = {"hostPath": path if os.path.isabs(path) else os.path.abspath(path),
               "containerPath": a.name, "readonly": not a.rw}
    try:
        m = mnt.check({k: v for k, v in request.items() if v is not None},
                      mnt.Allowlist.load(settings.mount_allowlist), mnt.protected(settings))
    except mnt.MountError as e:
        raise Refused(str(e)) from None
    if a.rw and not m.writable:
        raise Refused(f"extra mount {a.path} refused: --rw, but its allowed root is"
                      f" read-only (allowReadWrite in {settings.mount_allowlist})")
    name = m.target.rsplit("/", 1)[1]
    if any(mnt.name_of(r) == name for r in current):
        raise Refused(f"{g['folder']} already has an extra mount named {name!r}"
                      " (choose another with --name)")
    request["containerPath"] = name
    _save(store, g, [*current, request],
          f"added {m.target} ({'rw' if m.writable else 'ro'}) ← {m.source}")


@op("mounts", "remove", read=False, agent=True, args=[
    arg("group"), arg("name", help="the mount's name (or its host path)")])
def mounts_remove(a, store, settings) -> None:
    g = store.find_agent_group(a.group)
    current = _current(store, g)
    keep = [r for r in current if a.name not in (mnt.name_of(r), r.get("hostPath"))]
    if len(keep) == len(current):
        raise Refused(f"{g['folder']} has no extra mount {a.name!r}")
    _save(store, g, keep, f"removed {a.name}")


# ---- usage --------------------------------------------------------------------------------
verb("usage", "tokens used per agent group and day, beside the budget")


@op("usage", read=True, agent=True, args=[
    arg("--days", type=int, default=7, help="this many days up to today (7)"),
    arg("--group", help="one agent group"),
    arg("--web", action="store_true",
        help="the egress door's log instead: each destination per group and day, let"
             " through or refused (and why), connections, bytes")])
def usage(a, store, settings) -> None:
    """Tokens per agent group and day, with the daily budget in effect now beside them."""
    if a.days < 1:
        raise Refused(f"--days must be 1 or more, not {a.days}")
    today = datetime.now(ZoneInfo(settings.tz)).date()
    since = (today - timedelta(days=a.days - 1)).isoformat()
    if a.web:
        return web_usage(store, settings, since, today, a.group)
    rows = store.usage_by_day(since, store.find_agent_group(a.group)["id"] if a.group else None)
    for r in rows:
        r["group"] = r.pop("grp")
        r["total"] = r["input"] + r["output"] + r["cache_write"] + r["cache_read"]
        own = r.pop("own")
        budget = (own if own is not None else settings.daily_token_budget) or 0
        r["budget"] = (f"{budget} (used up)" if r["total"] >= budget else budget) \
            if budget else None
    print(f"token usage {since} .. {today} ({settings.tz})")
    table(rows, ["group", "day", "requests", "input", "output", "cache_write", "cache_read",
                 "total", "budget"])


def web_usage(store, settings, since: str, today, group: str | None) -> None:
    """`usage --web`: what the egress door let each group reach, or refused, and why."""
    rows = store.egress_by_day(since, store.find_agent_group(group)["id"] if group else None)
    for r in rows:
        r["group"] = r.pop("grp")
        r["decision"] = "allowed" if r.pop("allowed") else "refused"
        r["last"] = r.pop("last_at")
        r["reason"] = r["reason"] or None
    print(f"web traffic {since} .. {today} ({settings.tz}); daily limit per group:"
          f" {f'{settings.egress_daily_mb:g} MB' if settings.egress_daily_mb else 'none'}")
    table(rows, ["group", "day", "host", "port", "decision", "reason", "connections", "bytes",
                 "last"])
