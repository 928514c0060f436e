"""Scheduled tasks (reference §11): a task is a `messages_in` row of kind `task` whose
`process_after` is the next run and `recurrence` a cron expression (croniter), read in
the user's timezone. The series id ties the occurrences together; actions address a
task by id or series and reach its live (pending or paused) occurrence.

After an occurrence completes, `recur` inserts the next one computed from *now* (so
missed runs are not replayed; a clock stepped forward fires the late one once), or from
the occurrence itself when the clock reads earlier (stepped back: a slot never fires
twice), and clears the old row's recurrence, both in one transaction: a crash in
between cannot fire an occurrence twice.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter

from nanoclaw.db.session import SessionInbound, SessionPaths
from nanoclaw.errors import Refused
from nanoclaw.util import iso, new_id, parse_iso


class TaskError(Refused, ValueError):
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


def schedule(paths: SessionPaths, *, prompt: str, process_after: str | None,
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
    SessionInbound(paths).insert(id=tid, kind="task",
                                 content={"prompt": prompt, "script": script or None},
                                 process_after=when, recurrence=cron, series_id=tid,
                                 channel_type=ch, platform_id=pid, thread_id=thread)
    return tid


def _act(paths: SessionPaths, task_id: str, action: str) -> int:
    n = SessionInbound(paths).task_action(task_id, action)
    if not n:
        raise TaskError(f"no live task {task_id!r}")
    return n


def cancel(paths: SessionPaths, task_id: str) -> int:
    return _act(paths, task_id, "cancel")


def pause(paths: SessionPaths, task_id: str) -> int:
    return _act(paths, task_id, "pause")


def resume(paths: SessionPaths, task_id: str) -> int:
    return _act(paths, task_id, "resume")


def update(paths: SessionPaths, task_id: str, *, tz: str, prompt: str | None = None,
           recurrence: str | None = None, process_after: str | None = None,
           script: str | None = None) -> int:
    """Merge prompt/script into the content; `''` clears script or recurrence."""
    if prompt is not None and not prompt.strip():
        raise TaskError("prompt cannot be empty")
    cron = None if recurrence in (None, "") else check_cron(recurrence)
    when = parse_when(process_after, tz) if process_after else None
    n = SessionInbound(paths).update_task(
        task_id, prompt=prompt, script=script, process_after=when,
        **({} if recurrence is None else {"recurrence": cron}))
    if not n:
        raise TaskError(f"no live task {task_id!r}")
    return n


def list_tasks(paths: SessionPaths, status: str | None = None) -> list[dict[str, Any]]:
    """One row per series: its newest occurrence."""
    latest: dict[str, dict[str, Any]] = {}
    for r in SessionInbound(paths).tasks():
        latest[r["series_id"] or r["id"]] = r
    out = list(latest.values())
    if status:
        out = [r for r in out if r["status"] == status]
    return out


def recur(paths: SessionPaths, tz: str, now: float) -> list[str]:
    """Clone each completed row that still has a cron into its next occurrence: the first
    after now, and never at or before the occurrence that just ran. A clock stepped back
    (NTP) while it ran would otherwise make `now` earlier than that occurrence, and the
    same slot would fire again; a clock stepped forward skips the missed slots."""
    def after(cron: str, ran: str | None) -> str:
        try:
            return next_run(cron, tz, max(now, parse_iso(ran or "")))
        except ValueError:  # no time it ran at: from now
            return next_run(cron, tz, now)
    return SessionInbound(paths).recur(after)
