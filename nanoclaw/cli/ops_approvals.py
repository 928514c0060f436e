"""`nanoclaw approvals …` and `tasks …`: answering pending approvals from the terminal,
and the scheduled tasks of every live session (kept in each session's inbound.db)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from nanoclaw.agents import scheduling
from nanoclaw.approvals import cards
from nanoclaw.approvals import requests as approvals
from nanoclaw.cli.common import table
from nanoclaw.cli.ops import arg, op, verb
from nanoclaw.db import session as sessiondb
from nanoclaw.errors import NotFound, Refused
from nanoclaw.util import local_user_id

NO_AGENT = "an agent cannot answer approvals"

# ---- approvals ----------------------------------------------------------------------------
verb("approvals", "pending approvals")
DECIDE_ARGS = [arg("id"), arg("--agent", help="for a new chat: the agent group to connect")]


@op("approvals", "list", read=True, agent=True)
def approvals_list(a, store, settings) -> None:
    table(approvals.pending(store), ["id", "kind", "about", "created_at"])


@op("approvals", "approve", read=False, never=NO_AGENT, args=DECIDE_ARGS)
def approvals_approve(a, store, settings) -> None:
    if a.id.startswith("snd-"):
        option = "allow"
    elif a.id.startswith("chan-"):
        if not a.agent:
            raise Refused("approving a chat needs --agent GROUP to connect it to")
        option = f"connect:{store.find_agent_group(a.agent)['id']}"
    else:
        option = "approve"
    _decide(store, settings, a.id, option)


@op("approvals", "reject", read=False, never=NO_AGENT, args=DECIDE_ARGS)
def approvals_reject(a, store, settings) -> None:
    _decide(store, settings, a.id, "deny" if a.id.startswith("snd-") else "reject")


def _decide(store, settings, card_id: str, option: str) -> None:
    def replay(row: dict[str, Any]) -> object:
        """The terminal has no router: one like the router worker's, which knows the
        threaded channels, replays an approved message (lazy: `nanoclaw` starts fast)."""
        from nanoclaw.channels import load_builtin
        from nanoclaw.routing.router import Router

        return Router(store, settings, load_builtin().threaded()).replay(row)

    try:
        print(cards.decide(store, settings, card_id, option, local_user_id(), replay))
    except NotFound:
        raise NotFound(f"unknown or closed approval {card_id!r}") from None


# ---- tasks --------------------------------------------------------------------------------
verb("tasks", "scheduled tasks")


@op("tasks", "list", read=True, agent=True)
def tasks_list(a, store, settings) -> None:
    found = []
    for s, p in _sessions(store, settings):
        try:
            for t in scheduling.list_tasks(p):
                c = json.loads(t["content"])
                found.append({"task": t["series_id"], "status": t["status"],
                              "next_run": t["process_after"], "recurrence": t["recurrence"],
                              "session": s["id"], "prompt": (c.get("prompt") or "")[:40]})
        except (scheduling.TaskError, sqlite3.DatabaseError):
            continue
    table(found, ["task", "status", "next_run", "recurrence", "session", "prompt"])


@op("tasks", "pause", read=False, agent=True, args=[arg("id")])
def tasks_pause(a, store, settings) -> None:
    _change(store, settings, a.id, "pause", scheduling.pause)


@op("tasks", "resume", read=False, agent=True, args=[arg("id")])
def tasks_resume(a, store, settings) -> None:
    _change(store, settings, a.id, "resume", scheduling.resume)


@op("tasks", "cancel", read=False, agent=True, args=[arg("id")])
def tasks_cancel(a, store, settings) -> None:
    _change(store, settings, a.id, "cancel", scheduling.cancel)


def _change(store, settings, task_id: str, what: str, fn) -> None:
    """Pause, resume or cancel the task in whichever live session has it."""
    found = []
    for s, p in _sessions(store, settings):
        try:
            fn(p, task_id)
            found.append(s["id"])
        except (scheduling.TaskError, sqlite3.DatabaseError):
            continue
    if not found:
        raise NotFound(f"no live task {task_id!r}")
    print(f"{what} {task_id}")


def _sessions(store, settings) -> list[tuple[dict[str, Any], sessiondb.SessionPaths]]:
    return [(s, sessiondb.of(settings, s)) for s in store.active_sessions()]
