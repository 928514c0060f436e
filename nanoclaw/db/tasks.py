"""Scheduled tasks in a session's `inbound.db`: the statements behind
`nanoclaw.agents.scheduling` (which owns the rules: times, cron, validation). A task is
a `messages_in` row of kind `task`; its `series_id` ties the occurrences together, and
an action reaches the series' live (pending or paused) occurrence. A mixin of
`SessionInbound`, one transaction per method."""

from __future__ import annotations

import json
import sqlite3
from contextlib import AbstractContextManager
from typing import Any, Callable

from nanoclaw.util import new_id, utcnow

_LIVE = ("SELECT * FROM messages_in WHERE kind='task' AND (id=? OR series_id=?)"
         " AND status IN ('pending','paused')")
_SET_STATUS = {
    "cancel": "UPDATE messages_in SET status='completed', recurrence=NULL WHERE id=?",
    "pause": "UPDATE messages_in SET status='paused' WHERE id=? AND status='pending'",
    "resume": "UPDATE messages_in SET status='pending' WHERE id=? AND status='paused'",
}


class InboundTasks:
    # SessionInbound's: a read connection, a write transaction, the next host seq
    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _out_max(self) -> int:
        raise NotImplementedError

    @staticmethod
    def _next_seq(conn: sqlite3.Connection, out_max: int) -> int:
        raise NotImplementedError

    def task_action(self, task_id: str, action: str) -> int:
        """`cancel`, `pause` or `resume` the live occurrence of a task (by id or series);
        returns how many live occurrences there were (0: none, nothing written)."""
        sql = _SET_STATUS[action]
        with self._write() as conn:
            rows = conn.execute(_LIVE, (task_id, task_id)).fetchall()
            for r in rows:
                conn.execute(sql, (r["id"],))
        return len(rows)

    def update_task(self, task_id: str, *, prompt: str | None = None,
                    script: str | None = None, recurrence: Any = ...,
                    process_after: str | None = None) -> int:
        """Change a task's live occurrences: `prompt` and `script` are merged into the
        content (`script=''` clears it), `recurrence` replaces the cron (None clears it;
        left out, it is kept), `process_after` moves the next run. Returns how many live
        occurrences there were (0: none, nothing written)."""
        with self._write() as conn:
            rows = conn.execute(_LIVE, (task_id, task_id)).fetchall()
            for r in rows:
                content = json.loads(r["content"])
                if prompt is not None:
                    content["prompt"] = prompt
                if script is not None:
                    content["script"] = script or None
                conn.execute("UPDATE messages_in SET content=? WHERE id=?",
                             (json.dumps(content), r["id"]))
                if recurrence is not ...:
                    conn.execute("UPDATE messages_in SET recurrence=? WHERE id=?",
                                 (recurrence, r["id"]))
                if process_after:
                    conn.execute("UPDATE messages_in SET process_after=? WHERE id=?",
                                 (process_after, r["id"]))
        return len(rows)

    def tasks(self) -> list[dict[str, Any]]:
        """Every task occurrence, oldest first (by seq)."""
        with self._read() as conn:
            return [dict(r) for r in conn.execute(
                "SELECT * FROM messages_in WHERE kind='task' ORDER BY seq")]

    def recur(self, next_run: Callable[[str, str | None], str]) -> list[str]:
        """Clone each finished occurrence that still has a cron into its next one (due at
        `next_run(cron, its process_after)`) and clear the old one's cron, in one
        transaction: a crash in between cannot fire an occurrence twice. Returns the new
        ids."""
        made: list[str] = []
        with self._read() as conn:  # cheap check first
            if not conn.execute("SELECT 1 FROM messages_in WHERE status IN"
                                " ('completed','failed') AND recurrence IS NOT NULL"
                                " LIMIT 1").fetchone():
                return made
        out_max = self._out_max()
        with self._write() as conn:
            done = conn.execute("SELECT * FROM messages_in WHERE status IN"
                                " ('completed','failed') AND recurrence IS NOT NULL").fetchall()
            for r in done:
                nid = new_id("task")
                conn.execute(
                    "INSERT INTO messages_in (id, seq, kind, timestamp, status, process_after,"
                    " recurrence, series_id, tries, trigger, platform_id, channel_type,"
                    " thread_id, content, source_session_id, on_wake) VALUES"
                    " (?,?,?,?,'pending',?,?,?,0,1,?,?,?,?,?,0)",
                    (nid, self._next_seq(conn, out_max), r["kind"], utcnow(),
                     next_run(r["recurrence"], r["process_after"]), r["recurrence"],
                     r["series_id"] or r["id"],
                     r["platform_id"], r["channel_type"], r["thread_id"], r["content"],
                     r["source_session_id"]))
                conn.execute("UPDATE messages_in SET recurrence=NULL WHERE id=?", (r["id"],))
                made.append(nid)
        return made
