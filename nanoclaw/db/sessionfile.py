"""The files of one session, and how the host opens the ones it writes.

A session folder `data/sessions/<agent group>/<session>/` is the host's (0700); its
layout is in `session.py`. This module is the leaf the session-DB classes share
(`inbound.py`, `outbound.py`, `tasks.py`, `session.py` all import it): the paths, and
`opened`, the one way to a connection on a host-written session DB.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from nanoclaw import hostile
from nanoclaw.db.central import atomic

HEARTBEAT = ".heartbeat"  # in work/: the agent touches it while it lives
INBOX = "inbox"          # in work/: files for the agent, by message
OUTBOX = "outbox"        # in work/: files the agent sends, by message id


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
    """BEGIN IMMEDIATE … COMMIT on a host-written session DB, rolled back on any
    exception."""
    with opened(path) as conn, atomic(conn):
        yield conn


def file_signal(path: str) -> tuple[int, int, int] | None:
    """A cheap 'did this file move?' signal: (mtime_ns, size, inode); None if missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
