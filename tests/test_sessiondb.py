"""Session databases: layout, seq parity, idempotent inserts, retries and failure."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from nanoclaw.db import session as sessiondb
from nanoclaw.util import is_safe_name, iso


def _out_row(paths, seq, id_="o1"):
    c = sqlite3.connect(paths.outbound)
    c.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content) VALUES"
              " (?,?,'2026-01-01T00:00:00.000Z','chat','{}')", (id_, seq))
    c.commit()
    c.close()


def test_create_makes_folder_and_both_dbs(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    for f in (p.inbound, p.outbound, p.outbound + "-journal", os.path.join(p.work, "inbox"),
              os.path.join(p.work, "outbox")):
        assert os.path.exists(f)
    mode = sqlite3.connect(p.inbound).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "delete"
    assert os.stat(p.root).st_mode & 0o777 == 0o700  # the host's; the sandbox sees db/ only
    assert os.stat(p.db).st_mode & 0o777 == 0o755


def test_create_hands_the_agent_its_files_only(tmp_path):
    owner = (54321, 54321)
    p = sessiondb.create(str(tmp_path / "s"), owner)
    for f in (p.outbound, p.outbound + "-journal", p.work, os.path.join(p.work, "inbox")):
        assert (os.stat(f).st_uid, os.stat(f).st_gid) == owner, f
    for f in (p.root, p.db, p.inbound):
        assert os.stat(f).st_uid == os.geteuid(), f


def test_a_host_write_keeps_its_journal_and_readers_see_the_row(tmp_path):
    """inbound.db is written with a persistent journal: made once, its header zeroed at
    each commit (no create, chown, folder sync and unlink per write). The agent's
    read-only view reads every committed row, and a write cut short is still rolled back
    by the host's next open."""
    p = sessiondb.create(str(tmp_path / "s"))
    inbound = sessiondb.SessionInbound(p)
    assert inbound.insert(id="m1", kind="chat", content={"text": "one"})
    journal = p.inbound + "-journal"
    first = os.stat(journal)
    assert inbound.insert(id="m2", kind="chat", content={"text": "two"})
    assert os.stat(journal).st_ino == first.st_ino  # the same file, not made again
    with open(journal, "rb") as j:
        assert j.read(28) == bytes(28)  # its header zeroed: not a hot journal
    agent = sqlite3.connect(f"file:{p.inbound}?mode=ro", uri=True)
    assert [r[0] for r in agent.execute("SELECT id FROM messages_in ORDER BY seq")] == [
        "m1", "m2"]
    agent.close()
    # a host killed mid-write: its journal is hot, and the next host open rolls it back
    w = subprocess.run([sys.executable, "-c", HALF_WRITE, p.inbound], capture_output=True,
                       text=True)
    assert w.returncode == -signal.SIGKILL, w.stderr
    with open(journal, "rb") as j:
        assert j.read(28) != bytes(28)
    assert inbound.insert(id="m4", kind="chat", content={"text": "four"})  # a write
    assert inbound.message("m3") is None
    assert json.loads(inbound.message("m1")["content"]) == {"text": "one"}


