"""The two databases of one session, as the host sees them.

`inbound.db` is written by the host and read by the agent; `outbound.db` is written by
the agent and read by the host. One writer per file across the container boundary, and
no WAL (its shared memory is not coherent across bind mounts). Connections are opened
per operation and closed again, so no stale snapshot survives.

A session folder `data/sessions/<agent group>/<session>/` is the host's (0700) and holds:

| entry | owner | inside a sandbox |
|---|---|---|
| `db/` | host, 0755 | `/workspace/.session`, read-only |
| `db/inbound.db` | host | read-only: the agent cannot change or replace it |
| `db/outbound.db`, `db/outbound.db-journal` | the agent | bound read-write one by one |
| `db/container.json` | host | the agent's settings for this spawn, read-only |
| `work/` | the agent | `/workspace`: its home, `inbox/`, `outbox/`, `.heartbeat` |

So the agent can write its own output but cannot replace, link or re-create any of the
files the host reads by name (the runner keeps `outbound.db`'s journal in PERSIST mode:
it never has to create or delete a file in `db/`). `work/` is hostile ground, touched
only through `nanoclaw/hostile.py`. `outbound.db`'s *content* is still the agent's, so
it is read defensively (`agent_db`): its schema must be exactly ours (no views,
triggers or virtual tables), `trusted_schema` is off and every read has a time bound.

Seq numbers share one space the agent sees: the host takes even numbers above the
highest seq in *both* files (the original looked only at its own table), the agent odd.
The host never writes `outbound.db`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from nanoclaw import hostile, nudge
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
CREATE TABLE IF NOT EXISTS reset_claims (
  message_id TEXT NOT NULL,
  claimed_at TEXT NOT NULL,
  PRIMARY KEY (message_id, claimed_at)
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


HEARTBEAT = ".heartbeat"  # in work/: the agent touches it while it lives
INBOX = "inbox"          # in work/: files for the agent, by message
OUTBOX = "outbox"        # in work/: files the agent sends, by message id
MAX_OUTBOUND = 1 << 30   # an outbound.db larger than this is refused unread
READ_BOUND_S = 1.0       # CPU seconds: one read of outbound.db costing more is the agent's
                         # doing (CPU, not wall time: a busy machine must not look hostile)
MAX_CONTENT = 1 << 20    # a messages_out row's content larger than this is not loaded


class HostileDB(Exception):
    """The agent's `outbound.db` is not one the host will read: wrong schema, too big,
    too slow, or not a database. The session is quarantined (delivery.py). `kind` is a
    fixed phrase for the user (the message may quote names the agent chose)."""

    def __init__(self, message: str, kind: str = "it is not a database the host can read"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class SessionPaths:
    root: str

    @property
    def db(self) -> str:
        return os.path.join(self.root, "db")

    @property
    def work(self) -> str:
        return os.path.join(self.root, "work")

    @property
    def inbound(self) -> str:
        return os.path.join(self.root, "db", "inbound.db")

    @property
    def outbound(self) -> str:
        return os.path.join(self.root, "db", "outbound.db")

    @property
    def config(self) -> str:
        return os.path.join(self.root, "db", "container.json")

    def work_folder(self) -> hostile.Folder:
        """The agent's side of the session, opened as hostile ground."""
        return hostile.Folder.open(self.work)


def of(settings: Any, session: dict[str, Any]) -> SessionPaths:
    """The folder of a `sessions` row: data/sessions/<agent group>/<session>/."""
    return SessionPaths(str(settings.session_dir(session["agent_group_id"], session["id"])))


def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True,
                               isolation_level=None, timeout=5.0)
    else:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA mmap_size=0")
    conn.row_factory = sqlite3.Row
    return conn


