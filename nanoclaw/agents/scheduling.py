"""Scheduled tasks (reference §11): a task is a `messages_in` row of kind `task` whose
`process_after` is the next run and `recurrence` a cron expression (croniter), read in
the user's timezone. The series id ties the occurrences together; actions address a
task by id or series and reach its live (pending or paused) occurrence.

After an occurrence completes, `recur` inserts the next one computed from *now* (so
missed runs are not replayed) and clears the old row's recurrence, both in one
transaction: a crash in between cannot fire an occurrence twice.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter

from nanoclaw.db import session as sessiondb
from nanoclaw.util import iso, new_id, utcnow


class TaskError(ValueError):
    """A task request the agent must be told about (bad time, bad cron, no such task)."""


def parse_when(text: str, tz: str) -> str:
    """An ISO time → stored UTC text. A time without a zone means the user's zone."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise TaskError(f"processAfter {text!r} is not an ISO date-time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=ZoneInfo(tz))
    return iso(dt.timestamp())


def check_cron(expr: str) -> str:
    expr = (expr or "").strip()
    if not croniter.is_valid(expr):
        raise TaskError(f"recurrence {expr!r} is not a valid cron expression")
    return expr


def next_run(expr: str, tz: str, now: float) -> str:
    base = datetime.fromtimestamp(now, tz=ZoneInfo(tz))
    nxt = croniter(expr, base).get_next(datetime)
    return iso(nxt.astimezone(timezone.utc).timestamp())


def schedule(paths: sessiondb.SessionPaths, *, prompt: str, process_after: str | None,
             recurrence: str | None, script: str | None, tz: str, now: float,
             routing: tuple[str | None, str | None, str | None]) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise TaskError("a task needs a prompt")
    cron = check_cron(recurrence) if recurrence else None
    if process_after:
        when = parse_when(process_after, tz)
    elif cron:
        when = next_run(cron, tz, now)
    else:
        raise TaskError("a task needs processAfter or a recurrence")
    tid = new_id("task")
    ch, pid, thread = routing
    sessiondb.insert_message(paths, id=tid, kind="task",
                             content={"prompt": prompt, "script": script or None},
                             process_after=when, recurrence=cron, series_id=tid,
                             channel_type=ch, platform_id=pid, thread_id=thread)
    return tid


def _live(conn, task_id: str) -> list[Any]:
    return conn.execute(
        "SELECT * FROM messages_in WHERE kind='task' AND (id=? OR series_id=?)"
        " AND status IN ('pending','paused')", (task_id, task_id)).fetchall()


def _act(paths: sessiondb.SessionPaths, task_id: str, sql: str, args: tuple = ()) -> int:
    with sessiondb.transaction(paths.inbound) as conn:
        rows = _live(conn, task_id)
        for r in rows:
            conn.execute(sql, (*args, r["id"]))
    if not rows:
        raise TaskError(f"no live task {task_id!r}")
    return len(rows)


def cancel(paths: sessiondb.SessionPaths, task_id: str) -> int:
    return _act(paths, task_id,
                "UPDATE messages_in SET status='completed', recurrence=NULL WHERE id=?")


def pause(paths: sessiondb.SessionPaths, task_id: str) -> int:
    return _act(paths, task_id, "UPDATE messages_in SET status='paused' WHERE id=?"
                                " AND status='pending'")


def resume(paths: sessiondb.SessionPaths, task_id: str) -> int:
    return _act(paths, task_id, "UPDATE messages_in SET status='pending' WHERE id=?"
                                " AND status='paused'")


def update(paths: sessiondb.SessionPaths, task_id: str, *, tz: str, prompt: str | None = None,
           recurrence: str | None = None, process_after: str | None = None,
           script: str | None = None) -> int:
    """Merge prompt/script into the content; `''` clears script or recurrence."""
    cron = None if recurrence in (None, "") else check_cron(recurrence)
    when = parse_when(process_after, tz) if process_after else None
    with sessiondb.transaction(paths.inbound) as conn:
        rows = _live(conn, task_id)
        for r in rows:
            content = json.loads(r["content"])
            if prompt is not None:
                if not prompt.strip():
                    raise TaskError("prompt cannot be empty")
                content["prompt"] = prompt
            if script is not None:
                content["script"] = script or None
            conn.execute("UPDATE messages_in SET content=? WHERE id=?",
                         (json.dumps(content), r["id"]))
            if recurrence is not None:
                conn.execute("UPDATE messages_in SET recurrence=? WHERE id=?", (cron, r["id"]))
            if when:
                conn.execute("UPDATE messages_in SET process_after=? WHERE id=?", (when, r["id"]))
    if not rows:
        raise TaskError(f"no live task {task_id!r}")
    return len(rows)


def list_tasks(paths: sessiondb.SessionPaths, status: str | None = None) -> list[dict[str, Any]]:
    """One row per series: its newest occurrence."""
    with sessiondb.opened(paths.inbound, readonly=True) as conn:
        rows = conn.execute(
            "SELECT * FROM messages_in WHERE kind='task' ORDER BY seq").fetchall()
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        latest[r["series_id"] or r["id"]] = dict(r)
    out = list(latest.values())
    if status:
        out = [r for r in out if r["status"] == status]
    return out


def recur(paths: sessiondb.SessionPaths, tz: str, now: float) -> list[str]:
    """Clone each completed row that still has a cron into its next occurrence."""
    made: list[str] = []
    with sessiondb.opened(paths.inbound, readonly=True) as conn:  # cheap check first
        if not conn.execute("SELECT 1 FROM messages_in WHERE status IN ('completed','failed')"
                            " AND recurrence IS NOT NULL LIMIT 1").fetchone():
            return made
    with sessiondb.transaction(paths.inbound) as conn:
        done = conn.execute("SELECT * FROM messages_in WHERE status IN ('completed','failed')"
                            " AND recurrence IS NOT NULL").fetchall()
        for r in done:
            nid = new_id("task")
            top = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_in").fetchone()[0]
            top = max(top, sessiondb.max_out_seq(paths))
            seq = top + 2 if top % 2 == 0 else top + 1
            conn.execute(
                "INSERT INTO messages_in (id, seq, kind, timestamp, status, process_after,"
                " recurrence, series_id, tries, trigger, platform_id, channel_type, thread_id,"
                " content, source_session_id, on_wake) VALUES"
                " (?,?,?,?,'pending',?,?,?,0,1,?,?,?,?,?,0)",
                (nid, seq, r["kind"], utcnow(), next_run(r["recurrence"], tz, now),
                 r["recurrence"], r["series_id"] or r["id"], r["platform_id"],
                 r["channel_type"], r["thread_id"], r["content"], r["source_session_id"]))
            conn.execute("UPDATE messages_in SET recurrence=NULL WHERE id=?", (r["id"],))
            made.append(nid)
    return made
