"""Admin verbs of `nanoclaw`: agent groups (and their token budgets and skills), skills,
wiring, users, roles, members, destinations, approvals and tasks (extra mounts and token
usage: `admin_limits.py`). They write the central DB directly (safe while the host runs: WAL,
one transaction each) and re-project destinations into live sessions. An unknown id is
one clear line and exit 2; nothing is written half."""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Callable

from nanoclaw.agents import scheduling
from nanoclaw.agents.groups import ensure_group_folder, normalise_name
from nanoclaw.approvals import cards
from nanoclaw.approvals import requests as approvals
from nanoclaw.cli.common import CliError, load_settings, open_store
from nanoclaw.db import session as sessiondb
from nanoclaw.db.central import atomic
from nanoclaw.delivery import actions
from nanoclaw.errors import NotAllowed, NotFound
from nanoclaw.util import FOLDER_NAME, local_user_id, utcnow

ENGAGE = ["pattern", "mention", "mention-sticky"]
SESSION = ["shared", "per-thread", "agent-shared"]
# what the runner mounts at /app/skills; the same name rule as container/agent_runner/skills.py
SKILLS_DIR = Path(__file__).resolve().parent.parent / "container" / "skills"
SKILL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c) if r.get(c) is not None else "-"))
                               for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c) if r.get(c) is not None else "-").ljust(widths[c])
                        for c in cols))


def _need(store, sql: str, args: tuple, what: str) -> dict[str, Any]:
    row = store.q1(sql, args)
    if row is None:
        raise CliError(f"unknown {what}", 2)
    return row


def _group(store, ag: str) -> dict[str, Any]:
    return _need(store, "SELECT * FROM agent_groups WHERE id=? OR folder=?", (ag, ag),
                 f"agent group {ag!r}")


def _chat(store, channel: str, platform_id: str, create: bool, group: bool = False) -> str:
    mg = store.messaging_group(channel, platform_id)
    if mg:
        return mg["id"]
    if not create:
        raise CliError(f"unknown chat {channel} {platform_id!r}", 2)
    return store.create_messaging_group(channel, platform_id, None, group)


def _refresh(store, settings, ag: str) -> None:
    actions.refresh_destinations(store, settings, ag)


def _config_row(store, ag: str) -> None:
    """Groups made before container_configs existed may lack their row."""
    store.conn.execute("INSERT OR IGNORE INTO container_configs (agent_group_id, updated_at)"
                       " VALUES (?,?)", (ag, utcnow()))


def _budget_arg(text: str) -> int | None:
    """`--daily-token-budget`: N tokens a day, 0 for no limit, `none` for the default."""
    if text.strip().lower() in ("none", "default"):
        return None
    try:
        n = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        n = -1
    if n < 0:
        raise CliError(f"bad daily token budget {text!r}: give a whole number of tokens, 0 for"
                       " no limit, or none for the default", 2)
    return n


def _budget_text(own: int | None, default: int) -> str:
    if own is None:
        return (f"default, {default}" if default else "default, none") + \
            " (NANOCLAW_DAILY_TOKEN_BUDGET)"
    return str(own) if own else "none (this group is unlimited)"


def _skills_available() -> dict[str, str]:
    """Every skill folder in container/skills, with its SKILL.md description."""
    try:
        names = sorted(p.name for p in SKILLS_DIR.iterdir()
                       if SKILL_NAME.match(p.name) and p.is_dir())
    except OSError:
        return {}
    return {n: _skill_description(SKILLS_DIR / n / "SKILL.md") for n in names}


