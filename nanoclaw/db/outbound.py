"""A session's `outbound.db`, as the host reads it: the agent's file, read as hostile.

The agent writes it and the host only ever reads it, through `agent_db`: a regular file
of bounded size whose schema is exactly `OUTBOUND_DDL` (so no view, trigger, virtual
table or odd column default runs), with `trusted_schema` off and every read bound in
CPU time. A file that fails raises `HostileDB` and its session is quarantined
(delivery); the containers worker sets it aside before the next start
(`session.reset_outbound`).

**Versions.** `outbound.db` has no migration ledger: a ledger in a file the agent
writes would be the agent's to forge, and the host never writes this file. Its version
*is* its schema. The host creates the file at the current `OUTBOUND_DDL` before an
agent first starts (`session.create`), and the exact-schema check refuses any other
shape, older or newer. So a change to `OUTBOUND_DDL` (which must ship with the runner
that writes it: container/agent_runner/db.py) reaches existing sessions like this: an
old file is refused when next read (its session quarantined once, its unsent rows not
delivered) and set aside at the next start, when a fresh file at the new schema is
made. Change it rarely, and say so in the release notes.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import tempfile
import time
import urllib.parse
from contextlib import contextmanager
from typing import Any, Iterator

from nanoclaw.db.sessionfile import Kept, SessionPaths, close_quietly, file_signal
from nanoclaw.util import utcnow

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

MAX_OUTBOUND = 1 << 30   # an outbound.db larger than this is refused unread
READ_BOUND_S = 1.0       # CPU seconds: one read of outbound.db costing more is the agent's
                         # doing (CPU, not wall time: a busy machine must not look hostile)
MAX_CONTENT = 1 << 20    # a messages_out row's content larger than this is not loaded
OUT_COLUMNS = ("id, seq, in_reply_to, timestamp, deliver_after, recurrence, kind,"
               " platform_id, channel_type, thread_id")


class HostileDB(Exception):
    """The agent's `outbound.db` is not one the host will read: wrong schema, too big,
    too slow, or not a database. The session is quarantined (delivery.py). `kind` is a
    fixed phrase for the user (the message may quote names the agent chose)."""

    def __init__(self, message: str, kind: str = "it is not a database the host can read"):
        super().__init__(message)
        self.kind = kind


def _expected_schema() -> set[tuple[str, str, str, str | None]]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(OUTBOUND_DDL)
        return set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        conn.close()


OUTBOUND_SCHEMA = _expected_schema()


_KEPT = Kept()  # the router's and delivery's open connections (sessionfile.keep_connections)


@contextmanager
def agent_db(paths: SessionPaths) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection to the agent's `outbound.db` that cannot hurt the host:
    a regular file of bounded size, exactly our schema (so no view, trigger, virtual
    table or odd column default runs), `trusted_schema=OFF`, and a progress handler
    that interrupts any read costing more than READ_BOUND_S of CPU. None when the file is
    missing. Raises HostileDB when the file is refused; "database is locked" passes
    through (the agent is mid-write: try again).

    The schema check and the caller's reads are one read transaction: the agent cannot
    commit in between (its write waits for our lock), so what was checked is what is
    read. Where connections are kept (`sessionfile.keep_connections`), one is used
    again only for the same regular file (inode) and while the file's schema cookie
    (`PRAGMA schema_version`, read inside that transaction) is the one it was checked
    at; any change, error or other file means a fresh open and a full check. A file
    whose schema changed while its cookie was set back is read with the checked schema:
    at worst rows that read as corrupt (HostileDB), never the agent's SQL."""
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
    conn, scratch, checked = _reuse(paths.outbound, st.st_ino)
    if conn is None:
        conn, scratch, checked = _checked(paths.outbound)
    try:
        conn.row_factory = sqlite3.Row
        try:
            yield conn
            conn.execute("COMMIT")  # ends the read: the agent may write again
        except sqlite3.OperationalError as e:
            if "interrupted" in str(e):
                raise HostileDB(f"a read of outbound.db took over {READ_BOUND_S}s of CPU",
                                "reading its database took too long") from None
            if "locked" in str(e):
                raise
            raise HostileDB(f"outbound.db unreadable: {e}") from None
        except sqlite3.DatabaseError as e:
            raise HostileDB(f"outbound.db unreadable: {e}") from None
    except BaseException:
        close_quietly(conn)
        _drop(scratch)
        raise
    if scratch is None:
        _KEPT.keep(paths.outbound, conn, st.st_ino, checked)
    else:  # a private copy: read once
        close_quietly(conn)
        _drop(scratch)


