"""What the attack tests share: a Python prelude run inside the sandbox through the
model's bash tool (raw rows into its own outbound.db, a report file the test reads), and
a canary folder outside `data/` that must stay unread and unchanged."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
from pathlib import Path

from conftest import wait_for

PRELUDE = r'''
import json, os, shutil, sqlite3, time
DB = os.environ.get("NANOCLAW_DB_DIR") or "/workspace/.session"
WS = os.environ.get("NANOCLAW_SESSION_DIR") or "/workspace"
CFG = json.load(open(os.path.join(DB, "container.json")))
ME = CFG["agent_group_id"]

def out(id, content, channel_type, platform_id, kind="chat", in_reply_to=None):
    """A raw row in our own outbound.db, as a hostile model can write one."""
    c = sqlite3.connect(os.path.join(DB, "outbound.db"), isolation_level=None, timeout=10)
    c.execute("PRAGMA journal_mode=PERSIST")
    top = c.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_out").fetchone()[0]
    inb = sqlite3.connect("file:" + os.path.join(DB, "inbound.db") + "?mode=ro", uri=True)
    top = max(top, inb.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_in").fetchone()[0])
    inb.close()
    seq = top + 101 if (top + 101) % 2 else top + 102
    c.execute("INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, platform_id,"
              " channel_type, content) VALUES (?,?,?,?,?,?,?,?)",
              (id, seq, in_reply_to, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
               kind, platform_id, channel_type, json.dumps(content)))
    c.close()

def attempt(fn):
    try:
        fn()
        return "done"
    except Exception as e:
        return f"{type(e).__name__}: {e}"

def report(name, value):
    with open(os.path.join(WS, f"attack-{name}.json"), "w") as f:
        json.dump(value, f)
'''


def inside(c, s: dict, name: str, script: str, timeout: float = 90):
    """Run `script` inside the agent's sandbox through the model's bash tool; returns
    what it reported as `name` (every script ends with `report(name, …)`)."""
    b64 = base64.b64encode((PRELUDE + script).encode()).decode()
    c.send(marker(f"echo {b64} | base64 -d | python3 -"))
    return read_report(s, name, timeout)


def marker(command: str) -> str:
    return f"[[tool:bash {json.dumps({'command': command})}]]"


class Canary:
    """A host folder outside data/ an attacker would love to reach: its file must stay
    as it was, unread, unchanged, owned by root; nothing of it may show up in data/."""

    SECRET = "canary-" + "5eb9c1d0" * 4

    def __init__(self, base: Path):
        self.dir = base / "canary"
        (self.dir / "x").mkdir(parents=True)
        self.file = self.dir / "x" / "secret.txt"
        self.file.write_text(self.SECRET)
        old = time.time() - 3 * 86400  # so any read moves atime, even under relatime
        os.utime(self.file, (old, old))
        self.before = self._state()

    def _state(self) -> dict:
        """Everything but the content (reading it would move its atime)."""
        return {str(p.relative_to(self.dir)): (p.lstat().st_mode, p.lstat().st_uid,
                                               p.lstat().st_mtime_ns, p.lstat().st_size)
                for p in sorted(self.dir.rglob("*"))}

    def atime_works(self) -> bool:
        probe = self.dir.parent / "atime-probe"
        probe.write_text("x")
        old = time.time() - 3 * 86400
        os.utime(probe, (old, old))
        probe.read_text()
        return os.stat(probe).st_atime > old + 60

    def assert_untouched(self, *search: Path) -> None:
        assert self._state() == self.before, "the canary folder changed"
        if self.atime_works():
            assert os.stat(self.file).st_atime < time.time() - 86400, "the canary was read"
        assert self.file.read_text() == self.SECRET
        for top in search:
            for p in top.rglob("*"):
                if p.is_file() and not p.is_symlink() and p.stat().st_size < 50_000_000:
                    assert self.SECRET.encode() not in p.read_bytes(), f"the canary leaked to {p}"


def first_session(h, c) -> dict:
    assert c.wait_reply(c.send("hello"), 90)["text"] == "echo: hello"
    (s,) = h.q("SELECT s.* FROM sessions s JOIN messaging_groups m ON m.id = s.messaging_group_id"
               " WHERE m.channel_type = 'cli' AND m.platform_id = ?", (c.chat,))
    s["root"] = h.data / "sessions" / s["agent_group_id"] / s["id"]
    return s


def read_report(s: dict, name: str, timeout: float = 90):
    path = s["root"] / "work" / f"attack-{name}.json"
    wait_for(path.exists, timeout, what=f"the sandbox's report {name}")
    return json.loads(wait_for(path.read_text, 10, what="the whole report"))


def delivered(s: dict, out_id: str) -> dict | None:
    conn = sqlite3.connect(f"file:{s['root'] / 'db' / 'inbound.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        r = conn.execute("SELECT * FROM delivered WHERE message_out_id=?", (out_id,)).fetchone()
        return dict(r) if r else None
    finally:
        conn.close()


def notes(s: dict) -> list[str]:
    conn = sqlite3.connect(f"file:{s['root'] / 'db' / 'inbound.db'}?mode=ro", uri=True)
    try:
        return [json.loads(r[0]).get("text", "") for r in conn.execute(
            "SELECT content FROM messages_in WHERE channel_type='agent'")]
    finally:
        conn.close()
