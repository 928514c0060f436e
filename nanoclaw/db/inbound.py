"""A session's `inbound.db`, the host's side: what the host asks of the agent
(`messages_in`), where replies go (`session_routing`, `destinations`) and what became of
the agent's output (`delivered`). The agent reads it read-only; only the host writes it.

One class, intent-named methods, `BEGIN IMMEDIATE` around every write: modelled on the
runner's own container/agent_runner/db.py. A connection per operation, except in the
router and delivery, which keep theirs (`sessionfile.opened`: the same file only; no
lock or snapshot is held between transactions). The file carries a migration ledger
(`session_migrations.py`) brought up to date the first time a process opens it.

Seq numbers share one space the agent sees: the host takes even numbers above the
highest seq in *both* files (the original looked only at its own table), the agent odd.
The agent's `outbound.db` is only ever read here through `SessionOutbound`.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import contextmanager
from typing import Any, Iterator

from nanoclaw import nudge
from nanoclaw.db.central import migrate
from nanoclaw.db.outbound import HostileDB, SessionOutbound
from nanoclaw.db.session_migrations import INBOUND_MIGRATIONS
from nanoclaw.db.sessionfile import SessionPaths, file_signal, opened, transaction
from nanoclaw.db.tasks import InboundTasks
from nanoclaw.util import iso, new_id, utcnow

MAX_TRIES = 5
RETRY_BASE_SECONDS = 5.0
LEDGER = "session_migrations"
_CURRENT: set[tuple[str, int, int]] = set()  # (path, device, inode) this process migrated


def migrate_inbound(conn: sqlite3.Connection) -> list[str]:
    """Apply the session ledger to an open inbound.db; the names applied now."""
    return migrate(conn, INBOUND_MIGRATIONS, LEDGER)


class SessionInbound(InboundTasks):
    """`inbound.db`, read and written by the host."""

    def __init__(self, paths: SessionPaths) -> None:
        self.paths = paths
        self.path = paths.inbound

    # ---- opening ------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Bring the file up to the current migration; the names applied now."""
        with opened(self.path) as conn:
            return migrate_inbound(conn)

    def ensure_current(self) -> None:
        """Migrate once per process and file (a file replaced is a new inode): the
        first open of a file in a process brings it up to date."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return
        key = (self.path, st.st_dev, st.st_ino)
        if key not in _CURRENT:
            self.migrate()
            _CURRENT.add(key)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        self.ensure_current()
        with opened(self.path, readonly=True) as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self.ensure_current()
        with transaction(self.path) as conn:
            yield conn

    def _out_max(self) -> int:
        return SessionOutbound(self.paths).max_seq()

    @staticmethod
    def _next_seq(conn: sqlite3.Connection, out_max: int) -> int:
        """The next even seq above both files' (inside the write transaction)."""
        in_max = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_in").fetchone()[0]
        top = max(in_max, out_max)
        return top + 2 if top % 2 == 0 else top + 1

    def change_signal(self) -> tuple[int, int, int] | None:
        return file_signal(self.path)

    # ---- messages to the agent ----------------------------------------------------------
    def insert(self, *, id: str, kind: str, content: dict[str, Any], trigger: bool = True,
               platform_id: str | None = None, channel_type: str | None = None,
               thread_id: str | None = None, process_after: str | None = None,
               recurrence: str | None = None, series_id: str | None = None,
               source_session_id: str | None = None, on_wake: bool = False) -> bool:
        """Insert one `messages_in` row; False when a row with this id exists.

        The id is the idempotency key: routing the same platform event twice is harmless.
        A running agent is nudged once the row is committed."""
        out_max = self._out_max()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM messages_in WHERE id=?", (id,)).fetchone():
                return False
            conn.execute(
                "INSERT INTO messages_in (id, seq, kind, timestamp, status, process_after,"
                " recurrence, series_id, tries, trigger, platform_id, channel_type, thread_id,"
                " content, source_session_id, on_wake)"
                " VALUES (?,?,?,?,'pending',?,?,?,0,?,?,?,?,?,?,?)",
                (id, self._next_seq(conn, out_max), kind, utcnow(), process_after, recurrence,
                 series_id or id, 1 if trigger else 0, platform_id, channel_type, thread_id,
                 json.dumps(content), source_session_id, 1 if on_wake else 0))
        nudge.agent(self.paths.root)
        return True

    def note(self, text: str, *, on_wake: bool = False) -> str:
        """A host note to the agent: a chat row from `system` on the `agent` channel (it
        wakes the agent; the runner never answers it back). `on_wake`: only a fresh
        agent's first poll reads it. Ids start with `note-`, which delivery uses to avoid
        a note about a refused answer to a note."""
        nid = new_id("note")
        self.insert(id=nid, kind="chat", channel_type="agent", platform_id="system",
                    on_wake=on_wake, content={"sender": "system", "senderId": None,
                                              "text": text, "attachments": []})
        return nid

    def message(self, id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM messages_in WHERE id=?", (id,)).fetchone()
        return dict(row) if row else None

    def last_source_session(self, peer: str) -> str | None:
        """The session the newest message from agent group `peer` came from."""
        with self._read() as conn:
            row = conn.execute("SELECT source_session_id FROM messages_in WHERE"
                               " channel_type='agent' AND platform_id=? AND source_session_id"
                               " IS NOT NULL ORDER BY seq DESC LIMIT 1", (peer,)).fetchone()
        return row[0] if row else None

    def due_count(self, now_iso: str) -> int:
        """Pending rows that should wake an agent now (trigger=1, due)."""
        with self._read() as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM messages_in WHERE status='pending' AND trigger=1"
                " AND (process_after IS NULL OR process_after <= ?)", (now_iso,)).fetchone()[0]

    def next_due(self) -> str | None:
        """The earliest process_after among pending trigger rows (None if none is scheduled)."""
        with self._read() as conn:
            return conn.execute(
                "SELECT MIN(process_after) FROM messages_in WHERE status='pending' AND trigger=1"
                " AND process_after IS NOT NULL").fetchone()[0]

    def fail_due(self, now_iso: str) -> list[str]:
        """Mark every pending trigger row due by `now_iso` failed; returns their ids (a
        session whose agent was stopped for good: its claims can no longer be trusted)."""
        cond = "status='pending' AND trigger=1 AND (process_after IS NULL OR process_after <= ?)"
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(f"SELECT id FROM messages_in WHERE {cond}",
                                              (now_iso,))]
            conn.execute(f"UPDATE messages_in SET status='failed' WHERE {cond}", (now_iso,))
        return ids

    def fail_pending_triggers(self) -> list[str]:
        """Mark every pending trigger row failed, due or not; returns their ids (an agent
        that will not start: each message it would have answered gets a failure reply)."""
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM messages_in WHERE status='pending' AND trigger=1")]
            conn.execute("UPDATE messages_in SET status='failed' WHERE status='pending'"
                         " AND trigger=1")
        return ids

    # ---- where replies go -----------------------------------------------------------------
    def routing(self) -> tuple[str | None, str | None, str | None]:
        """The session's default reply address (channel type, platform id, thread)."""
        with self._read() as conn:
            r = conn.execute("SELECT channel_type, platform_id, thread_id FROM session_routing"
                             " WHERE id=1").fetchone()
        return (r[0], r[1], r[2]) if r else (None, None, None)

    def write_routing(self, routing: tuple[str | None, str | None, str | None],
                      destinations: list[dict[str, Any]]) -> None:
        """Rewrite the default reply address and the destination projection in one go."""
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO session_routing (id, channel_type, platform_id,"
                         " thread_id) VALUES (1, ?, ?, ?)", routing)
            conn.execute("DELETE FROM destinations")
            conn.executemany(
                "INSERT INTO destinations (name, display_name, type, channel_type, platform_id,"
                " agent_group_id) VALUES (:name, :display_name, :type, :channel_type,"
                " :platform_id, :agent_group_id)", destinations)

    # ---- what became of the agent's output ----------------------------------------------
    def delivered_ids(self) -> set[str]:
        with self._read() as conn:
            return {r[0] for r in conn.execute("SELECT message_out_id FROM delivered")}

    def delivered_among(self, ids: list[str]) -> set[str]:
        """Which of `ids` the host has recorded a result for."""
        if not ids:
            return set()
        with self._read() as conn:
            return {r[0] for r in conn.execute(
                "SELECT message_out_id FROM delivered WHERE message_out_id IN"
                f" ({','.join('?' * len(ids))})", ids)}

    def mark_delivered(self, message_out_id: str, platform_message_id: str | None,
                       status: str = "delivered", error: str | None = None) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO delivered (message_out_id, platform_message_id, status,"
                " error, delivered_at) VALUES (?,?,?,?,?)",
                (message_out_id, platform_message_id, status, error, utcnow()))

    # ---- the agent's claims ---------------------------------------------------------------
    def sync_acks(self) -> int:
        """Completed or failed acks mark their inbound rows completed. Returns rows changed
        (none from an outbound.db the host refuses: delivery quarantines that session)."""
        try:
            acks = SessionOutbound(self.paths).acks()
        except HostileDB:
            return 0
        finished = [mid for mid, (st, _) in acks.items() if st in ("completed", "failed")]
        if not finished:
            return 0
        with self._write() as conn:
            return sum(conn.execute("UPDATE messages_in SET status='completed' WHERE id=? AND"
                                    " status='pending'", (mid,)).rowcount for mid in finished)

    def reset_stuck(self, now: float, base: float = RETRY_BASE_SECONDS) -> list[tuple[str, str]]:
        """After an agent died: back off or fail the rows it had claimed.

        Returns (message_id, 'retry'|'failed') for each row touched. Each claim is handled
        once: it is recorded in `reset_claims` (the next runner deletes its stale claims;
        the host never writes `outbound.db`). A refused outbound.db counts as no claims."""
        try:
            acks = SessionOutbound(self.paths).acks()
        except HostileDB:
            acks = {}
        claimed = [(mid, t) for mid, (st, t) in acks.items() if st == "processing"]
        result: list[tuple[str, str]] = []
        if not claimed:
            return result
        now_iso = iso(now)
        with self._write() as conn:
            for mid, claimed_at in claimed:
                if conn.execute("INSERT OR IGNORE INTO reset_claims (message_id, claimed_at)"
                                " VALUES (?, ?)", (mid, str(claimed_at))).rowcount == 0:
                    continue  # handled by an earlier pass
                row = conn.execute("SELECT tries, process_after FROM messages_in WHERE id=?"
                                   " AND status='pending'", (mid,)).fetchone()
                if row is None or (row["process_after"] and row["process_after"] > now_iso):
                    continue
                tries = row["tries"] + 1
                if tries >= MAX_TRIES:
                    conn.execute("UPDATE messages_in SET status='failed', tries=? WHERE id=?",
                                 (tries, mid))
                    result.append((mid, "failed"))
                else:
                    conn.execute("UPDATE messages_in SET tries=?, process_after=? WHERE id=?",
                                 (tries, iso(now + base * 2**tries), mid))
                    result.append((mid, "retry"))
        return result