def _reuse(path: str, ino: int) -> tuple[Any, None, Any]:
    """A kept connection to this same file, its read transaction begun and its schema
    cookie unchanged; (None, None, None) when there is none or it may not be used."""
    kept = _KEPT.take(path, ino)
    if kept is None:
        return None, None, None
    conn, (cookie, clock) = kept
    clock[0] = time.thread_time() + READ_BOUND_S
    try:
        conn.execute("BEGIN")
        if conn.execute("PRAGMA schema_version").fetchone()[0] == cookie:
            return conn, None, (cookie, clock)
    except sqlite3.OperationalError as e:
        if "locked" in str(e):  # the agent is mid-write: the connection is still good
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            _KEPT.keep(path, conn, ino, (cookie, clock))
            raise
    except sqlite3.Error:
        pass
    close_quietly(conn)
    return None, None, None


def _checked(path: str) -> tuple[sqlite3.Connection, str | None, Any]:
    """A fresh connection, in a read transaction in which its schema was checked; the
    scratch folder of a rolled-back copy, if one was needed; (cookie, clock)."""
    scratch: str | None = None
    conn, clock = _open(f"file:{urllib.parse.quote(path)}?mode=ro")
    try:
        try:
            have, cookie = _schema(conn)
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorname", "") != "SQLITE_READONLY_ROLLBACK":
                raise
            # The agent was killed mid-write: its journal must be rolled back before the
            # file can be read, which a read-only open cannot do. Roll back a private
            # copy instead (the agent's own files stay as they are; its next start rolls
            # them back itself) and read that.
            conn.close()
            scratch = tempfile.mkdtemp(prefix="nanoclaw-outbound-")
            _copy_pair(path, scratch)
            conn, clock = _open(f"file:{urllib.parse.quote(os.path.join(scratch, 'outbound.db'))}"
                                "?mode=rw")
            have, cookie = _schema(conn)
        if have != OUTBOUND_SCHEMA:
            odd = sorted(f"{t} {str(n)[:40]!r}" for t, n, _, _ in have - OUTBOUND_SCHEMA)
            missing = sorted(f"{t} {n}" for t, n, _, _ in OUTBOUND_SCHEMA - have)
            raise HostileDB("outbound.db schema is not the runner's ("
                            + "; ".join(filter(None, [
                                odd and "unexpected: " + ", ".join(odd[:5]),
                                missing and "changed or missing: " + ", ".join(missing[:5])]))
                            + ")", "its database schema was changed")
    except sqlite3.OperationalError as e:
        close_quietly(conn)
        _drop(scratch)
        if "locked" in str(e):
            raise
        raise HostileDB(f"outbound.db unreadable: {e}") from None
    except sqlite3.DatabaseError as e:
        close_quietly(conn)
        _drop(scratch)
        raise HostileDB(f"outbound.db unreadable: {e}") from None
    except BaseException:
        close_quietly(conn)
        _drop(scratch)
        raise
    return conn, scratch, (cookie, clock)


def _schema(conn: sqlite3.Connection) -> tuple[set[Any], int]:
    """Begin the read transaction; the file's schema rows and its cookie, as of it."""
    conn.execute("BEGIN")
    have = set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    return have, conn.execute("PRAGMA schema_version").fetchone()[0]


def _open(uri: str) -> tuple[sqlite3.Connection, list[float]]:
    """A connection with the hostile-file settings: no trusted schema, no mmap, and a
    progress handler that interrupts any statement past READ_BOUND_S of CPU from when
    its use began (`clock[0]`, the deadline, is set again at each use)."""
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=0.5)
    clock = [time.thread_time() + READ_BOUND_S]
    conn.set_progress_handler(lambda: 1 if time.thread_time() > clock[0] else 0, 1000)
    conn.execute("PRAGMA trusted_schema=OFF")
    conn.execute("PRAGMA mmap_size=0")
    return conn, clock


