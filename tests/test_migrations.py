"""The central DB upgrades in place: a database made by an older release (only the
first N migrations applied, with rows in it) is opened by today's code, which applies
every later migration exactly once, records each in the ledger, keeps the old rows
(moving them where a migration reshapes a table), and ends with the same schema as a
fresh database. Opening it again applies nothing. (Every N, whatever MIGRATIONS holds
when the test runs; tests/test_session_migrations.py covers the session DBs' ledger.)"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dbread import db_row
from nanoclaw.db import central
from nanoclaw.db.migrations import MIGRATIONS
from nanoclaw.db.store import Store

NAMES = [n for n, _ in MIGRATIONS]
OLD = "2020-01-02T03:04:05.000Z"  # when the old release did things


def build_old(data_dir: Path, n: int) -> None:
    """A database as a release with only the first `n` migrations left it: each applied
    by hand, in order, with its ledger row."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(data_dir / "nanoclaw.db"))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                 " name TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL)")
    for version, (name, sql) in enumerate(MIGRATIONS[:n], 1):
        conn.executescript(sql)
        conn.execute("INSERT INTO schema_migrations VALUES (?,?,?)", (version, name, OLD))
    seed(conn, set(NAMES[:n]))
    conn.commit()
    conn.close()


def seed(conn: sqlite3.Connection, applied: set[str]) -> None:
    """Representative rows, in the columns the old schema had."""
    x = conn.execute
    x("INSERT INTO agent_groups VALUES ('ag-1', 'Main', 'main', 'claude', ?)", (OLD,))
    x("INSERT INTO messaging_groups (id, channel_type, platform_id, name, is_group,"
      " unknown_sender_policy, created_at) VALUES ('mg-1', 'telegram', 'telegram:42',"
      " 'Family', 1, 'request_approval', ?)", (OLD,))
    x("INSERT INTO messaging_group_agents (id, messaging_group_id, agent_group_id,"
      " engage_mode, created_at) VALUES ('w-1', 'mg-1', 'ag-1', 'mention', ?)", (OLD,))
    x("INSERT INTO users VALUES ('telegram:7', 'telegram', 'Ann', ?)", (OLD,))
    x("INSERT INTO user_roles VALUES ('telegram:7', 'owner', NULL, NULL, ?)", (OLD,))
    x("INSERT INTO sessions (id, agent_group_id, messaging_group_id, created_at)"
      " VALUES ('sess-1', 'ag-1', 'mg-1', ?)", (OLD,))
    x("INSERT INTO container_configs (agent_group_id, model, updated_at)"
      " VALUES ('ag-1', 'claude-old', ?)", (OLD,))
    x("INSERT INTO pending_approvals (approval_id, session_id, action, payload, created_at)"
      " VALUES ('appr-1', 'sess-1', 'install_packages', '{}', ?)", (OLD,))
    x("INSERT INTO pending_channel_approvals (messaging_group_id, original_message,"
      " created_at) VALUES ('mg-1', 'hello?', ?)", (OLD,))
    if "question-card-ids" in applied:
        x("INSERT INTO pending_questions (card_id, question_id, session_id, message_out_id,"
          " channel_type, platform_id, title, created_at) VALUES ('q-host-1', 'lunch',"
          " 'sess-1', 'out-1', 'telegram', 'telegram:42', 'Lunch?', ?)", (OLD,))
    else:
        x("INSERT INTO pending_questions (question_id, session_id, message_out_id,"
          " channel_type, platform_id, title, created_at) VALUES ('lunch', 'sess-1', 'out-1',"
          " 'telegram', 'telegram:42', 'Lunch?', ?)", (OLD,))
    if "inter-worker-queues" in applied:
        x("INSERT INTO inbound_events (channel_type, platform_id, message_id, payload,"
          " received_at) VALUES ('telegram', 'telegram:42', '1001', '{\"text\": \"hi\"}', ?)",
          (OLD,))
        x("INSERT INTO channel_outbox (idem_key, session_id, channel_type, platform_id, kind,"
          " content, status, platform_message_id, created_at) VALUES ('sess-1:out-0',"
          " 'sess-1', 'telegram', 'telegram:42', 'chat', '{\"text\": \"echo: hi\"}', 'sent',"
          " '2002', ?)", (OLD,))
        x("INSERT INTO host_state VALUES ('web_url', 'http://127.0.0.1:9/', ?)", (OLD,))


