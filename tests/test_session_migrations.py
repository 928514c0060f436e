"""Migration ledgers (review §2, habit 9): the central DB's and each session's
`inbound.db`. An old file is opened by today's code and upgraded in order with its data
kept; a list that repeats a name, or a file migrated by another build, is refused."""

from __future__ import annotations

import sqlite3

import pytest

from nanoclaw.db import central
from nanoclaw.db import migrations as central_migrations
from nanoclaw.db import session as sessiondb
from nanoclaw.db.inbound import LEDGER, SessionInbound
from nanoclaw.db.outbound import OUTBOUND_SCHEMA
from nanoclaw.db.session_migrations import INBOUND_MIGRATIONS, INITIAL
from nanoclaw.errors import DataError


def _ledger(path: str) -> list[str]:
    with sqlite3.connect(path) as c:
        return [r[0] for r in c.execute(f"SELECT name FROM {LEDGER} ORDER BY version")]


def _indexes(path: str) -> set[str]:
    with sqlite3.connect(path) as c:
        return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")}


def _old_session(tmp_path, with_ledger: bool) -> sessiondb.SessionPaths:
    """A session folder whose inbound.db is at migration 1 (the original DDL), with a
    row in it: a file from before the ledger, or one that recorded only "initial"."""
    p = sessiondb.create(str(tmp_path / "s"))
    tmp = tmp_path / "old.db"
    conn = sqlite3.connect(tmp, isolation_level=None)
    if with_ledger:
        central.migrate(conn, INBOUND_MIGRATIONS[:1], LEDGER)
    else:
        conn.executescript(INITIAL)
    conn.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content, series_id)"
                 " VALUES ('old', 2, 'task', 'x', '{\"prompt\": \"p\"}', 'old')")
    conn.close()
    tmp.replace(p.inbound)
    assert "messages_in_series" not in _indexes(p.inbound)
    return p


@pytest.mark.parametrize("with_ledger", [False, True])
def test_an_inbound_db_at_migration_1_is_brought_up_to_date_and_keeps_its_rows(
        tmp_path, with_ledger):
    p = _old_session(tmp_path, with_ledger)
    row = SessionInbound(p).message("old")  # the first open in this process migrates
    assert row is not None and row["seq"] == 2
    assert _ledger(p.inbound) == [n for n, _ in INBOUND_MIGRATIONS]
    assert "messages_in_series" in _indexes(p.inbound)
    assert SessionInbound(p).migrate() == []  # applied once
    assert SessionInbound(p).insert(id="new", kind="chat", content={"text": "hi"})
    assert SessionInbound(p).message("new")["seq"] == 4


def test_create_brings_an_existing_inbound_db_up_to_date(tmp_path):
    p = _old_session(tmp_path, with_ledger=False)
    sessiondb.create(p.root)
    assert _ledger(p.inbound) == [n for n, _ in INBOUND_MIGRATIONS]
    assert sessiondb.SessionInbound(p).message("old")["series_id"] == "old"


def test_a_new_session_starts_at_the_current_migration(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    assert _ledger(p.inbound) == [n for n, _ in INBOUND_MIGRATIONS]
    # outbound.db has no ledger: its version is its exact schema (outbound.py)
    with sqlite3.connect(p.outbound) as c:
        assert set(c.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")) \
            == OUTBOUND_SCHEMA


def test_a_repeated_migration_name_is_refused():
    dup = [("a", "CREATE TABLE a (x);"), ("b", "CREATE TABLE b (x);"), ("a", "SELECT 1;")]
    with pytest.raises(ValueError, match="'a' is listed twice"):
        central_migrations.check_ledger(dup)
    conn = sqlite3.connect(":memory:", isolation_level=None)
    with pytest.raises(ValueError, match="listed twice"):
        central.migrate(conn, dup, "m")
    assert conn.execute("SELECT name FROM sqlite_master WHERE name IN ('a', 'b')"
                        ).fetchall() == []  # refused before anything ran


def test_the_shipped_lists_have_no_repeated_names():
    for migrations in (central_migrations.MIGRATIONS, INBOUND_MIGRATIONS):
        names = [n for n, _ in migrations]
        assert len(set(names)) == len(names)


def test_a_file_migrated_by_another_build_is_refused(tmp_path):
    conn = sqlite3.connect(":memory:", isolation_level=None)
    central.migrate(conn, [("a", "CREATE TABLE a (x);"), ("x", "CREATE TABLE x (y);")], "m")
    with pytest.raises(DataError, match="'x' as migration 2"):
        central.migrate(conn, [("a", "CREATE TABLE a (x);"), ("b", "CREATE TABLE b (x);")], "m")


def test_an_old_central_db_is_upgraded_in_order_with_its_data(tmp_path):
    conn = central.connect(tmp_path / "nanoclaw.db")
    first = central_migrations.MIGRATIONS[:2]
    assert central.migrate(conn, first) == [n for n, _ in first]
    conn.execute("INSERT INTO agent_groups (id, name, folder, created_at) VALUES"
                 " ('ag', 'main', 'main', 'x')")
    conn.execute("INSERT INTO container_configs (agent_group_id, updated_at) VALUES ('ag', 'x')")
    later = central.migrate(conn)
    assert later == [n for n, _ in central_migrations.MIGRATIONS[2:]]
    row = conn.execute("SELECT * FROM container_configs WHERE agent_group_id='ag'").fetchone()
    assert row["daily_token_budget"] is None and row["fallback_model"] is None  # added later
    assert central.migrate(conn) == []
