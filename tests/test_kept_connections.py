"""Kept SQLite connections (issue 17): the host's router and delivery, and the runner,
keep a connection per session DB instead of opening one per query. One is used again
only while its path names the same regular file; a file replaced (another inode) or
turned into a link is opened afresh with the usual checks; an error drops it; a fork
leaves the child none; between transactions it holds no lock, so the other side writes
freely and reads see every commit."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import pytest

from nanoclaw.db import sessionfile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "container"))
from agent_runner import db as runner_db  # noqa: E402


@pytest.fixture
def kept():
    sessionfile.keep_connections(4)
    yield
    sessionfile.close_kept()
    sessionfile.keep_connections(0)


def _make(path: Path, value: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (v INTEGER)")
    conn.execute("INSERT INTO t VALUES (?)", (value,))
    conn.commit()
    conn.close()


def _read(path: Path) -> tuple[sqlite3.Connection, int]:
    with sessionfile.opened(str(path), readonly=True) as conn:
        return conn, conn.execute("SELECT v FROM t").fetchone()[0]


def test_the_host_keeps_a_connection_only_while_the_file_is_the_same(tmp_path, kept):
    db = tmp_path / "inbound.db"
    _make(db, 1)
    first, v = _read(db)
    again, _ = _read(db)
    assert again is first and v == 1  # kept
    other = sqlite3.connect(db)  # another process's commit is seen, no lock is held
    other.execute("UPDATE t SET v = 2")
    other.commit()
    other.close()
    conn, v = _read(db)
    assert conn is first and v == 2
    with sessionfile.transaction(str(db)) as conn:  # a write on the kept rw connection
        conn.execute("UPDATE t SET v = 3")
    assert _read(db)[1] == 3
    # replaced by another file: that one is read, through a new connection
    new = tmp_path / "new.db"
    _make(new, 9)
    os.replace(new, db)
    conn, v = _read(db)
    assert conn is not first and v == 9
    # a link where the file was: refused, as without keeping, never followed
    target = tmp_path / "elsewhere.db"
    _make(target, 7)
    db.unlink()
    db.symlink_to(target)
    with pytest.raises(sqlite3.DatabaseError, match="not a regular file"):
        _read(db)
    # an error drops the connection: the next use opens afresh
    db.unlink()
    _make(db, 5)
    with pytest.raises(sqlite3.OperationalError):
        with sessionfile.opened(str(db), readonly=True) as conn:
            conn.execute("SELECT nope FROM t")
    assert _read(db)[1] == 5


def test_without_keeping_every_use_opens_afresh(tmp_path):
    db = tmp_path / "inbound.db"
    _make(db, 1)
    with sessionfile.opened(str(db), readonly=True) as a:
        pass
    with pytest.raises(sqlite3.ProgrammingError):  # closed on leaving
        a.execute("SELECT 1")


def test_a_forked_child_starts_with_no_connection(tmp_path, kept):
    db = tmp_path / "inbound.db"
    _make(db, 1)
    parent, _ = _read(db)
    parent_id = id(parent)  # the child's copy of the parent's object has this address too
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first use opens its own connection
        try:
            child, v = _read(db)
            os.write(w, b"ok" if id(child) != parent_id and v == 1 else b"shared")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 16) == b"ok"
    os.close(r)
    assert _read(db)[0] is parent  # the parent's is untouched


def test_the_runner_keeps_its_connections_and_follows_a_new_file(tmp_path):
    db = tmp_path / "outbound.db"
    _make(db, 1)
    try:
        with runner_db._write(str(db)) as conn:
            first = conn  # held, so a new connection can never reuse its address
            conn.execute("UPDATE t SET v = 2")
        with runner_db._write(str(db)) as conn:
            assert conn is first
        with runner_db._read(str(db)) as conn:  # its own read-only connection
            assert conn.execute("SELECT v FROM t").fetchone()[0] == 2
        new = tmp_path / "new.db"
        _make(new, 9)
        os.replace(new, db)
        with runner_db._read(str(db)) as conn:
            assert conn.execute("SELECT v FROM t").fetchone()[0] == 9
        with pytest.raises(sqlite3.OperationalError):  # a failed write: dropped, rolled back
            with runner_db._write(str(db)) as conn:
                conn.execute("UPDATE t SET v = 10")
                conn.execute("SELECT nope FROM t")
        with runner_db._write(str(db)) as conn:
            assert conn is not first and conn.execute("SELECT v FROM t").fetchone()[0] == 9
    finally:
        runner_db.close_all()