def _copy_pair(path: str, into: str) -> None:
    """Copy the agent's database and its journal into a private folder: regular files
    only, never through a link, each at most MAX_OUTBOUND bytes (else HostileDB)."""
    for suffix in ("", "-journal"):
        try:
            fd = os.open(path + suffix, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise HostileDB(f"outbound.db{suffix} cannot be opened: {e.strerror}") from None
        with os.fdopen(fd, "rb") as src:
            st = os.fstat(src.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_OUTBOUND:
                raise HostileDB(f"outbound.db{suffix} is not a regular file of at most"
                                f" {MAX_OUTBOUND >> 20} MiB")
            data = src.read(MAX_OUTBOUND + 1)
        if len(data) > MAX_OUTBOUND:
            raise HostileDB(f"outbound.db{suffix} grew past {MAX_OUTBOUND >> 20} MiB")
        with open(os.path.join(into, "outbound.db" + suffix), "wb") as dst:
            dst.write(data)


def _drop(scratch: str | None) -> None:
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


class SessionOutbound:
    """`outbound.db`, read-only and defensively: what the agent wrote. Every read goes
    through `agent_db`; a missing file reads as empty. Methods raise HostileDB for a
    file the host refuses unless they say otherwise."""

    def __init__(self, paths: SessionPaths) -> None:
        self.paths = paths

    def change_signal(self) -> tuple[int, int, int] | None:
        """Did the agent write outbound.db since we last looked?"""
        return file_signal(self.paths.outbound)

    def refusal(self) -> str | None:
        """Why the host refuses this file, or None (fine, missing, or mid-write)."""
        try:
            with agent_db(self.paths) as conn:
                if conn is not None:
                    conn.execute("SELECT COUNT(*) FROM processing_ack").fetchone()
            return None
        except sqlite3.OperationalError as e:
            return None if "locked" in str(e) else str(e)
        except HostileDB as e:
            return str(e)

    def max_seq(self) -> int:
        """Highest agent seq, or 0 when the file is missing or refused: the host's own
        rows must never be blocked by the agent's file (parity alone keeps seqs unique)."""
        try:
            with agent_db(self.paths) as out:
                if out is None:
                    return 0
                top = out.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_out").fetchone()[0]
                return top if isinstance(top, int) else 0
        except (HostileDB, sqlite3.DatabaseError):
            return 0

    def undelivered(self, delivered: set[str]) -> list[dict[str, Any]]:
        """Due rows whose id is not in `delivered` (the host's record), oldest first (by
        seq). A row whose content is over MAX_CONTENT comes with content None (delivery
        refuses it) rather than loaded."""
        return [r for r in self.after(None) if r["due"] and r["id"] not in delivered]

    def after(self, floor: int | None) -> list[dict[str, Any]]:
        """Every row above seq `floor` (None: every row), oldest first, each with `due` (1
        when it may be sent now); a due row comes with its content, bounded as in
        `undelivered`, a row not yet due without it. Delivery's pass reads only what is
        new since its floor."""
        above = "" if floor is None else " WHERE seq > :floor"
        with agent_db(self.paths) as out:
            if out is None:
                return []
            rows = out.execute(
                f"SELECT {OUT_COLUMNS}, (deliver_after IS NULL OR deliver_after <= :now) AS due,"
                f" CASE WHEN (deliver_after IS NULL OR deliver_after <= :now)"
                f" AND length(CAST(content AS BLOB)) <= :max THEN content END AS content"
                f" FROM messages_out{above} ORDER BY seq",
                {"max": MAX_CONTENT, "now": utcnow(), "floor": floor}).fetchall()
        return [dict(r) for r in rows]

    def messages(self) -> list[dict[str, Any]]:
        """Every row, by seq, content bounded as in `undelivered` (tests, harnesses)."""
        with agent_db(self.paths) as out:
            if out is None:
                return []
            rows = out.execute(
                f"SELECT {OUT_COLUMNS}, CASE WHEN length(CAST(content AS BLOB)) <= :max"
                f" THEN content END AS content FROM messages_out ORDER BY seq",
                {"max": MAX_CONTENT}).fetchall()
        return [dict(r) for r in rows]

    def acks(self) -> dict[str, tuple[str, str]]:
        """message_id → (status, status_changed) from the agent's `processing_ack`."""
        with agent_db(self.paths) as out:
            if out is None:
                return {}
            return {r[0]: (r[1], r[2]) for r in out.execute(
                "SELECT message_id, status, status_changed FROM processing_ack")}

    def current_tool(self) -> tuple[Any, Any] | None:
        """(tool name, declared timeout in ms) the agent says it is running, as written
        (unchecked values); None when it wrote nothing."""
        with agent_db(self.paths) as out:
            row = out and out.execute("SELECT current_tool, tool_declared_timeout_ms FROM"
                                      " container_state WHERE id=1").fetchone()
        return (row[0], row[1]) if row else None

    def state(self, key: str) -> Any:
        """A value of the agent's `session_state` (tests, harnesses)."""
        with agent_db(self.paths) as out:
            row = out and out.execute("SELECT value FROM session_state WHERE key=?",
                                      (key,)).fetchone()
        return row[0] if row else None