@contextmanager
def opened(path: str, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection to a host-written session DB (read-only if asked), closed on leaving.
    Only a regular file is opened (in the process runtime the agent could put a link or
    a FIFO there; sandboxes cannot reach `db/` at all)."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise sqlite3.DatabaseError(f"{os.path.basename(path)} is not a regular file")
    except FileNotFoundError:
        pass
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


def _expected_schema() -> set[tuple[str, str, str, str | None]]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(OUTBOUND_DDL)
        return set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        conn.close()


OUTBOUND_SCHEMA = _expected_schema()


@contextmanager
def agent_db(paths: SessionPaths) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection to the agent's `outbound.db` that cannot hurt the host:
    a regular file of bounded size, exactly our schema (so no view, trigger, virtual
    table or odd column default runs), `trusted_schema=OFF`, and a progress handler
    that interrupts any read costing more than READ_BOUND_S of CPU. None when the file is
    missing. Raises HostileDB when the file is refused; "database is locked" passes
    through (the agent is mid-write: try again)."""
    try:
        st = os.stat(paths.outbound, follow_symlinks=False)
    except FileNotFoundError:
        yield None
        return
    if not stat.S_ISREG(st.st_mode):
        raise HostileDB("outbound.db is not a regular file")
    if st.st_size > MAX_OUTBOUND:
        raise HostileDB(f"outbound.db is larger than {MAX_OUTBOUND >> 20} MiB",
                        "its database grew too large")
    conn = sqlite3.connect(f"file:{urllib.parse.quote(paths.outbound)}?mode=ro", uri=True,
                           isolation_level=None, timeout=0.5)
    deadline = time.thread_time() + READ_BOUND_S
    conn.set_progress_handler(lambda: 1 if time.thread_time() > deadline else 0, 1000)
    try:
        try:
            conn.execute("PRAGMA trusted_schema=OFF")
            conn.execute("PRAGMA mmap_size=0")
            have = set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
        except sqlite3.OperationalError as e:
            if "locked" in str(e):
                raise
            raise HostileDB(f"outbound.db unreadable: {e}") from None
        except sqlite3.DatabaseError as e:
            raise HostileDB(f"outbound.db unreadable: {e}") from None
        if have != OUTBOUND_SCHEMA:
            odd = sorted(f"{t} {str(n)[:40]!r}" for t, n, _, _ in have - OUTBOUND_SCHEMA)
            missing = sorted(f"{t} {n}" for t, n, _, _ in OUTBOUND_SCHEMA - have)
            raise HostileDB("outbound.db schema is not the runner's ("
                            + "; ".join(filter(None, [
                                odd and "unexpected: " + ", ".join(odd[:5]),
                                missing and "changed or missing: " + ", ".join(missing[:5])]))
                            + ")", "its database schema was changed")
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        except sqlite3.OperationalError as e:
            if "interrupted" in str(e):
                raise HostileDB(f"a read of outbound.db took over {READ_BOUND_S}s of CPU",
                                "reading its database took too long") from None
            if "locked" in str(e):
                raise
            raise HostileDB(f"outbound.db unreadable: {e}") from None
        except sqlite3.DatabaseError as e:
            raise HostileDB(f"outbound.db unreadable: {e}") from None
    finally:
        conn.close()


def create(root: str, owner: tuple[int, int] | None = None) -> SessionPaths:
    """Create (or complete) a session folder: the host's `db/` with both databases and
    the agent's `work/` with `inbox/` and `outbox/`, handed to `owner` (the sandbox
    user, when the host is root). Idempotent; a folder of the older flat layout is
    moved into this one."""
    paths = SessionPaths(root)
    flat = _set_flat_aside(paths)
    if flat is None and os.path.isdir(paths.root.rstrip("/") + ".flat"):
        flat = paths.root.rstrip("/") + ".flat"  # a move cut short (kill -9): finish it
    os.makedirs(paths.root, mode=0o700, exist_ok=True)
    os.chmod(paths.root, 0o700)
    os.makedirs(paths.db, mode=0o755, exist_ok=True)
    os.chmod(paths.db, 0o755)  # the sandbox user reads it (inside, read-only)
    with hostile.Folder.open(paths.work, create=True, owner=owner) as work:
        if flat:
            _move_flat(flat, paths, work)
            if owner is not None:  # what the old layout held keeps its old owner
                work.adopt(*owner)
        for name in (INBOX, OUTBOX):  # a link or FIFO the agent left there is replaced
            work.ensure_mount_point(name, True, owner)
    _create_db(paths.inbound, INBOUND_DDL, None)
    _create_db(paths.outbound, OUTBOUND_DDL, owner)
    journal = paths.outbound + "-journal"  # PERSIST mode: the agent never creates it
    if not os.path.lexists(journal):
        fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.fchmod(fd, 0o644)
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)
    return paths


def reset_outbound(paths: SessionPaths,
                   owner: tuple[int, int] | None) -> str | None:
    """Before an agent starts: an outbound.db the host refuses is renamed aside (kept
    for a look, never read again) and a fresh one made. Returns why, or None."""
    try:
        with agent_db(paths) as conn:
            if conn is not None:
                conn.execute("SELECT COUNT(*) FROM processing_ack").fetchone()
        return None
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            return None
        why = str(e)
    except HostileDB as e:
        why = str(e)
    aside = f"{paths.outbound}.refused-{int(time.time() * 1000)}"
    os.rename(paths.outbound, aside)
    try:
        os.unlink(paths.outbound + "-journal")
    except FileNotFoundError:
        pass
    create(paths.root, owner)
    return why


def _create_db(path: str, ddl: str, owner: tuple[int, int] | None) -> None:
    if os.path.exists(path):
        if owner is None and path.endswith("inbound.db"):  # ours: bring its tables up to date
            with opened(path) as conn:
                conn.executescript(ddl)
        return
    tmp = path + ".new"  # readers never see a file without its tables
    if os.path.lexists(tmp):
        os.unlink(tmp)
    with opened(tmp) as conn:
        conn.executescript(ddl)
    os.chmod(tmp, 0o644)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def _set_flat_aside(paths: SessionPaths) -> str | None:
    """A session folder of the older layout (databases beside the agent's files, the
    whole folder the agent's) is renamed aside to be taken apart; its parent is ours, so
    the rename cannot be misdirected."""
    try:
        st = os.stat(os.path.join(paths.root, "inbound.db"), follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode) or os.path.isdir(paths.db) and not os.path.islink(paths.db):
        return None
    aside = paths.root.rstrip("/") + ".flat"
    os.rename(paths.root, aside)
    return aside


def _move_flat(aside: str, paths: SessionPaths, work: hostile.Folder) -> None:
    """The old databases go to `db/` (regular files only), the rest into `work/`, all
    by descriptor; the host's bookkeeping files of that layout are dropped."""
    with hostile.Folder.open(aside) as old, hostile.Folder.open(paths.db) as db:
        for name in old.listdir():
            st = old.stat(name)
            if name in ("inbound.db", "outbound.db") and st is not None \
                    and stat.S_ISREG(st.st_mode) and db.stat(name) is None:
                old.move_into(name, db)
            elif name in ("inbound.db", "outbound.db", "inbound.db-journal",
                          "outbound.db-journal", "container.json", "container.json.tmp"):
                old.remove(name)
            else:
                work.remove(name)
                old.move_into(name, work)
    os.rmdir(aside)
    if os.path.isfile(paths.inbound):
        os.chown(paths.inbound, os.geteuid(), os.getegid())
        os.chmod(paths.inbound, 0o644)


def max_out_seq(paths: SessionPaths) -> int:
    """Highest agent seq, or 0 when outbound.db is missing or refused: the host's own
    rows must never be blocked by the agent's file (parity alone keeps seqs unique)."""
    try:
        with agent_db(paths) as out:
            if out is None:
                return 0
            top = out.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_out").fetchone()[0]
            return top if isinstance(top, int) else 0
    except (HostileDB, sqlite3.DatabaseError):
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


OUT_COLUMNS = ("id, seq, in_reply_to, timestamp, deliver_after, recurrence, kind,"
               " platform_id, channel_type, thread_id")


def undelivered(paths: SessionPaths) -> list[dict[str, Any]]:
    """Agent output not yet recorded in `delivered`, oldest first (by seq). A row whose
    content is over MAX_CONTENT comes with content None (delivery refuses it) rather
    than loaded. Raises HostileDB for a file the host will not read."""
    with opened(paths.inbound, readonly=True) as inb:
        done = {r[0] for r in inb.execute("SELECT message_out_id FROM delivered")}
    with agent_db(paths) as out:
        if out is None:
            return []
        rows = out.execute(
            f"SELECT {OUT_COLUMNS}, CASE WHEN length(CAST(content AS BLOB)) <= ?"
            " THEN content END AS content FROM messages_out"
            " WHERE deliver_after IS NULL OR deliver_after <= ? ORDER BY seq",
            (MAX_CONTENT, utcnow()),
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
    with agent_db(paths) as out:
        if out is None:
            return {}
        return {r[0]: (r[1], r[2]) for r in out.execute(
            "SELECT message_id, status, status_changed FROM processing_ack")}


def sync_acks(paths: SessionPaths) -> int:
    """Completed or failed acks mark their inbound rows completed. Returns rows changed
    (none from an outbound.db the host refuses: delivery quarantines that session)."""
    try:
        finished = [mid for mid, (st, _) in acks(paths).items() if st in ("completed", "failed")]
    except HostileDB:
        return 0
    if not finished:
        return 0
    with transaction(paths.inbound) as conn:
        n = 0
        for mid in finished:
            n += conn.execute(
                "UPDATE messages_in SET status='completed' WHERE id=? AND status='pending'", (mid,)
            ).rowcount
        return n


def fail_due(paths: SessionPaths, now_iso: str) -> list[str]:
    """Mark every pending trigger row due by `now_iso` failed; returns their ids (a
    session whose agent was stopped for good: its claims can no longer be trusted)."""
    with transaction(paths.inbound) as conn:
        cond = ("status='pending' AND trigger=1 AND (process_after IS NULL OR"
                " process_after <= ?)")
        ids = [r[0] for r in conn.execute(f"SELECT id FROM messages_in WHERE {cond}", (now_iso,))]
        conn.execute(f"UPDATE messages_in SET status='failed' WHERE {cond}", (now_iso,))
    return ids


def fail_pending_triggers(paths: SessionPaths) -> list[str]:
    """Mark every pending trigger row failed, due or not; returns their ids (an agent
    that will not start: each message it would have answered gets a failure reply)."""
    with transaction(paths.inbound) as conn:
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM messages_in WHERE status='pending' AND trigger=1")]
        conn.execute("UPDATE messages_in SET status='failed' WHERE status='pending'"
                     " AND trigger=1")
    return ids


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
    """After an agent died: back off or fail the rows it had claimed.

    Returns (message_id, 'retry'|'failed') for each row touched. Each claim is handled
    once: it is recorded in `reset_claims` (the next runner deletes its stale claims;
    the host never writes `outbound.db`). A refused outbound.db counts as no claims.
    """
    from nanoclaw.util import iso

    try:
        claimed = [(mid, t) for mid, (st, t) in acks(paths).items() if st == "processing"]
    except HostileDB:
        claimed = []
    result: list[tuple[str, str]] = []
    if not claimed:
        return result
    now_iso = iso(now)
    with transaction(paths.inbound) as conn:
        for mid, claimed_at in claimed:
            if conn.execute("INSERT OR IGNORE INTO reset_claims (message_id, claimed_at)"
                            " VALUES (?, ?)", (mid, str(claimed_at))).rowcount == 0:
                continue  # handled by an earlier pass
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
    return result


def message(paths: SessionPaths, id: str) -> dict[str, Any] | None:
    with opened(paths.inbound, readonly=True) as conn:
        row = conn.execute("SELECT * FROM messages_in WHERE id=?", (id,)).fetchone()
        return dict(row) if row else None


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
