"""Scheduling tools: schedule_task, list_tasks, update_task, cancel/pause/resume_task.

Only the host writes task rows (reference §11), so changes are system actions; reading
is direct, since tasks are `messages_in` rows of kind `task` (one series per task, the
newest occurrence standing for it). Times and cron expressions are checked here so the
agent hears about a typo at once, and a time without a zone is read in the user's
timezone and sent on as unambiguous UTC.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from agent_runner.db import InboundRow, iso
from agent_runner.formatter import zone
from agent_runner.tools.base import Tool, ToolContext, ToolError, obj, string

CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,\-?LW#]+\Z")
CRON_LIMITS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
LIVE = ("pending", "paused")
STATUSES = ["pending", "paused", "completed", "failed"]


def parse_when(text: str, tz: str) -> str:
    """An ISO date-time → UTC ISO with Z; a time without a zone is in the user's zone."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ToolError(f"processAfter {text!r} is not an ISO date-time like "
                        "2025-06-01T09:00 (your timezone) or 2025-06-01T07:00Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=zone(tz))
    return iso(dt.timestamp())


def check_cron(expr: str) -> str:
    expr = " ".join(expr.split())
    if expr in CRON_MACROS:
        return expr
    fields = expr.split(" ")
    bad = f"recurrence {expr!r} is not a cron expression (5 fields: minute hour day month " \
          "weekday, e.g. '0 9 * * 1-5')"
    if len(fields) != 5 or not all(CRON_FIELD.match(f) for f in fields):
        raise ToolError(bad)
    for f, (lo, hi) in zip(fields, CRON_LIMITS):
        for n in re.findall(r"(?<![/\d])\d+", f):
            if not lo <= int(n) <= hi:
                raise ToolError(f"{bad}: {n} is out of range {lo}-{hi}")
    return expr


def _series(ctx: ToolContext) -> list[InboundRow]:
    latest: dict[str, InboundRow] = {}
    for row in ctx.inbound.tasks():
        latest[row.series_id or row.id] = row
    return list(latest.values())


def _live(ctx: ToolContext, task_id: str) -> list[InboundRow]:
    rows = [r for r in ctx.inbound.tasks()
            if task_id in (r.id, r.series_id) and r.status in LIVE]
    if not rows:
        raise ToolError(f"there is no active task {task_id!r} (list_tasks shows your tasks)")
    return rows


def _schedule_task(ctx: ToolContext, args: dict[str, Any]) -> str:
    when = parse_when(args["processAfter"], ctx.config.tz)
    cron = check_cron(args["recurrence"]) if args.get("recurrence") else None
    rid = ctx.system_action("schedule_task", {
        "prompt": args["prompt"], "processAfter": when, "recurrence": cron,
        "script": args.get("script") or None})
    return (f"Task requested (request {rid}): first run {ctx.local_time(when)}"
            + (f", then on cron '{cron}'" if cron else "")
            + ". The host creates it; list_tasks will show its id.")


def _list_tasks(ctx: ToolContext, args: dict[str, Any]) -> str:
    rows = _series(ctx)
    if args.get("status"):
        rows = [r for r in rows if r.status == args["status"]]
    if not rows:
        return "No tasks."
    lines = []
    for r in rows:
        prompt = str(r.content.get("prompt") or "").replace("\n", " ")
        lines.append(
            f"- {r.series_id or r.id}: {r.status}; next run {ctx.local_time(r.process_after)}"
            + (f"; repeats '{r.recurrence}'" if r.recurrence else "")
            + ("; has a script" if r.content.get("script") else "")
            + f"\n  {prompt[:200]}{'…' if len(prompt) > 200 else ''}")
    return "\n".join(lines)


def _update_task(ctx: ToolContext, args: dict[str, Any]) -> str:
    fields = ("prompt", "recurrence", "processAfter", "script")
    if all(args.get(f) is None for f in fields):
        raise ToolError("nothing to change: give prompt, recurrence, processAfter or script")
    if args.get("prompt") is not None and not args["prompt"].strip():
        raise ToolError("`prompt` cannot be empty")
    _live(ctx, args["taskId"])
    params: dict[str, Any] = {"taskId": args["taskId"], "prompt": args.get("prompt")}
    if args.get("processAfter") is not None:
        if not args["processAfter"].strip():
            raise ToolError("`processAfter` cannot be cleared; give a new time")
        params["processAfter"] = parse_when(args["processAfter"], ctx.config.tz)
    if args.get("recurrence") is not None:  # '' clears: the task runs once more
        params["recurrence"] = check_cron(args["recurrence"]) if args["recurrence"] else ""
    if args.get("script") is not None:
        params["script"] = args["script"]
    rid = ctx.system_action("update_task", params)
    return f"Update of task {args['taskId']} requested (request {rid})."


def _status_action(action: str, need: str | None, verb: str):
    def run(ctx: ToolContext, args: dict[str, Any]) -> str:
        rows = _live(ctx, args["taskId"])
        if need and not any(r.status == need for r in rows):
            raise ToolError(f"task {args['taskId']} is {rows[-1].status}, not {need}")
        rid = ctx.system_action(action, {"taskId": args["taskId"]})
        return f"Task {args['taskId']} {verb} (request {rid})."
    return run


TASK_ID = string("the task's id (from list_tasks)", minLength=1)
TOOLS = [
    Tool("schedule_task", "Schedule a task: at `processAfter` (and then on the cron"
         " `recurrence`, if given) you are woken with `prompt` as instructions. A `script`"
         " (bash) runs first; its last output line must be JSON {\"wakeAgent\": bool,"
         " \"data\": …} and you are only woken when wakeAgent is true.",
         obj({"prompt": string("what to do when it runs", minLength=1),
              "processAfter": string("first run, ISO date-time; without a zone it is the"
                                     " user's timezone", minLength=1),
              "recurrence": string("cron expression in the user's timezone, e.g. '0 9 * * *'"),
              "script": string("optional bash run before waking you")},
             ("prompt", "processAfter")), _schedule_task),
    Tool("list_tasks", "List scheduled tasks, one line per task (its newest run).",
         obj({"status": {"type": "string", "enum": STATUSES}}), _list_tasks),
    Tool("update_task", "Change a task; an empty string clears recurrence or script.",
         obj({"taskId": TASK_ID, "prompt": string(), "recurrence": string(),
              "processAfter": string(), "script": string()}, ("taskId",)), _update_task),
    Tool("cancel_task", "Cancel a task for good.", obj({"taskId": TASK_ID}, ("taskId",)),
         _status_action("cancel_task", None, "cancellation requested")),
    Tool("pause_task", "Pause a task until resumed.", obj({"taskId": TASK_ID}, ("taskId",)),
         _status_action("pause_task", "pending", "pause requested")),
    Tool("resume_task", "Resume a paused task.", obj({"taskId": TASK_ID}, ("taskId",)),
         _status_action("resume_task", "paused", "resume requested")),
]
