"""Session databases: layout, seq parity, idempotent inserts, retries and failure."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from nanoclaw import sessiondb
from nanoclaw.util import iso, safe_child


def _out_row(paths, seq, id_="o1"):
    c = sqlite3.connect(paths.outbound)
    c.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content) VALUES"
              " (?,?,'2026-01-01T00:00:00.000Z','chat','{}')", (id_, seq))
    c.commit()
    c.close()


def test_create_makes_folder_and_both_dbs(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    for f in (p.inbound, p.outbound, p.inbox, p.outbox):
        assert os.path.exists(f)
    mode = sqlite3.connect(p.inbound).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "delete"


def test_host_seq_even_above_both_tables(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    assert sessiondb.insert_message(p, id="a", kind="chat", content={"text": "1"})
    _out_row(p, 3)
    assert sessiondb.insert_message(p, id="b", kind="chat", content={"text": "2"})
    seqs = [r[0] for r in sqlite3.connect(p.inbound).execute(
        "SELECT seq FROM messages_in ORDER BY seq")]
    assert seqs == [2, 4]
    assert not sessiondb.insert_message(p, id="a", kind="chat", content={"text": "again"})


def test_direct_host_reply_takes_an_odd_seq(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    sessiondb.insert_message(p, id="a", kind="chat", content={})
    mid = sessiondb.write_outbound_direct(p, kind="chat", content={"text": "no"},
                                          in_reply_to="a", channel_type="cli",
                                          platform_id="local", thread_id=None)
    row = sqlite3.connect(p.outbound).execute("SELECT seq, content FROM messages_out WHERE id=?",
                                              (mid,)).fetchone()
    assert row[0] == 3 and json.loads(row[1]) == {"text": "no"}
    assert [r["id"] for r in sessiondb.undelivered(p)] == [mid]
    sessiondb.mark_delivered(p, mid, "pm1")
    assert sessiondb.undelivered(p) == []


def test_unreadable_outbound_does_not_block_inbound(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    with open(p.outbound, "wb") as f:
        f.write(b"junk" * 500)
    assert sessiondb.insert_message(p, id="a", kind="chat", content={})


def test_reset_stuck_backs_off_then_fails(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    sessiondb.insert_message(p, id="a", kind="chat", content={})
    now = 1_000_000.0
    outcomes = []
    for _ in range(5):
        c = sqlite3.connect(p.outbound)
        c.execute("INSERT OR REPLACE INTO processing_ack VALUES ('a','processing','x')")
        c.commit()
        c.close()
        outcomes += sessiondb.reset_stuck(p, now)
        row = sessiondb.message(p, "a")
        if row["status"] == "pending":
            assert row["process_after"] == iso(now + 5 * 2 ** row["tries"])
            now += 5 * 2 ** row["tries"]
        assert sessiondb.acks(p) == {}
    assert [o for _, o in outcomes] == ["retry"] * 4 + ["failed"]
    assert sessiondb.message(p, "a")["status"] == "failed"


def test_sync_acks_completes_rows(tmp_path):
    p = sessiondb.create(str(tmp_path / "s"))
    sessiondb.insert_message(p, id="a", kind="chat", content={})
    sessiondb.insert_message(p, id="b", kind="chat", content={})
    c = sqlite3.connect(p.outbound)
    c.execute("INSERT INTO processing_ack VALUES ('a','completed','x'), ('b','failed','x')")
    c.commit()
    assert sessiondb.sync_acks(p) == 2
    assert sessiondb.due_count(p, iso(2e9)) == 0


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 200, "a..b"])
def test_safe_child_refuses_hostile_names(tmp_path, name):
    with pytest.raises(ValueError):
        safe_child(str(tmp_path), name)


def test_safe_child_refuses_symlinks(tmp_path):
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(ValueError):
        safe_child(str(tmp_path), "link")
    assert safe_child(str(tmp_path), "photo.jpg").endswith("photo.jpg")


def test_decide_stuck_table():
    from nanoclaw.sweep import decide_stuck

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
