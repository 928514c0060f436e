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
import threading
import urllib.parse
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
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
    return _of(settings.data_dir, session["agent_group_id"], session["id"])


@lru_cache(maxsize=4096)  # the router and delivery ask at every message
def _of(data_dir: Any, agent_group_id: str, session_id: str) -> SessionPaths:
    return SessionPaths(os.path.join(data_dir, "sessions", agent_group_id, session_id))


def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True,
                               isolation_level=None, timeout=5.0)
    else:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        # PERSIST, not DELETE: the journal is made once and its header zeroed at each
        # commit, instead of created, chowned, synced with its folder and unlinked at
        # every write (router and delivery write each message's inbound.db). Equally
        # safe: a zeroed header is not a hot journal, and a real one is rolled back by
        # the next read-write open either way.
        conn.execute("PRAGMA journal_mode=PERSIST")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA mmap_size=0")
    conn.row_factory = sqlite3.Row
    return conn


KEPT_MAX = 0  # connections kept per thread and kind (see `keep_connections`); 0: none
_caches: list["Kept"] = []
_inherited: list = []  # a forked child's copies: never used, never closed (see below)


class Kept:
    """The last KEPT_MAX connections one kind of opener made, per thread, each with the
    inode of the file it was opened on: `take` hands one back only for that same inode
    (else closes it), `keep` stores one (closing the oldest past KEPT_MAX; a connection
    still in a transaction, or of no regular file, is closed instead). A connection
    must not cross a fork: a child starts with none, and the parent's are left
    referenced, not closed (closing them there could touch the parent's locks)."""

    def __init__(self) -> None:
        self._local = threading.local()
        _caches.append(self)

    def _entries(self) -> OrderedDict[Any, tuple[sqlite3.Connection, int, Any]]:
        entries = getattr(self._local, "c", None)
        if entries is None:
            entries = self._local.c = OrderedDict()
        return entries

    def take(self, key: Any, ino: int | None) -> tuple[sqlite3.Connection, Any] | None:
        entry = self._entries().pop(key, None)
        if entry is None:
            return None
        if entry[1] != ino:
            close_quietly(entry[0])
            return None
        return entry[0], entry[2]

    def keep(self, key: Any, conn: sqlite3.Connection, ino: int, extra: Any = None) -> None:
        if ino < 0 or KEPT_MAX <= 0 or conn.in_transaction:
            close_quietly(conn)
            return
        entries = self._entries()
        entries[key] = (conn, ino, extra)
        while len(entries) > KEPT_MAX:
            close_quietly(entries.popitem(last=False)[1][0])

    def close_all(self) -> None:
        entries = self._entries()
        while entries:
            close_quietly(entries.popitem()[1][0])

    def _forget(self) -> None:
        _inherited.append(self._local)
        self._local = threading.local()


def _forget_after_fork() -> None:
    for cache in _caches:
        cache._forget()


os.register_at_fork(after_in_child=_forget_after_fork)
_HOST = Kept()


@contextmanager
def opened(path: str, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection to a host-written session DB (read-only if asked). Only a regular
    file is opened (in the process runtime the agent could put a link or a FIFO there;
    sandboxes cannot reach `db/` at all).

    In a process that called `keep_connections(n)`, each thread keeps its last n
    connections (opening one costs more than the query it serves): one is used again
    only while the path still names a regular file with the same inode it was opened
    on; otherwise, or after an error, it is closed and the file opened afresh with the
    checks above. A read may be served by the kept read-write connection of the same
    file (one connection per file, not two). Between transactions a kept connection
    holds no lock (a rollback journal) and each read sees the last commit."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise sqlite3.DatabaseError(f"{os.path.basename(path)} is not a regular file")
    except FileNotFoundError:
        st = None
    key = (path, readonly)
    entry = _HOST.take(key, st.st_ino if st is not None else None)
    if entry is None and readonly and st is not None:  # a read: the writer's will do
        entry = _HOST.take((path, False), st.st_ino)
        key = (path, False) if entry is not None else key
    if entry is None:
        conn = _connect(path, readonly)
        ino = st.st_ino if st is not None else _inode(path)
    else:
        conn, ino = entry[0], st.st_ino  # type: ignore[union-attr] (taken: same inode)
    try:
        yield conn
    except sqlite3.Error:
        close_quietly(conn)
        raise
    except BaseException:
        _HOST.keep(key, conn, ino)  # closed instead if still in a transaction
        raise
    _HOST.keep(key, conn, ino)


def keep_connections(n: int) -> None:
    """Keep the last `n` connections per thread: for the workers on every message's
    path (router, delivery); the others open a session's DB now and then, and would
    only hold the memory (~100 KB a connection)."""
    global KEPT_MAX
    KEPT_MAX = n


def _inode(path: str) -> int:
    """The inode of the file a fresh connection just made; -1 (not kept) if it is not a
    regular file or is gone."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return -1
    return st.st_ino if stat.S_ISREG(st.st_mode) else -1


def close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


def close_kept() -> None:
    """Close this thread's kept connections, of every kind (tests, a folder about to be
    removed)."""
    for cache in _caches:
        cache.close_all()


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