HALF_WRITE = """
import os, signal, sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode=PERSIST")
c.execute("PRAGMA cache_size=1")
c.execute("BEGIN IMMEDIATE")
c.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content) VALUES"
          " ('m3', 100, 'chat', 'x', ?)", ("x" * 20000,))
c.execute("UPDATE messages_in SET content = ? WHERE id = 'm1'", ("y" * 20000,))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_flat_session_folder_is_moved_to_the_layout(tmp_path):
    """A folder of the older layout (databases beside the agent's files) keeps its rows
    and files; a symlink the agent left there is moved, never followed."""
    root = tmp_path / "s"
    p = sessiondb.create(str(tmp_path / "tmp"))
    root.mkdir()
    os.rename(p.inbound, root / "inbound.db")
    os.rename(p.outbound, root / "outbound.db")
    (root / "outbox").mkdir()
    (root / "notes.txt").write_text("mine")
    (root / "db").symlink_to("/etc")
    old = sessiondb.SessionPaths(str(root))
    with sqlite3.connect(root / "inbound.db") as c:
        c.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content) VALUES"
                  " ('old', 2, 'chat', 'x', '{}')")
    new = sessiondb.create(str(root))
    assert new == old and sessiondb.SessionInbound(new).message("old")["seq"] == 2
    assert (root / "work" / "notes.txt").read_text() == "mine"
    assert os.path.islink(root / "work" / "db") and os.path.isdir(root / "db")
    assert not os.path.exists(str(root) + ".flat")


def test_host_seq_even_above_both_tables(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    assert sessiondb.SessionInbound(p).insert(id="a", kind="chat", content={"text": "1"})
    _out_row(p, 3)
    assert sessiondb.SessionInbound(p).insert(id="b", kind="chat", content={"text": "2"})
    seqs = [r[0] for r in sqlite3.connect(p.inbound).execute(
        "SELECT seq FROM messages_in ORDER BY seq")]
    assert seqs == [2, 4]
    assert not sessiondb.SessionInbound(p).insert(id="a", kind="chat", content={"text": "again"})


def test_undelivered_until_marked(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    sessiondb.SessionInbound(p).insert(id="a", kind="chat", content={})
    _out_row(p, 3, "o1")
    assert [r["id"] for r in sessiondb.SessionOutbound(p).undelivered(sessiondb.SessionInbound(p).delivered_ids())] == ["o1"]
    sessiondb.SessionInbound(p).mark_delivered("o1", "pm1")
    assert sessiondb.SessionOutbound(p).undelivered(sessiondb.SessionInbound(p).delivered_ids()) == []


def test_unreadable_outbound_does_not_block_inbound(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    with open(p.outbound, "wb") as f:
        f.write(b"junk" * 500)
    assert sessiondb.SessionInbound(p).insert(id="a", kind="chat", content={})
    with pytest.raises(sessiondb.HostileDB, match="unreadable"):
        sessiondb.SessionOutbound(p).undelivered(sessiondb.SessionInbound(p).delivered_ids())


def test_reset_stuck_backs_off_then_fails(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    sessiondb.SessionInbound(p).insert(id="a", kind="chat", content={})
    now = 1_000_000.0
    outcomes = []
    for _ in range(5):
        c = sqlite3.connect(p.outbound)
        c.execute("INSERT OR REPLACE INTO processing_ack VALUES ('a','processing',?)",
                  (f"claim-{now}",))
        c.commit()
        c.close()
        outcomes += sessiondb.SessionInbound(p).reset_stuck(now)
        assert sessiondb.SessionInbound(p).reset_stuck(now + 1e6) == []  # each claim is reset once
        row = sessiondb.SessionInbound(p).message("a")
        if row["status"] == "pending":
            assert row["process_after"] == iso(now + 5 * 2 ** row["tries"])
            now += 5 * 2 ** row["tries"]
    assert [o for _, o in outcomes] == ["retry"] * 4 + ["failed"]
    assert sessiondb.SessionInbound(p).message("a")["status"] == "failed"


def test_sync_acks_completes_rows(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    sessiondb.SessionInbound(p).insert(id="a", kind="chat", content={})
    sessiondb.SessionInbound(p).insert(id="b", kind="chat", content={})
    c = sqlite3.connect(p.outbound)
    c.execute("INSERT INTO processing_ack VALUES ('a','completed','x'), ('b','failed','x')")
    c.commit()
    assert sessiondb.SessionInbound(p).sync_acks() == 2
    assert sessiondb.SessionInbound(p).due_count(iso(2e9)) == 0


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 200, "a..b", "x\n"])
def test_hostile_file_names_are_not_safe_names(name):
    assert not is_safe_name(name)
    assert is_safe_name("photo.jpg")


def test_decide_stuck_table():
    from nanoclaw.lifecycle.sweep import decide_stuck

    now, ceil, tol = 10_000.0, 1800.0, 60.0
    assert decide_stuck(now, None, [], ceil, tol) is None                  # fresh: grace
    assert decide_stuck(now, now - 10, [], ceil, tol) is None              # active
    assert decide_stuck(now, now - 1801, [], ceil, tol) == "ceiling"       # idle too long
    assert decide_stuck(now, now - 1801, [], ceil, tol, 3600) is None      # long tool declared
    assert decide_stuck(now, now - 100, [now - 90], ceil, tol) == "stuck"  # no beat since claim
    assert decide_stuck(now, now - 5, [now - 90], ceil, tol) is None       # recent progress
    assert decide_stuck(now, now - 85, [now - 90], ceil, tol) == "stuck"   # beat at claim only
    assert decide_stuck(now, None, [now - 61], ceil, tol) == "stuck"
    assert decide_stuck(now, None, [now - 59], ceil, tol) is None
    assert decide_stuck(now, None, [now - 90], ceil, tol, 120) is None     # bash timeout


@pytest.mark.parametrize("ddl", [
    "CREATE TRIGGER t AFTER INSERT ON processing_ack BEGIN SELECT 1; END",
    "CREATE VIEW v AS SELECT 1",
    "DROP TABLE messages_out; CREATE VIEW messages_out AS SELECT 'x' AS id, 1 AS seq,"
    " NULL AS in_reply_to, 'x' AS timestamp, NULL AS deliver_after, NULL AS recurrence,"
    " 'chat' AS kind, NULL AS platform_id, NULL AS channel_type, NULL AS thread_id,"
    " '{}' AS content",
    "CREATE INDEX i ON messages_out(content)",
    "ALTER TABLE messages_out ADD COLUMN x DEFAULT 1",
])
def test_an_outbound_db_not_exactly_the_runners_is_refused(tmp_path, ddl):
    p = sessiondb.create(str(tmp_path / "s"))
    c = sqlite3.connect(p.outbound)
    c.executescript(ddl)
    c.close()
    with pytest.raises(sessiondb.HostileDB) as e:
        sessiondb.SessionOutbound(p).undelivered(sessiondb.SessionInbound(p).delivered_ids())
    assert e.value.kind == "its database schema was changed"
    assert sessiondb.SessionOutbound(p).max_seq() == 0 and sessiondb.SessionInbound(p).reset_stuck(1e9) == []
    assert sessiondb.SessionInbound(p).insert(id="a", kind="chat", content={})  # inbound unaffected
    assert sessiondb.reset_outbound(p, None) and sessiondb.SessionOutbound(p).undelivered(sessiondb.SessionInbound(p).delivered_ids()) == []


def test_a_read_past_its_cpu_bound_is_interrupted(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    with pytest.raises(sessiondb.HostileDB, match="CPU") as e:
        with sessiondb.agent_db(p) as conn:
            conn.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c"
                         " WHERE x < 10000000000) SELECT COUNT(*) FROM c").fetchone()
    assert e.value.kind == "reading its database took too long"


def test_a_move_cut_short_is_finished(tmp_path):
    """kill -9 after the old folder was set aside: the next create() finishes the move."""
    p = sessiondb.create(str(tmp_path / "tmp"))
    aside = tmp_path / "s.flat"
    aside.mkdir()
    os.rename(p.inbound, aside / "inbound.db")
    (aside / "notes.txt").write_text("mine")
    with sqlite3.connect(aside / "inbound.db") as c:
        c.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content) VALUES"
                  " ('old', 2, 'chat', 'x', '{}')")
    new = sessiondb.create(str(tmp_path / "s"))
    assert sessiondb.SessionInbound(new).message("old")["seq"] == 2
    assert (tmp_path / "s" / "work" / "notes.txt").read_text() == "mine"
    assert not aside.exists()
