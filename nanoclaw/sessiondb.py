"""The two databases of one session, as the host sees them.

`inbound.db` is written by the host and read by the agent; `outbound.db` is written by
the agent and read by the host. One writer per file across the container boundary, and
`journal_mode=DELETE` because WAL's shared memory is not coherent across bind mounts.
Connections are opened per operation and closed again, so no stale snapshot survives.

Seq numbers share one space the agent sees: the host takes even numbers above the
highest seq in *both* files (the original looked only at its own table), the agent odd.

The exceptions to one-writer, both done only while no agent runs for the session or
for rows the agent has given up on: the host deletes stale `processing` acks after a
kill, and writes a permission-denied reply straight to `outbound.db`.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from nanoclaw import nudge
from nanoclaw.util import utcnow

INBOUND_DDL = """
CREATE TABLE IF NOT EXISTS messages_in (
  id TEXT PRIMARY KEY,
  seq INTEGER NOT NULL UNIQUE,
  kind TEXT NOT NULL,
  timestamp TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending',
  process_after TEXT,
  recurrence TEXT,
  series_id TEXT,
  tries INTEGER NOT NULL DEFAULT 0,
  trigger INTEGER NOT NULL DEFAULT 1,
  platform_id TEXT,
  channel_type TEXT,
  thread_id TEXT,
  content TEXT NOT NULL,
  source_session_id TEXT,
  on_wake INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_in_status ON messages_in(status, process_after);
CREATE TABLE IF NOT EXISTS delivered (
  message_out_id TEXT PRIMARY KEY,
  platform_message_id TEXT,
  status TEXT NOT NULL,
  error TEXT,
  delivered_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS destinations (
  name TEXT PRIMARY KEY,
  display_name TEXT,
  type TEXT NOT NULL,
  channel_type TEXT,
  platform_id TEXT,
  agent_group_id TEXT
);
CREATE TABLE IF NOT EXISTS session_routing (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  channel_type TEXT,
  platform_id TEXT,
  thread_id TEXT
);
"""

OUTBOUND_DDL = """
CREATE TABLE IF NOT EXISTS messages_out (
  id TEXT PRIMARY KEY,
  seq INTEGER NOT NULL UNIQUE,
  in_reply_to TEXT,
  timestamp TEXT NOT NULL,
  deliver_after TEXT,
  recurrence TEXT,
  kind TEXT NOT NULL,
  platform_id TEXT,
  channel_type TEXT,
  thread_id TEXT,
  content TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS processing_ack (
  message_id TEXT PRIMARY KEY,
  status TEXT NOT NULL,
  status_changed TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS session_state (
  key TEXT PRIMARY KEY,
  value TEXT,
  updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS container_state (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  current_tool TEXT,
  tool_declared_timeout_ms INTEGER,
  tool_started_at TEXT,
  updated_at TEXT
);
"""

MAX_TRIES = 5
RETRY_BASE_SECONDS = 5.0


@dataclass(frozen=True)
class SessionPaths:
    root: str

    @property
    def inbound(self) -> str:
        return os.path.join(self.root, "inbound.db")

    @property
    def outbound(self) -> str:
        return os.path.join(self.root, "outbound.db")

    @property
    def heartbeat(self) -> str:
        return os.path.join(self.root, ".heartbeat")

    @property
    def inbox(self) -> str:
        return os.path.join(self.root, "inbox")

    @property
    def outbox(self) -> str:
        return os.path.join(self.root, "outbox")


def of(settings: Any, session: dict[str, Any]) -> SessionPaths:
    """The folder of a `sessions` row: data/sessions/<agent group>/<session>/."""
    return SessionPaths(str(settings.session_dir(session["agent_group_id"], session["id"])))


def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5.0)
    else:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA mmap_size=0")
    conn.row_factory = sqlite3.Row
    return conn


@contextmanager
def opened(path: str, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection to a session DB (read-only if asked), closed on leaving."""
    conn = _connect(path, readonly)
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def transaction(path: str) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
    with opened(path) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def create(root: str) -> SessionPaths:
    """Create the session folder, both databases and the inbox/outbox folders."""
    paths = SessionPaths(root)
    os.makedirs(paths.inbox, exist_ok=True)
    os.makedirs(paths.outbox, exist_ok=True)
    for path, ddl in ((paths.inbound, INBOUND_DDL), (paths.outbound, OUTBOUND_DDL)):
        if os.path.exists(path):
            with opened(path) as conn:
                conn.executescript(ddl)
            continue
        tmp = path + ".new"  # readers never see a file without its tables
        with opened(tmp) as conn:
            conn.executescript(ddl)
        os.replace(tmp, path)
    return paths


def max_out_seq(paths: SessionPaths) -> int:
    """Highest agent seq, or 0 when outbound.db is missing or unreadable: the host's own
    rows must never be blocked by the agent's file (parity alone keeps seqs unique)."""
    if not os.path.exists(paths.outbound):
        return 0
    try:
        with opened(paths.outbound, readonly=True) as out:
            return out.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_out").fetchone()[0]
    except sqlite3.DatabaseError:
        return 0


def insert_message(
    paths: SessionPaths,
    *,
    id: str,
    kind: str,
    content: dict[str, Any],
    trigger: bool = True,
    platform_id: str | None = None,
    channel_type: str | None = None,
    thread_id: str | None = None,
    process_after: str | None = None,
    recurrence: str | None = None,
    series_id: str | None = None,
    source_session_id: str | None = None,
    on_wake: bool = False,
) -> bool:
    """Insert one `messages_in` row; returns False when a row with this id exists.

    The id is the idempotency key: routing the same platform event twice is harmless.
    A running agent is nudged once the row is committed.
    """
    out_max = max_out_seq(paths)
    with transaction(paths.inbound) as conn:
        if conn.execute("SELECT 1 FROM messages_in WHERE id=?", (id,)).fetchone():
            return False
        in_max = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_in").fetchone()[0]
        top = max(in_max, out_max)
        seq = top + 2 if top % 2 == 0 else top + 1
        conn.execute(
            "INSERT INTO messages_in (id, seq, kind, timestamp, status, process_after, recurrence,"
            " series_id, tries, trigger, platform_id, channel_type, thread_id, content,"
            " source_session_id, on_wake) VALUES (?,?,?,?,'pending',?,?,?,0,?,?,?,?,?,?,?)",
            (
                id, seq, kind, utcnow(), process_after, recurrence, series_id or id,
                1 if trigger else 0, platform_id, channel_type, thread_id,
                json.dumps(content), source_session_id, 1 if on_wake else 0,
            ),
        )
    nudge.agent(paths.root)
    return True


def insert_note(paths: SessionPaths, text: str, *, on_wake: bool = False) -> str:
    """A host note to the agent: a chat row from `system` on the `agent` channel (it
    wakes the agent; the runner never answers it back). `on_wake`: only a fresh agent's
    first poll reads it. Ids start with `note-`, which delivery uses to avoid a note
    about a refused answer to a note."""
    from nanoclaw.util import new_id

    nid = new_id("note")
    insert_message(paths, id=nid, kind="chat", channel_type="agent", platform_id="system",
                   on_wake=on_wake, content={"sender": "system", "senderId": None,
                                             "text": text, "attachments": []})
    return nid


def write_routing(
    paths: SessionPaths,
    routing: tuple[str | None, str | None, str | None],
    destinations: list[dict[str, Any]],
) -> None:
    """Rewrite the default reply address and the destination projection in one go."""
    with transaction(paths.inbound) as conn:
        conn.execute(
            "INSERT OR REPLACE INTO session_routing (id, channel_type, platform_id, thread_id)"
            " VALUES (1, ?, ?, ?)",
            routing,
        )
        conn.execute("DELETE FROM destinations")
        conn.executemany(
            "INSERT INTO destinations (name, display_name, type, channel_type, platform_id,"
            " agent_group_id) VALUES (:name, :display_name, :type, :channel_type,"
            " :platform_id, :agent_group_id)",
            destinations,
        )


def undelivered(paths: SessionPaths) -> list[dict[str, Any]]:
    """Agent output not yet recorded in `delivered`, oldest first (by seq)."""
    if not os.path.exists(paths.outbound):
        return []
    with opened(paths.inbound, readonly=True) as inb:
        done = {r[0] for r in inb.execute("SELECT message_out_id FROM delivered")}
    with opened(paths.outbound, readonly=True) as out:
        rows = out.execute(
            "SELECT * FROM messages_out WHERE deliver_after IS NULL OR deliver_after <= ?"
            " ORDER BY seq",
            (utcnow(),),
        ).fetchall()
    return [dict(r) for r in rows if r["id"] not in done]


def mark_delivered(
    paths: SessionPaths,
    message_out_id: str,
    platform_message_id: str | None,
    status: str = "delivered",
    error: str | None = None,
) -> None:
    with transaction(paths.inbound) as conn:
        conn.execute(
            "INSERT OR IGNORE INTO delivered (message_out_id, platform_message_id, status, error,"
            " delivered_at) VALUES (?,?,?,?,?)",
            (message_out_id, platform_message_id, status, error, utcnow()),
        )


def acks(paths: SessionPaths) -> dict[str, tuple[str, str]]:
    """message_id → (status, status_changed) from the agent's `processing_ack`."""
    if not os.path.exists(paths.outbound):
        return {}
    with opened(paths.outbound, readonly=True) as out:
        return {r[0]: (r[1], r[2]) for r in out.execute("SELECT * FROM processing_ack")}


def sync_acks(paths: SessionPaths) -> int:
    """Completed or failed acks mark their inbound rows completed. Returns rows changed."""
    finished = [mid for mid, (st, _) in acks(paths).items() if st in ("completed", "failed")]
    if not finished:
        return 0
    with transaction(paths.inbound) as conn:
        n = 0
        for mid in finished:
            n += conn.execute(
                "UPDATE messages_in SET status='completed' WHERE id=? AND status='pending'", (mid,)
            ).rowcount
        return n


def due_count(paths: SessionPaths, now_iso: str) -> int:
    """Pending rows that should wake an agent now (trigger=1, due)."""
    with opened(paths.inbound, readonly=True) as conn:
        return conn.execute(
            "SELECT COUNT(*) FROM messages_in WHERE status='pending' AND trigger=1"
            " AND (process_after IS NULL OR process_after <= ?)",
            (now_iso,),
        ).fetchone()[0]


def next_due(paths: SessionPaths) -> str | None:
    """The earliest process_after among pending trigger rows (None if none is scheduled)."""
    with opened(paths.inbound, readonly=True) as conn:
        return conn.execute(
            "SELECT MIN(process_after) FROM messages_in WHERE status='pending' AND trigger=1"
            " AND process_after IS NOT NULL"
        ).fetchone()[0]


def reset_stuck(paths: SessionPaths, now: float,
                base: float = RETRY_BASE_SECONDS) -> list[tuple[str, str]]:
    """After an agent died: back off or fail the rows it had claimed; drop its acks.

    Returns (message_id, 'retry'|'failed') for each row touched. Rows whose
    `process_after` is already in the future were handled by an earlier pass.
    """
    from nanoclaw.util import iso

    claimed = [mid for mid, (st, _) in acks(paths).items() if st == "processing"]
    result: list[tuple[str, str]] = []
    if claimed:
        now_iso = iso(now)
        with transaction(paths.inbound) as conn:
            for mid in claimed:
                row = conn.execute(
                    "SELECT tries, process_after FROM messages_in WHERE id=? AND status='pending'",
                    (mid,),
                ).fetchone()
                if row is None or (row["process_after"] and row["process_after"] > now_iso):
                    continue
                tries = row["tries"] + 1
                if tries >= MAX_TRIES:
                    conn.execute(
                        "UPDATE messages_in SET status='failed', tries=? WHERE id=?", (tries, mid)
                    )
                    result.append((mid, "failed"))
                else:
                    after = iso(now + base * 2**tries)
                    conn.execute(
                        "UPDATE messages_in SET tries=?, process_after=? WHERE id=?",
                        (tries, after, mid),
                    )
                    result.append((mid, "retry"))
        delete_processing_acks(paths)
    return result


def delete_processing_acks(paths: SessionPaths) -> None:
    """Host-side exception to one-writer: only while no agent runs for this session."""
    if not os.path.exists(paths.outbound):
        return
    with transaction(paths.outbound) as conn:
        conn.execute("DELETE FROM processing_ack WHERE status='processing'")


def message(paths: SessionPaths, id: str) -> dict[str, Any] | None:
    with opened(paths.inbound, readonly=True) as conn:
        row = conn.execute("SELECT * FROM messages_in WHERE id=?", (id,)).fetchone()
        return dict(row) if row else None


def write_outbound_direct(
    paths: SessionPaths, *, kind: str, content: dict[str, Any], in_reply_to: str | None,
    channel_type: str | None, platform_id: str | None, thread_id: str | None,
) -> str:
    """A host reply that needs no agent (e.g. a permission denial): an odd seq, written
    the way the agent writes, so delivery treats it like any other output."""
    from nanoclaw.util import new_id

    mid = new_id("host")
    with opened(paths.inbound, readonly=True) as inb:
        in_max = inb.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_in").fetchone()[0]
    with transaction(paths.outbound) as conn:
        out_max = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_out").fetchone()[0]
        top = max(in_max, out_max)
        seq = top + 1 if top % 2 == 0 else top + 2
        conn.execute(
            "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, platform_id,"
            " channel_type, thread_id, content) VALUES (?,?,?,?,?,?,?,?,?)",
            (mid, seq, in_reply_to, utcnow(), kind, platform_id, channel_type, thread_id,
             json.dumps(content)),
        )
    nudge.host(paths.root)
    return mid


def file_signal(path: str) -> tuple[int, int, int] | None:
    """A cheap 'did this file move?' signal: (mtime_ns, size, inode); None if missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def change_signal(paths: SessionPaths) -> tuple[int, int, int] | None:
    """Did the agent write outbound.db since we last looked?"""
    return file_signal(paths.outbound)