def _skill_description(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8")[:16_384].splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    if not lines or lines[0].strip() != "---":
        return ""
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("description:"):
            return line.partition(":")[2].strip().strip("'\"")
    return ""


def _skills_arg(text: str) -> str:
    """`--skills all|none|a,b` → the JSON stored in container_configs.skills."""
    value = text.strip()
    if value.lower() in ("all", "none"):
        return json.dumps("all") if value.lower() == "all" else "[]"
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    known = _skills_available()
    for n in names:
        if not SKILL_NAME.match(n) or n not in known:
            raise CliError(f"unknown skill {n!r} (available: {', '.join(known) or 'none'};"
                           " or all, none)", 2)
    return json.dumps(names) if names else "[]"


def _skills_of(raw: Any) -> list[str] | None:
    """A group's stored `skills` as a list of names; None means all."""
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return None
    if value == "none":
        return []
    return [str(v) for v in value] if isinstance(value, list) else None


# ---- verbs ------------------------------------------------------------------------------
def groups(a: argparse.Namespace, store, settings) -> None:
    if a.op == "list":
        only = (_group(store, a.group)["id"],) if getattr(a, "group", None) else ()
        rows = store.q("SELECT g.id, g.name, g.folder, c.provider, c.model,"
                       " c.fallback_model AS fallback, c.daily_token_budget FROM agent_groups g"
                       " LEFT JOIN container_configs c ON c.agent_group_id=g.id"
                       f" {'WHERE g.id=?' if only else ''} ORDER BY g.created_at", only)
        for r in rows:
            own, default = r.pop("daily_token_budget"), settings.daily_token_budget
            r["daily_budget"] = (own if own is not None else default) or None
            r["fallback"] = r["fallback"] or settings.fallback_model or None
        _table(rows, ["id", "name", "folder", "provider", "model", "fallback", "daily_budget"])
    elif a.op == "add":
        folder = a.folder or normalise_name(a.name)
        if not FOLDER_NAME.match(folder):
            raise CliError(f"bad folder name {folder!r}", 2)
        if store.q1("SELECT 1 AS x FROM agent_groups WHERE folder=?", (folder,)):
            raise CliError(f"folder {folder!r} is taken", 2)
        ag = store.create_agent_group(a.name, folder, a.provider or settings.provider,
                                      a.model or settings.model, a.name)
        ensure_group_folder(settings, folder, a.name)
        print(ag)
    elif a.op == "remove":
        g = _group(store, a.id)
        store.conn.execute("DELETE FROM agent_groups WHERE id=?", (g["id"],))
        print(f"removed {g['id']}")
    elif a.op == "update":
        g = _group(store, a.id)
        budget = a.daily_token_budget is not None
        limit = _budget_arg(a.daily_token_budget) if budget else None
        chosen = _skills_arg(a.skills) if getattr(a, "skills", None) is not None else None
        with atomic(store.conn):
            _config_row(store, g["id"])
            if a.name:
                store.conn.execute("UPDATE agent_groups SET name=? WHERE id=?",
                                   (a.name, g["id"]))
            fallback = getattr(a, "fallback_model", None)
            for col, v in (("provider", a.provider), ("model", a.model),
                           ("cli_scope", getattr(a, "cli_scope", None)), ("skills", chosen),
                           ("fallback_model", None if fallback == "none" else fallback)):
                if v:
                    store.conn.execute(f"UPDATE container_configs SET {col}=?, updated_at=?"
                                       " WHERE agent_group_id=?", (v, utcnow(), g["id"]))
            if fallback == "none":  # back to NANOCLAW_FALLBACK_MODEL
                store.conn.execute("UPDATE container_configs SET fallback_model=NULL,"
                                   " updated_at=? WHERE agent_group_id=?", (utcnow(), g["id"]))
            if budget:
                store.conn.execute("UPDATE container_configs SET daily_token_budget=?,"
                                   " updated_at=? WHERE agent_group_id=?",
                                   (limit, utcnow(), g["id"]))
        note = f" (daily token budget: {_budget_text(limit, settings.daily_token_budget)})" \
            if budget else ""
        print(f"updated {g['id']}{note}")


def skills(a: argparse.Namespace, store, settings) -> None:
    """The skills in container/skills and the groups that enable them (at their next
    start; `groups update GROUP --skills`)."""
    available = _skills_available()
    enabled: dict[str, list[str]] = {n: [] for n in available}
    for g in store.q("SELECT g.folder, c.skills FROM agent_groups g LEFT JOIN"
                     " container_configs c ON c.agent_group_id=g.id ORDER BY g.folder"):
        names = _skills_of(g["skills"])
        for n in available if names is None else names:
            enabled.setdefault(n, []).append(g["folder"])
    rows = []
    for n, folders in enabled.items():
        text = available[n] if n in available else "(missing from container/skills)"
        rows.append({"name": n, "groups": ",".join(folders) or None,
                     "description": text if len(text) <= 70 else text[:69] + "…"})
    _table(rows, ["name", "groups", "description"])


def wire(a: argparse.Namespace, store, settings) -> None:
    if a.op == "list":
        _table(store.q("SELECT w.id, m.channel_type, m.platform_id, g.folder AS agent,"
                       " w.engage_mode, w.engage_pattern, w.sender_scope,"
                       " w.ignored_message_policy AS ignored, w.session_mode, w.priority"
                       " FROM messaging_group_agents w JOIN messaging_groups m"
                       " ON m.id=w.messaging_group_id JOIN agent_groups g"
                       " ON g.id=w.agent_group_id ORDER BY m.platform_id, w.priority DESC"),
               ["id", "channel_type", "platform_id", "agent", "engage_mode", "engage_pattern",
                "sender_scope", "ignored", "session_mode", "priority"])
    elif a.op == "add":
        g = _group(store, a.agent)
        mg = _chat(store, a.channel, a.chat, create=True, group=a.group)
        try:
            wid = store.wire(mg, g["id"], destination=a.name or normalise_name(a.chat),
                             engage_mode=a.engage, engage_pattern=a.pattern if a.engage ==
                             "pattern" else None, sender_scope=a.scope, ignored=a.ignored,
                             session_mode=a.session, priority=a.priority)
        except sqlite3.IntegrityError:
            raise CliError("that chat is already wired to that agent", 2) from None
        if a.policy:
            store.conn.execute("UPDATE messaging_groups SET unknown_sender_policy=? WHERE id=?",
                               (a.policy, mg))
        _refresh(store, settings, g["id"])
        print(wid)
    elif a.op == "remove":
        w = _need(store, "SELECT * FROM messaging_group_agents WHERE id=?", (a.id,),
                  f"wiring {a.id!r}")
        store.conn.execute("DELETE FROM messaging_group_agents WHERE id=?", (a.id,))
        _refresh(store, settings, w["agent_group_id"])
        print(f"removed {a.id}")


def users(a: argparse.Namespace, store, settings) -> None:
    if a.op == "list":
        _table(store.q("SELECT id, kind, display_name, created_at FROM users ORDER BY id"),
               ["id", "kind", "display_name", "created_at"])
    elif a.op == "add":
        if ":" not in a.id:
            raise CliError("a user id is <channel>:<handle>", 2)
        store.ensure_user(a.id, a.id.split(":", 1)[0], a.name)
        print(a.id)
    elif a.op == "remove":
        _need(store, "SELECT * FROM users WHERE id=?", (a.id,), f"user {a.id!r}")
        store.conn.execute("DELETE FROM users WHERE id=?", (a.id,))
        print(f"removed {a.id}")


def _actor(a: argparse.Namespace) -> str:
    """Who is recorded as making a change: the local user at the terminal, or the admin
    who approved an agent's `ncl` command (set by `agent_cli.execute`)."""
    return getattr(a, "actor", None) or local_user_id()


def roles(a: argparse.Namespace, store, settings) -> None:
    if a.op == "list":
        _table(store.q("SELECT user_id, role, agent_group_id, granted_by, granted_at FROM"
                       " user_roles ORDER BY user_id"),
               ["user_id", "role", "agent_group_id", "granted_by", "granted_at"])
        return
    _need(store, "SELECT * FROM users WHERE id=?", (a.user,), f"user {a.user!r}")
    ag = _group(store, a.group)["id"] if a.group else None
    if a.role == "owner" and ag:
        raise CliError("an owner role is global: drop --group", 2)
    if a.op == "grant":
        store.grant_role(a.user, a.role, ag, granted_by=_actor(a))
    else:
        n = store.conn.execute("DELETE FROM user_roles WHERE user_id=? AND role=? AND"
                               " agent_group_id IS ?", (a.user, a.role, ag)).rowcount
        if not n:
            raise CliError(f"{a.user} has no such role", 2)
    print(f"{a.op} {a.role} {a.user}" + (f" on {ag}" if ag else ""))


def members(a: argparse.Namespace, store, settings) -> None:
    if a.op == "list":
        where, args = ("WHERE agent_group_id=?", (_group(store, a.group)["id"],)) if a.group \
            else ("", ())
        _table(store.q(f"SELECT user_id, agent_group_id, added_by, added_at FROM"
                       f" agent_group_members {where} ORDER BY user_id", args),
               ["user_id", "agent_group_id", "added_by", "added_at"])
        return
    _need(store, "SELECT * FROM users WHERE id=?", (a.user,), f"user {a.user!r}")
    ag = _group(store, a.group)["id"]
    if a.op == "add":
        store.conn.execute("INSERT OR IGNORE INTO agent_group_members VALUES (?,?,?,?)",
                           (a.user, ag, _actor(a), utcnow()))
    else:
        if not store.conn.execute("DELETE FROM agent_group_members WHERE user_id=? AND"
                                  " agent_group_id=?", (a.user, ag)).rowcount:
            raise CliError(f"{a.user} is not a member of {ag}", 2)
    print(f"{a.op} {a.user} {ag}")


def destinations(a: argparse.Namespace, store, settings) -> None:
    ag = _group(store, a.group)["id"]
    if a.op == "list":
        _table(store.destinations(ag), ["name", "type", "channel_type", "platform_id"])
        return
    if a.op == "add":
        if bool(a.chat) == bool(a.agent):
            raise CliError("give exactly one of --chat CHANNEL:PLATFORM_ID or --agent GROUP", 2)
        if a.agent:
            store.add_agent_destination(ag, a.name, _group(store, a.agent)["id"])
        else:
            ch, _, pid = a.chat.partition(":")
            mg = _chat(store, ch, pid, create=False)
            store.conn.execute("INSERT INTO agent_destinations VALUES (?,?,'channel',?,?)",
                               (ag, a.name, mg, utcnow()))
    elif not store.conn.execute("DELETE FROM agent_destinations WHERE agent_group_id=? AND"
                                " local_name=?", (ag, a.name)).rowcount:
        raise CliError(f"no destination {a.name!r} for {ag}", 2)
    _refresh(store, settings, ag)
    print(f"{a.op} {a.name}")


def approvals_cmd(a: argparse.Namespace, store, settings) -> None:
    if a.op == "list":
        _table(approvals.pending(store), ["id", "kind", "about", "created_at"])
        return
    option = {"approve": "approve", "reject": "reject"}[a.op]
    if a.id.startswith("snd-"):
        option = "allow" if a.op == "approve" else "deny"
    elif a.id.startswith("chan-") and a.op == "approve":
        if not a.agent:
            raise CliError("approving a chat needs --agent GROUP to connect it to", 2)
        option = f"connect:{_group(store, a.agent)['id']}"

    def replay(row: dict[str, Any]) -> object:
        """The terminal has no router: one like the router worker's, which knows the
        threaded channels, replays an approved message (lazy: `nanoclaw` starts fast)."""
        from nanoclaw.channels import load_builtin
        from nanoclaw.routing.router import Router

        return Router(store, settings, load_builtin().threaded()).replay(row)

    try:
        print(cards.decide(store, settings, a.id, option, local_user_id(), replay))
    except NotFound:
        raise CliError(f"unknown or closed approval {a.id!r}", 2) from None
    except NotAllowed as e:
        raise CliError(str(e), 2) from None


def tasks(a: argparse.Namespace, store, settings) -> None:
    sessions = store.sessions_where("status='active'")
    found = []
    for s in sessions:
        p = sessiondb.of(settings, s)
        try:
            if a.op == "list":
                for t in scheduling.list_tasks(p):
                    c = json.loads(t["content"])
                    found.append({"task": t["series_id"], "status": t["status"],
                                  "next_run": t["process_after"], "recurrence": t["recurrence"],
                                  "session": s["id"], "prompt": (c.get("prompt") or "")[:40]})
            else:
                getattr(scheduling, a.op)(p, a.id)
                found.append(s["id"])
        except scheduling.TaskError:
            continue
        except sqlite3.DatabaseError:
            continue
    if a.op == "list":
        _table(found, ["task", "status", "next_run", "recurrence", "session", "prompt"])
    elif not found:
        raise CliError(f"no live task {a.id!r}", 2)
    else:
        print(f"{a.op} {a.id}")


def init_first_agent(a: argparse.Namespace, store, settings) -> None:
    """The install is one transaction (`Store.install_first_agent`), so a failure leaves
    no half install; the group folder and live sessions are brought in line after the
    commit (running the verb again finishes them: every step is find-or-create)."""
    folder = normalise_name(a.name)
    user = a.user if ":" in a.user else f"{a.channel}:{a.user}"
    ag = store.install_first_agent(
        a.name, folder, settings.provider, settings.model, user, a.channel, a.channel, a.chat,
        a.group, {"destination": normalise_name(a.chat),
                  "engage_mode": "mention" if a.group else "pattern",
                  "engage_pattern": None if a.group else "."})
    ensure_group_folder(settings, folder, a.name)
    _refresh(store, settings, ag)
    print(f"agent {ag} ({folder}) wired to {a.channel} {a.chat}; owner {user}")


VERBS: dict[str, Callable] = {"groups": groups, "skills": skills, "wire": wire, "users": users,
                              "roles": roles, "members": members, "destinations": destinations,
                              "approvals": approvals_cmd, "tasks": tasks,
                              "init-first-agent": init_first_agent}


def run(a: argparse.Namespace) -> int:
    return run_verb(VERBS[a.verb], a)


def run_verb(verb: Callable, a: argparse.Namespace) -> int:
    settings = load_settings()
    store = open_store(settings)
    try:
        verb(a, store, settings)
    except sqlite3.IntegrityError as e:
        raise CliError(f"refused by the database: {e}", 2) from None
    return 0


def add_parsers(sub: Any) -> None:
    def p(name: str, help: str) -> argparse.ArgumentParser:
        x = sub.add_parser(name, help=help)
        x.set_defaults(fn=run)
        return x

    g = p("groups", "agent groups").add_subparsers(dest="op", required=True)
    g.add_parser("list").add_argument("--group", help="only this agent group")
    x = g.add_parser("add")
    x.add_argument("name")
    x.add_argument("--folder")
    x.add_argument("--provider", choices=["claude", "anthropic"])
    x.add_argument("--model")
    g.add_parser("remove").add_argument("id")
    x = g.add_parser("update")
    x.add_argument("id")
    x.add_argument("--name")
    x.add_argument("--provider", choices=["claude", "anthropic"])
    x.add_argument("--model")
    x.add_argument("--daily-token-budget", metavar="N|none",
                   help="tokens a day for this group (0: no limit; none: the default,"
                        " NANOCLAW_DAILY_TOKEN_BUDGET)")
    x.add_argument("--fallback-model", metavar="MODEL|none",
                   help="answer with this model while the group's own stays overloaded"
                        " (none: back to NANOCLAW_FALLBACK_MODEL)")
    x.add_argument("--cli-scope", choices=["disabled", "group", "global"],
                   help="what the agent's in-sandbox `ncl` may reach (see README)")
    x.add_argument("--skills", metavar="all|none|A,B",
                   help="which skills of container/skills the agent gets (`nanoclaw skills`"
                        " lists them); from its next start")

    k = p("skills", "the agent skills in container/skills and which groups enable them")
    k.add_subparsers(dest="op").add_parser("list")

    w = p("wire", "which chats talk to which agents").add_subparsers(dest="op", required=True)
    w.add_parser("list")
    x = w.add_parser("add")
    x.add_argument("--channel", required=True)
    x.add_argument("--chat", required=True, help="the platform id, e.g. telegram:123")
    x.add_argument("--agent", required=True, help="agent group id or folder")
    x.add_argument("--name", help="the agent's name for this chat")
    x.add_argument("--group", action="store_true", help="the chat is a group chat")
    x.add_argument("--engage", choices=ENGAGE, default="pattern")
    x.add_argument("--pattern", default=".")
    x.add_argument("--scope", choices=["all", "known"], default="all")
    x.add_argument("--ignored", choices=["drop", "accumulate"], default="drop")
    x.add_argument("--session", choices=SESSION, default="shared")
    x.add_argument("--priority", type=int, default=0)
    x.add_argument("--policy", choices=["strict", "request_approval", "public"])
    w.add_parser("remove").add_argument("id")

    u = p("users", "people").add_subparsers(dest="op", required=True)
    u.add_parser("list")
    x = u.add_parser("add")
    x.add_argument("id", help="<channel>:<handle>")
    x.add_argument("--name")
    u.add_parser("remove").add_argument("id")

    r = p("roles", "owner and admin roles").add_subparsers(dest="op", required=True)
    r.add_parser("list")
    for op in ("grant", "revoke"):
        x = r.add_parser(op)
        x.add_argument("user")
        x.add_argument("role", choices=["owner", "admin"])
        x.add_argument("--group", help="scope an admin role to one agent group")

    m = p("members", "who may talk to an agent group").add_subparsers(dest="op", required=True)
    m.add_parser("list").add_argument("--group")
    for op in ("add", "remove"):
        x = m.add_parser(op)
        x.add_argument("user")
        x.add_argument("group")

    d = p("destinations", "the names an agent sends to").add_subparsers(dest="op", required=True)
    d.add_parser("list").add_argument("group")
    x = d.add_parser("add")
    x.add_argument("group")
    x.add_argument("name")
    x.add_argument("--chat", help="CHANNEL:PLATFORM_ID")
    x.add_argument("--agent", help="another agent group")
    x = d.add_parser("remove")
    x.add_argument("group")
    x.add_argument("name")

    ap = p("approvals", "pending approvals").add_subparsers(dest="op", required=True)
    ap.add_parser("list")
    for op in ("approve", "reject"):
        x = ap.add_parser(op)
        x.add_argument("id")
        x.add_argument("--agent", help="for a new chat: the agent group to connect")

    t = p("tasks", "scheduled tasks").add_subparsers(dest="op", required=True)
    t.add_parser("list")
    for op in ("pause", "resume", "cancel"):
        t.add_parser(op).add_argument("id")

    x = p("init-first-agent", "create an agent, wire a chat, make its user the owner")
    x.add_argument("--name", default="main")
    x.add_argument("--channel", required=True)
    x.add_argument("--chat", required=True, help="the platform id of the chat")
    x.add_argument("--user", required=True, help="the owner's handle on that channel")
    x.add_argument("--group", action="store_true")
