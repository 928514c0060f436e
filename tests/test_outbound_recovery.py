"""An agent killed in the middle of a write to its outbound.db leaves a hot journal
that only a read-write open can roll back; the host reads the file read-only. That used
to make the file "unreadable", so the session was quarantined as hostile and the message
in flight was never answered (found by `make chaos`). Now the host rolls back a private
copy and reads what the agent had committed; the agent's own files are left as they are
(its next start rolls them back itself)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from nanoclaw.db import session as sessiondb

WRITER = textwrap.dedent("""
    import sqlite3, sys, time
    c = sqlite3.connect(sys.argv[1], isolation_level=None)
    c.execute("PRAGMA journal_mode=PERSIST")
    c.execute("PRAGMA cache_size=5")  # pages spill to the file inside the transaction
    c.execute("BEGIN IMMEDIATE")
    for i in range(400):
        c.execute("INSERT INTO messages_out (id, seq, kind, content, timestamp) VALUES"
                  " (?, ?, 'chat', ?, '2026-01-01T00:00:00Z')",
                  (f"half-{i}", 1001 + 2 * i, '{"text": "' + "x" * 900 + '"}'))
    print("mid-write", flush=True)
    time.sleep(60)
""")


def cut_write_short(root) -> sessiondb.SessionPaths:
    """A session whose outbound.db holds one committed row ('kept') and a hot journal:
    its writer was killed in the middle of a second, larger transaction."""
    paths = sessiondb.create(str(root))
    c = sqlite3.connect(paths.outbound, isolation_level=None)
    c.execute("PRAGMA journal_mode=PERSIST")
    c.execute("INSERT INTO messages_out (id, seq, kind, content, timestamp) VALUES"
              " ('kept', 1, 'chat', '{\"text\": \"kept\"}', '2026-01-01T00:00:00Z')")
    c.close()
    kill_mid_write(paths.outbound)
    return paths


def kill_mid_write(path: str) -> None:
    """Start the agent's large write to `path` and kill it halfway: a hot journal."""
    w = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert w.stdout.readline().strip() == "mid-write"
    finally:
        os.kill(w.pid, signal.SIGKILL)
        w.wait(10)


def test_a_write_cut_short_by_kill_is_read_as_committed_not_refused(tmp_path):
    paths = cut_write_short(tmp_path / "s")
    with pytest.raises(sqlite3.OperationalError):  # what a plain read-only open meets
        ro = sqlite3.connect(f"file:{paths.outbound}?mode=ro", uri=True)
        try:
            ro.execute("SELECT COUNT(*) FROM messages_out").fetchone()
        finally:
            ro.close()
    before = (os.stat(paths.outbound).st_mtime_ns, os.path.getsize(paths.outbound))
    out = sessiondb.SessionOutbound(paths)
    assert [m["id"] for m in out.messages()] == ["kept"]  # the committed row, not refused
    assert out.max_seq() == 1
    assert (os.stat(paths.outbound).st_mtime_ns, os.path.getsize(paths.outbound)) == before
    assert not [d for d in os.listdir("/tmp") if d.startswith("nanoclaw-outbound-")
                and os.stat(os.path.join("/tmp", d)).st_mtime > time.time() - 60]
