"""The central database `data/nanoclaw.db`: connection, transactions, migrations.

WAL and foreign keys on; every write is one explicit `BEGIN IMMEDIATE` transaction.
Migrations are applied by name, in order (a ledger row each, in the same transaction), so
they are idempotent and modules never coordinate version numbers; `migrate` also keeps
each session's `inbound.db` current (db/session_migrations.py). Connections are opened in the
process that uses them, after fork, never shared.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nanoclaw.db.migrations import MIGRATIONS, check_ledger
from nanoclaw.errors import DataError
from nanoclaw.util import utcnow


def connect(path: Path | str) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=10.0, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


@contextmanager
def atomic(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction; rolled back on any exception (including shutdown)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:  # SQLite has already rolled back after some errors
            conn.execute("ROLLBACK")  # (a full disk): the first error is the one to tell
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection, migrations: list[tuple[str, str]] | None = None,
            ledger: str = "schema_migrations") -> list[str]:
    """Apply every migration not yet in the ledger, in the list's order, each in its own
    transaction with its ledger row; returns the names applied now. The same ledger
    serves the session DBs (`ledger` names the table). A list with a repeated name is
    refused (ValueError), and so is a ledger that is not a prefix of the list in order
    (DataError: the file was migrated by another build, and guessing would corrupt it)."""
    migrations = MIGRATIONS if migrations is None else migrations  # the central DB's
    check_ledger(migrations)
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {ledger} ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL)"
    )
    names = [n for n, _ in migrations]
    applied = [r[0] for r in conn.execute(f"SELECT name FROM {ledger} ORDER BY version")]
    for i, name in enumerate(applied):
        if i >= len(names) or names[i] != name:
            raise DataError(f"{ledger} has {name!r} as migration {i + 1} and this build does"
                            " not: the database was migrated by another version of nanoclaw")
    done = []
    for name, sql in migrations[len(applied):]:
        with atomic(conn):
            # another process may have applied it since we looked (session DBs are
            # opened by several workers): decided again inside the transaction
            if conn.execute(f"SELECT 1 FROM {ledger} WHERE name=?", (name,)).fetchone():
                continue
            for stmt in _statements(sql):
                conn.execute(stmt)
            n = conn.execute(f"SELECT COALESCE(MAX(version), 0) + 1 FROM {ledger}")
            conn.execute(
                f"INSERT INTO {ledger} (version, name, applied_at) VALUES (?,?,?)",
                (n.fetchone()[0], name, utcnow()),
            )
        done.append(name)
    return done


def _statements(sql: str) -> list[str]:
    """Split a migration script into statements (executescript would commit early)."""
    out, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


def open_central(data_dir: Path, *, create: bool = True) -> sqlite3.Connection:
    """Open (and migrate) the central DB, turning every way it can be broken into one
    clear DataError line: missing or unwritable folder, not a database, corrupt."""
    path = data_dir / "nanoclaw.db"
    try:
        if create:
            data_dir.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            raise DataError(f"no database at {path}: start the host once (nanoclaw run)")
    except OSError as e:
        raise DataError(f"cannot create data directory {data_dir}: {e.strerror}") from None
    if create and not os.access(data_dir, os.W_OK | os.X_OK):
        raise DataError(f"data directory {data_dir} is not writable")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise DataError(f"database {path} is not readable and writable")
    try:
        conn = connect(path)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise DataError(f"database {path} cannot use WAL mode (got {mode})")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise DataError(f"database {path} is corrupt: {check}")
        migrate(conn)
    except sqlite3.DatabaseError as e:
        raise DataError(f"database {path} is unusable: {e}") from None
    return conn


def data_version(conn: sqlite3.Connection) -> int:
    """Moves whenever another connection commits: the cheap change signal for the
    central DB (costs one page-cache read, no table access)."""
    return conn.execute("PRAGMA data_version").fetchone()[0]
