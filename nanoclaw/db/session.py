"""The two databases of one session, as the host sees them, and the folder that holds them.

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
The host never writes `outbound.db`.

The files, by module: `sessionfile.py` (paths, `opened`), `inbound.py`
(`SessionInbound`, with the task statements of `tasks.py` and the ledger of
`session_migrations.py`), `outbound.py` (`SessionOutbound`, `agent_db`, `HostileDB`).
This module makes and repairs the folder (`create`, `reset_outbound`); callers read and
write the files through the two classes.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from typing import Any

from nanoclaw import hostile
from nanoclaw.db.inbound import MAX_TRIES, RETRY_BASE_SECONDS, SessionInbound, migrate_inbound
from nanoclaw.db.outbound import (MAX_CONTENT, MAX_OUTBOUND, OUTBOUND_DDL, OUTBOUND_SCHEMA,
                                  READ_BOUND_S, HostileDB, SessionOutbound, agent_db)
from nanoclaw.db.sessionfile import (HEARTBEAT, INBOX, OUTBOX, SessionPaths, file_signal, of,
                                     opened, transaction)
from nanoclaw.util import utcnow

__all__ = [  # the names callers use: the two classes, the folder and its constants
    "SessionInbound", "SessionOutbound", "SessionPaths", "HostileDB", "agent_db", "of",
    "opened", "transaction", "create", "reset_outbound", "file_signal",
    "HEARTBEAT", "INBOX", "OUTBOX", "MAX_TRIES", "RETRY_BASE_SECONDS", "MAX_CONTENT",
    "MAX_OUTBOUND", "READ_BOUND_S", "OUTBOUND_DDL", "OUTBOUND_SCHEMA", "utcnow",
]


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
    _create_inbound(paths)
    _create_outbound(paths.outbound, owner)
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
    """Before an agent starts: an outbound.db the host refuses (not exactly the current
    schema among other reasons: outbound.py, "Versions") is renamed aside (kept for a
    look, never read again) and a fresh one made. Returns why, or None."""
    why = SessionOutbound(paths).refusal()
    if why is None:
        return None
    aside = f"{paths.outbound}.refused-{int(time.time() * 1000)}"
    os.rename(paths.outbound, aside)
    try:
        os.unlink(paths.outbound + "-journal")
    except FileNotFoundError:
        pass
    create(paths.root, owner)
    return why


def damaged(e: BaseException) -> bool:
    """Whether an error from SQLite says the file itself is damaged (not a database, a
    malformed page), not that it is busy, full or unreadable just now."""
    return isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError)


def set_aside_inbound(paths: SessionPaths) -> str:
    """A damaged inbound.db (`damaged`) is renamed aside, kept for a look and never read
    again, and a fresh one made in its place; returns the name it was kept under. Its
    agent must be stopped first: a running one holds the old file."""
    aside = f"{paths.inbound}.damaged-{int(time.time() * 1000)}"
    os.rename(paths.inbound, aside)
    for tail in ("-journal", "-wal", "-shm"):
        try:
            os.unlink(paths.inbound + tail)
        except FileNotFoundError:
            pass
    _create_inbound(paths)
    return os.path.basename(aside)


def _create_inbound(paths: SessionPaths) -> None:
    """A new inbound.db is built whole at the current migration beside its name and then
    renamed into place (readers never see a file without its tables); an existing one
    is brought up to date."""
    if not os.path.exists(paths.inbound):
        _build(paths.inbound, None, migrate_inbound)
    SessionInbound(paths).ensure_current()


def _create_outbound(path: str, owner: tuple[int, int] | None) -> None:
    """A new outbound.db at the current schema, handed to the agent; an existing one is
    the agent's and left alone (`reset_outbound` replaces one the host refuses)."""
    if not os.path.exists(path):
        _build(path, owner, lambda conn: conn.executescript(OUTBOUND_DDL))


def _build(path: str, owner: tuple[int, int] | None, make: Any) -> None:
    tmp = path + ".new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    with opened(tmp) as conn:
        make(conn)
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