def ledger(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
    return [tuple(r) for r in conn.execute(
        "SELECT version, name, applied_at FROM schema_migrations ORDER BY version")]


def schema(conn: sqlite3.Connection) -> dict[str, list[tuple]]:
    """Every table's and index's columns (name, type, not null, default, key)."""
    out: dict[str, list[tuple]] = {}
    for r in conn.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
                          " ORDER BY name"):
        kind, name = r[0], r[1]
        if kind == "table":
            out[name] = [tuple(c)[1:] for c in conn.execute(f"PRAGMA table_info('{name}')")]
        elif kind == "index":
            out[name] = [tuple(c) for c in conn.execute(f"PRAGMA index_info('{name}')")]
    return out


def fresh_schema(tmp: Path) -> dict[str, list[tuple]]:
    conn = central.open_central(tmp / "fresh")
    try:
        return schema(conn)
    finally:
        conn.close()


def test_the_ledger_names_are_unique():
    assert len(set(NAMES)) == len(NAMES), "a repeated name would be skipped in silence"


@pytest.mark.parametrize("n", range(1, len(MIGRATIONS)), ids=lambda n: f"after-{NAMES[n - 1]}")
def test_an_old_database_is_upgraded_once_and_keeps_its_rows(tmp_path, n):
    data = tmp_path / "data"
    build_old(data, n)
    conn = central.connect(data / "nanoclaw.db")
    try:
        assert central.migrate(conn) == NAMES[n:]  # every later one, in order
        assert central.migrate(conn) == []  # and only once
        rows = ledger(conn)
        assert [(v, name) for v, name, _ in rows] == list(enumerate(NAMES, 1))
        assert [at for _, _, at in rows[:n]] == [OLD] * n  # the old entries untouched
        assert all(at != OLD for _, _, at in rows[n:])
        assert schema(conn) == fresh_schema(tmp_path)
    finally:
        conn.close()

    store = Store.open(data)  # today's code, as the host opens it
    try:
        mg = store.messaging_group("telegram", "telegram:42")
        assert mg["id"] == "mg-1" and mg["unknown_sender_policy"] == "request_approval"
        assert store.agent_group("ag-1")["folder"] == "main"
        assert store.session("sess-1")["messaging_group_id"] == "mg-1"
        assert db_row(store, "SELECT engage_mode FROM messaging_group_agents")["engage_mode"] == "mention"
        cfg = db_row(store, "SELECT * FROM container_configs WHERE agent_group_id='ag-1'")
        assert cfg["model"] == "claude-old" and cfg["fallback_model"] is None
        appr = db_row(store, "SELECT * FROM pending_approvals")
        assert appr["approval_id"] == "appr-1" and appr["decided_by"] is None
        assert db_row(store, "SELECT naming_by FROM pending_channel_approvals")["naming_by"] is None
        q = db_row(store, "SELECT * FROM pending_questions")
        # cards sent before host-made card ids keep their old id as their card id
        want_card = "q-host-1" if "question-card-ids" in NAMES[:n] else "lunch"
        assert (q["card_id"], q["question_id"], q["session_id"]) == (want_card, "lunch", "sess-1")
        if "inter-worker-queues" in NAMES[:n]:
            assert db_row(store, "SELECT message_id FROM inbound_events")["message_id"] == "1001"
            assert db_row(store, "SELECT status FROM channel_outbox")["status"] == "sent"
            assert store.get_state("web_url") == "http://127.0.0.1:9/"
    finally:
        store.close()


def test_opening_twice_applies_nothing_twice(tmp_path):
    data = tmp_path / "data"
    build_old(data, 1)
    after: list[list[tuple[int, str, str]]] = []
    for _ in range(2):
        Store.open(data).close()
        conn = central.connect(data / "nanoclaw.db")
        try:
            after.append(ledger(conn))
        finally:
            conn.close()
    assert [name for _, name, _ in after[0]] == NAMES
    assert after[1] == after[0]  # the same rows, the same stamps: nothing ran again


def test_the_central_db_keeps_the_file_name_earlier_installs_wrote(tmp_path):
    """An install's data is `data/nanoclaw.db`: a host that looked under another name
    would start on an empty database beside the owner's (a module-path rewrite once
    turned the file name into `nanoclaw.db.central`)."""
    from nanoclaw.config import Settings

    assert Settings(data_dir=tmp_path / "data").db_path == tmp_path / "data" / "nanoclaw.db"
    central.open_central(tmp_path / "data").close()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()
                  if p.name.startswith("nanoclaw.db")) [:1] == ["nanoclaw.db"]
