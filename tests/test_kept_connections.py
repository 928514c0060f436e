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
import time
from pathlib import Path

import pytest
from test_outbound_recovery import kill_mid_write

from nanoclaw.db import outbound, sessionfile
from nanoclaw.db import session as sessiondb

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


# --- the agent's outbound.db, kept open by the router and delivery ------------------------

def _agent(paths) -> sqlite3.Connection:
    """The agent's side: its own read-write connection, as the runner opens it."""
    c = sqlite3.connect(paths.outbound, isolation_level=None, timeout=0)
    c.execute("PRAGMA journal_mode=PERSIST")
    return c


def _reply(agent: sqlite3.Connection, seq: int) -> None:
    """One reply row, committed at once: timeout 0, so any read lock the host still held
    would fail it with 'database is locked'."""
    agent.execute("BEGIN IMMEDIATE")
    agent.execute("INSERT INTO messages_out (id, seq, kind, content, timestamp) VALUES"
                  " (?, ?, 'chat', '{\"text\": \"hi\"}', '2026-01-01T00:00:00Z')",
                  (f"out-{seq}", seq))
    agent.execute("COMMIT")


def _kept_agent_conn(paths):
    entry = outbound._KEPT._entries().get(paths.outbound)
    return entry and entry[0]


def test_the_agents_file_is_read_through_one_kept_connection_holding_no_lock(tmp_path, kept):
    paths = sessiondb.create(str(tmp_path / "s"))
    agent = _agent(paths)
    out = sessiondb.SessionOutbound(paths)
    assert out.max_seq() == 0
    first = _kept_agent_conn(paths)
    assert first is not None
    reads = [out.max_seq, lambda: out.after(None), lambda: out.after(1),
             lambda: out.undelivered(set()), out.messages, out.acks, out.current_tool,
             lambda: out.state("k"), out.refusal]
    seq = 1
    for read in reads:
        read()
        _reply(agent, seq)  # the agent writes at once after every kind of read
        assert out.max_seq() == seq  # and the kept connection sees its commit
        seq += 2
    assert _kept_agent_conn(paths) is first
    assert [m["id"] for m in out.after(seq - 5)] == [f"out-{seq - 4}", f"out-{seq - 2}"]
    agent.close()


@pytest.mark.parametrize("change", [
    "CREATE VIEW forged AS SELECT 1",
    "CREATE TRIGGER t AFTER INSERT ON messages_out BEGIN SELECT 1; END",
    "CREATE INDEX odd ON messages_out (content)",
])
def test_a_schema_changed_in_place_is_refused_on_a_kept_connection(tmp_path, kept, change):
    paths = sessiondb.create(str(tmp_path / "s"))
    out = sessiondb.SessionOutbound(paths)
    out.max_seq()
    assert _kept_agent_conn(paths) is not None
    agent = _agent(paths)
    agent.execute(change)  # same file, same inode: only the schema cookie moved
    agent.close()
    with pytest.raises(sessiondb.HostileDB, match="schema"):
        out.messages()
    assert _kept_agent_conn(paths) is None


def test_a_schema_changed_behind_a_cookie_set_back_never_runs_the_agents_sql(tmp_path, kept):
    """The agent swaps a table for a view and writes the old schema cookie back: the kept
    connection does not re-read the schema, so it reads with the one it checked. At
    worst that reads as a corrupt file; the view's rows are never what the host sees."""
    paths = sessiondb.create(str(tmp_path / "s"))
    out = sessiondb.SessionOutbound(paths)
    assert out.state("k") is None
    agent = _agent(paths)
    cookie = agent.execute("PRAGMA schema_version").fetchone()[0]
    agent.execute("DROP TABLE session_state")
    agent.execute("CREATE VIEW session_state AS SELECT 'k' AS key, 'forged' AS value,"
                  " 'now' AS updated_at")
    agent.execute(f"PRAGMA schema_version={cookie}")
    agent.close()
    try:
        value = out.state("k")
    except sessiondb.HostileDB:
        value = None
    assert value != "forged"
    sessionfile.close_kept()  # a fresh connection reads the schema and refuses it
    with pytest.raises(sessiondb.HostileDB):
        out.state("k")


def test_a_kept_connection_gets_its_cpu_bound_afresh_at_each_use(tmp_path, kept, monkeypatch):
    monkeypatch.setattr(outbound, "READ_BOUND_S", 0.05)
    paths = sessiondb.create(str(tmp_path / "s"))
    agent = _agent(paths)
    for seq in range(1, 600, 2):  # enough rows for the progress handler to be consulted
        _reply(agent, seq)
    agent.close()
    out = sessiondb.SessionOutbound(paths)
    out.max_seq()
    began = time.thread_time()
    while time.thread_time() - began < 0.1:  # more CPU than the bound, between reads
        pass
    assert len(out.messages()) == 300  # not interrupted: the bound is per read, not per open
    assert _kept_agent_conn(paths) is not None


def test_a_replaced_or_half_written_file_is_opened_afresh(tmp_path, kept):
    paths = sessiondb.create(str(tmp_path / "s"))
    out = sessiondb.SessionOutbound(paths)
    agent = _agent(paths)
    _reply(agent, 1)
    agent.close()
    assert out.max_seq() == 1
    assert _kept_agent_conn(paths) is not None
    # the agent killed mid-write: a hot journal the read-only kept connection cannot
    # roll back; the read goes to a private copy, and shows what was committed
    kill_mid_write(paths.outbound)
    assert [m["id"] for m in out.messages()] == ["out-1"]
    assert _kept_agent_conn(paths) is None  # not kept: neither the first nor the copy's
    # another file put in place of a kept one is checked as a new one
    paths = sessiondb.create(str(tmp_path / "u"))
    out = sessiondb.SessionOutbound(paths)
    assert out.messages() == []
    assert _kept_agent_conn(paths) is not None
    other = sessiondb.create(str(tmp_path / "t"))
    bad = sqlite3.connect(other.outbound)
    bad.execute("CREATE TABLE extra (x)")
    bad.close()
    os.replace(other.outbound, paths.outbound)
    with pytest.raises(sessiondb.HostileDB, match="schema"):
        out.messages()
    assert _kept_agent_conn(paths) is None


def test_a_read_uses_the_kept_writer_of_the_same_file(tmp_path, kept):
    """One connection per file: delivery reads and writes each session's inbound.db,
    and two connections a file would cycle a 20-session load through the cache."""
    db = tmp_path / "inbound.db"
    _make(db, 1)
    with sessionfile.transaction(str(db)) as writer:
        writer.execute("UPDATE t SET v = 2")
    reader, v = _read(db)
    assert reader is writer and v == 2
    missing = tmp_path / "missing.db"  # a read never creates the file
    with pytest.raises(sqlite3.OperationalError):
        _read(missing)
    assert not missing.exists()
