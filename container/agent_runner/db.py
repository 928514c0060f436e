"""The runner's side of the two session databases: read `inbound.db`, write `outbound.db`.

One class per file, intent-named methods, `BEGIN IMMEDIATE` around every write. Each
thread keeps one connection per file (opening one costs more than most queries): between
transactions it holds no lock and no snapshot, each read transaction sees the last
commit (SQLite checks the file's change counter; memory-mapped I/O stays off), and a
file replaced under it (another inode) or an error drops it for a fresh one.
`outbound.db` keeps its journal in PERSIST mode: in a sandbox both files are single-file
mounts in a read-only folder, so the runner can write them but never create or delete a
file beside them (the host made both). The runner's seq numbers are odd: the next odd
above the highest seq in *both* files, computed inside the write transaction so two
writers in this sandbox (the poll loop and a tool) can never pick the same one.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from agent_runner import nudge

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def iso(ts: float) -> str:
    """UTC ISO-8601 with milliseconds and Z, the format every stored timestamp uses."""
    # datetime.fromtimestamp's own rounding (to the microsecond, half to even), without
    # building a datetime: a few stamps per message, in every worker
    frac, whole = math.modf(ts)
    sec, us = int(whole), round(frac * 1e6)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    global _second
    if _second[0] != sec:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)))
    return f"{_second[1]}{us // 1000:03d}Z"


def utcnow() -> str:
    return iso(time.time())


def new_out_id() -> str:
    rand = "".join(secrets.choice(_B36) for _ in range(6))
    return f"out-{int(time.time() * 1000)}-{rand}"


@dataclass(frozen=True)
class Address:
    channel_type: str | None
    platform_id: str | None
    thread_id: str | None = None

    @property
    def channel(self) -> tuple[str | None, str | None]:
        return (self.channel_type, self.platform_id)


@dataclass(frozen=True)
class Destination:
    name: str
    display_name: str | None
    type: str
    channel_type: str | None
    platform_id: str | None
    agent_group_id: str | None

    @property
    def channel(self) -> tuple[str | None, str | None]:
        """Where rows to this destination go; agents are addressed as ('agent', group id)."""
        if self.type == "agent":
            return (self.channel_type or "agent", self.platform_id or self.agent_group_id)
        return (self.channel_type, self.platform_id)


@dataclass(frozen=True)
class InboundRow:
    id: str
    seq: int
    kind: str
    timestamp: str
    trigger: bool
    channel_type: str | None
    platform_id: str | None
    thread_id: str | None
    source_session_id: str | None
    on_wake: bool
    content: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"
    process_after: str | None = None
    recurrence: str | None = None
    series_id: str | None = None

    @property
    def channel(self) -> tuple[str | None, str | None]:
        return (self.channel_type, self.platform_id)

    @property
    def text(self) -> str:
        value = self.content.get("text") or self.content.get("prompt") or ""
        return value if isinstance(value, str) else json.dumps(value)


def _row(r: sqlite3.Row) -> InboundRow:
    try:
        content = json.loads(r["content"])
    except (TypeError, ValueError):
        content = {"text": str(r["content"])}
    if not isinstance(content, dict):
        content = {"text": json.dumps(content)}
    return InboundRow(
        id=r["id"], seq=r["seq"], kind=r["kind"], timestamp=r["timestamp"],
        trigger=bool(r["trigger"]), channel_type=r["channel_type"], platform_id=r["platform_id"],
        thread_id=r["thread_id"], source_session_id=r["source_session_id"],
        on_wake=bool(r["on_wake"]), content=content, status=r["status"],
        process_after=r["process_after"], recurrence=r["recurrence"], series_id=r["series_id"],
    )


def _connect(path: str, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(_ro_uri(path), uri=True, isolation_level=None, timeout=5.0)
    else:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA journal_mode=PERSIST")
        except sqlite3.OperationalError as e:
            if "disk I/O error" not in str(e) or not os.path.exists(path + "-journal"):
                conn.close()
                raise
            conn.close()
            _roll_back_in_place(path)
            conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
            conn.execute("PRAGMA journal_mode=PERSIST")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA mmap_size=0")
    conn.row_factory = sqlite3.Row
    return conn


def _roll_back_in_place(path: str) -> None:
    """A write cut short (the agent killed mid-transaction) leaves a hot journal, and
    SQLite rolls it back at the next open in the default DELETE mode, which unlinks the
    journal. In a sandbox the journal is a bind-mounted file that cannot be unlinked, so
    that open fails ("disk I/O error") at every start. Roll back a copy in a private
    folder instead, write the result back into the same file, and empty the journal
    (an empty journal is not hot)."""
    import fcntl
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="outbound-rollback-")
    try:
        copy = os.path.join(scratch, "outbound.db")
        shutil.copyfile(path, copy)
        shutil.copyfile(path + "-journal", copy + "-journal")
        c = sqlite3.connect(copy, isolation_level=None)
        try:
            c.execute("PRAGMA schema_version").fetchone()  # the rollback happens here
        finally:
            c.close()
        with open(copy, "rb") as src, open(path, "r+b") as dst:
            data = src.read()
            # SQLite's own exclusive lock (its PENDING byte and SHARED range), so a reader
            # meets "database is locked" (try again), never a half-written file
            fcntl.lockf(dst.fileno(), fcntl.LOCK_EX, 1, 0x40000000)
            fcntl.lockf(dst.fileno(), fcntl.LOCK_EX, 510, 0x40000002)
            dst.seek(0)
            dst.write(data)
            dst.truncate()
            dst.flush()
            os.fsync(dst.fileno())
        with open(path + "-journal", "r+b") as j:
            j.truncate(0)
            j.flush()
            os.fsync(j.fileno())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_kept = threading.local()  # per thread: (path, readonly) -> (connection, inode)
_inherited: list = []  # a forked child's copies: never used, never closed (see below)
# claims committing on the helper thread (`Outbound.claim_beside`): path -> its future
_beside: dict[str, "concurrent.futures.Future[None]"] = {}
_helper: list[concurrent.futures.ThreadPoolExecutor] = []  # made at first use, in this process
_on_helper = threading.local()


class ClaimFailed(Exception):
    """A claim committed beside the model request failed. Raised at the next use of its
    file, before anything else is read or written there, so the turn ends with nothing of
    it written and its rows still pending, as when a claim fails before the request."""


def _forget_after_fork() -> None:
    """A connection must not cross a fork: the child starts with none. The parent's are
    kept referenced, not closed: closing them here could touch the parent's locks. Nor
    does the claim helper (its thread is not in the child)."""
    global _kept
    _inherited.append(_kept)
    _kept = threading.local()
    _beside.clear()
    _helper.clear()


def _settle(*paths: str) -> None:
    """Wait for a claim still committing on any of `paths` (not on the helper itself)."""
    if getattr(_on_helper, "yes", False):
        return
    for path in paths:
        pending = _beside.pop(path, None)
        if pending is not None:
            try:
                pending.result()
            except Exception as e:
                raise ClaimFailed(f"claim failed: {e}") from e


os.register_at_fork(after_in_child=_forget_after_fork)


def _kept_connection(path: str, readonly: bool, attach: str = "") -> sqlite3.Connection:
    """This thread's connection to `path` (read-only: with `attach` as schema `o`, also
    read-only), opened when there is none or the file is another one now."""
    conns: dict[tuple[str, Any], tuple[sqlite3.Connection, int]] = getattr(_kept, "c", None) \
        or {}
    _kept.c = conns
    key = (path, attach or readonly)
    ino = os.stat(path).st_ino
    kept = conns.get(key)
    if kept is not None:
        if kept[1] == ino:
            return kept[0]
        _drop(*key)
    conn = _connect(path, readonly)
    if attach:
        try:
            conn.execute("ATTACH DATABASE ? AS o", (_ro_uri(attach),))
        except sqlite3.Error:
            conn.close()
            raise
    conns[key] = (conn, ino)
    return conn


def _ro_uri(path: str) -> str:
    return "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"


def _drop(path: str, readonly: Any) -> None:
    kept = getattr(_kept, "c", {}).pop((path, readonly), None)
    if kept is not None:
        try:
            kept[0].close()
        except sqlite3.Error:
            pass


def close_all() -> None:
    """Close this thread's kept connections (tests; a runner just exits)."""
    for path, readonly in list(getattr(_kept, "c", {})):
        _drop(path, readonly)


@contextmanager
def _read(path: str, attach: str = "") -> Iterator[sqlite3.Connection]:
    _settle(path, attach)
    conn = _kept_connection(path, True, attach)
    try:
        yield conn
    except sqlite3.Error:
        _drop(path, attach or True)
        raise


@contextmanager
def _write(path: str) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
    _settle(path)
    conn = _kept_connection(path, readonly=False)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error:
        _drop(path, False)  # whatever state it is in, the next write starts afresh
        raise


class Inbound:
    """`inbound.db`, read-only: what the host asks of the agent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def change_signal(self) -> tuple[int, int, int] | None:
        """(mtime_ns, size, inode): moves whenever the host commits a write."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def pending(self, now_iso: str, include_on_wake: bool) -> list[InboundRow]:
        """Due, pending, non-system rows, newest first (callers filter acks and limit)."""
        with _read(self.path) as conn:
            rows = conn.execute(
                "SELECT * FROM messages_in WHERE status='pending' AND kind != 'system'"
                " AND (process_after IS NULL OR process_after <= ?) AND (on_wake = 0 OR ?)"
                " ORDER BY seq DESC",
                (now_iso, 1 if include_on_wake else 0),
            ).fetchall()
        return [_row(r) for r in rows]

    def unanswered(self, now_iso: str, include_on_wake: bool, outbound: str,
                   limit: int) -> list[InboundRow]:
        """The newest `limit` due, pending, non-system rows that `outbound` (this runner's
        outbound.db) has not acked, newest first: the filter runs in SQLite, so a long
        session's answered rows are neither read nor parsed again at every turn."""
        with _read(self.path, attach=outbound) as conn:
            rows = conn.execute(
                "SELECT * FROM messages_in WHERE status='pending' AND kind != 'system'"
                " AND (process_after IS NULL OR process_after <= ?) AND (on_wake = 0 OR ?)"
                " AND id NOT IN (SELECT message_id FROM o.processing_ack)"
                " ORDER BY seq DESC LIMIT ?",
                (now_iso, 1 if include_on_wake else 0, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def destinations(self) -> list[Destination]:
        with _read(self.path) as conn:
            rows = conn.execute(_DESTINATIONS).fetchall()
        return _destinations(rows)

    def routing(self) -> Address | None:
        """The session's default reply address, or None when it has none."""
        with _read(self.path) as conn:
            r = conn.execute(_ROUTING).fetchone()
        return _routing(r)

    def addressing(self) -> tuple[list[Destination], Address | None]:
        """`destinations()` and `routing()` in one read transaction (one lock, one look
        at the journal, not two: a batch needs both)."""
        with _read(self.path) as conn:
            conn.execute("BEGIN")
            try:
                rows = conn.execute(_DESTINATIONS).fetchall()
                r = conn.execute(_ROUTING).fetchone()
            finally:
                conn.execute("COMMIT")
        return _destinations(rows), _routing(r)

    def by_seq(self, seq: int) -> InboundRow | None:
        with _read(self.path) as conn:
            r = conn.execute("SELECT * FROM messages_in WHERE seq=?", (seq,)).fetchone()
        return _row(r) if r else None

    def system_reply(self, type_: str, key: str, value: str) -> InboundRow | None:
        """The pending system row of `type_` whose `key` is `value` (the answer to a
        question, to an `ncl` request), if any."""
        with _read(self.path) as conn:
            rows = conn.execute(
                "SELECT * FROM messages_in WHERE kind='system' AND status='pending'"
                " AND content LIKE ? ORDER BY seq", (f"%{value}%",)).fetchall()
        for row in map(_row, rows):
            if row.content.get("type") == type_ and row.content.get(key) == value:
                return row
        return None

    def tasks(self) -> list[InboundRow]:
        with _read(self.path) as conn:
            rows = conn.execute("SELECT * FROM messages_in WHERE kind='task' ORDER BY seq")
            return [_row(r) for r in rows.fetchall()]

    def delivery(self, out_id: str) -> tuple[str, str | None] | None:
        """(status, platform message id) the host recorded for one of our rows, if any."""
        with _read(self.path) as conn:
            r = conn.execute("SELECT status, platform_message_id FROM delivered"
                             " WHERE message_out_id=?", (out_id,)).fetchone()
        return (r[0], r[1]) if r else None

    def max_seq(self) -> int:
        with _read(self.path) as conn:
            return conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_in").fetchone()[0]


_DESTINATIONS = "SELECT * FROM destinations ORDER BY name"
_ROUTING = "SELECT * FROM session_routing WHERE id=1"


def _destinations(rows: list[sqlite3.Row]) -> list[Destination]:
    return [Destination(r["name"], r["display_name"], r["type"], r["channel_type"],
                        r["platform_id"], r["agent_group_id"]) for r in rows]


def _routing(r: sqlite3.Row | None) -> Address | None:
    if r is None or not (r["channel_type"] and r["platform_id"]):
        return None
    return Address(r["channel_type"], r["platform_id"], r["thread_id"])


class Outbound:
    """`outbound.db`, written only by this sandbox: replies, claims, state."""

    def __init__(self, path: str, inbound: Inbound, session_dir: str | None = None) -> None:
        self.path = path
        self.inbound = inbound
        self.session_dir = session_dir or os.path.dirname(path)  # where the nudge link is

    # -- claims
    def delete_stale_claims(self) -> int:
        with _write(self.path) as conn:
            return conn.execute("DELETE FROM processing_ack WHERE status='processing'").rowcount

    def claim_beside(self, ids: Iterable[str]) -> None:
        """`claim`, committed on a helper thread while this one goes on to the model
        request: the commit's syncs are a millisecond of a warm turn, and the request
        does not need them done. The next read or write of this file (from any thread
        but the helper) waits for it first and raises its failure as `ClaimFailed`
        (`_settle`); SQLite's own locks keep the file whole either way."""
        ids = list(ids)
        _settle(self.path)
        if not _helper:
            _helper.append(concurrent.futures.ThreadPoolExecutor(1, "claim"))
        _beside[self.path] = _helper[0].submit(self._claim_on_helper, ids)

    def _claim_on_helper(self, ids: list[str]) -> None:
        _on_helper.yes = True  # this thread only claims: it never waits on a claim
        self.claim(ids)

    def claim(self, ids: Iterable[str]) -> None:
        now = utcnow()
        with _write(self.path) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO processing_ack (message_id, status, status_changed)"
                " VALUES (?, 'processing', ?)", [(i, now) for i in ids])

    def complete(self, ids: Iterable[str], status: str = "completed") -> None:
        now = utcnow()
        with _write(self.path) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO processing_ack (message_id, status, status_changed)"
                " VALUES (?, ?, ?)", [(i, status, now) for i in ids])

    def release(self, ids: Iterable[str]) -> None:
        """Give claimed rows back untouched (shutdown mid-batch): the next runner retakes them."""
        with _write(self.path) as conn:
            conn.executemany(
                "DELETE FROM processing_ack WHERE message_id=? AND status='processing'",
                [(i,) for i in ids])

    # -- output
    def write_message(self, kind: str, content: dict[str, Any], to: Address,
                      in_reply_to: str | None, out_id: str | None = None) -> tuple[str, int]:
        """Append one `messages_out` row; returns (id, seq)."""
        return self.write_answer([(kind, content, to, in_reply_to, out_id)], ())[0]

    def write_answer(self, rows: list[tuple[str, dict[str, Any], Address, str | None,
                                            str | None]],
                     answered: Iterable[str]) -> list[tuple[str, int]]:
        """Append `messages_out` rows (kind, content, to, in_reply_to, out id or None) and
        mark the inbound rows they answer completed, in one transaction: a runner killed
        after it has neither lost the answer nor leaves the rows to be answered again by
        the next one. Returns each row's (id, seq)."""
        out, now, answered = [], utcnow(), list(answered)
        with _write(self.path) as conn:
            in_max = self.inbound.max_seq()
            out_max = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_out").fetchone()[0]
            top = max(in_max, out_max)
            for kind, content, to, in_reply_to, out_id in rows:
                out_id = out_id or new_out_id()
                seq = top + 1 if top % 2 == 0 else top + 2
                top = seq
                conn.execute(
                    "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind,"
                    " platform_id, channel_type, thread_id, content) VALUES (?,?,?,?,?,?,?,?,?)",
                    (out_id, seq, in_reply_to, now, kind, to.platform_id, to.channel_type,
                     to.thread_id, json.dumps(content)))
                out.append((out_id, seq))
            conn.executemany(
                "INSERT OR REPLACE INTO processing_ack (message_id, status, status_changed)"
                " VALUES (?, 'completed', ?)", [(i, now) for i in answered])
        if out:
            nudge.send_host(self.session_dir)  # committed: the host may look now
        return out

    def by_seq(self, seq: int) -> dict[str, Any] | None:
        with _read(self.path) as conn:
            r = conn.execute("SELECT * FROM messages_out WHERE seq=?", (seq,)).fetchone()
        return dict(r) if r else None

    # -- state
    def get_state(self, key: str) -> str | None:
        with _read(self.path) as conn:
            r = conn.execute("SELECT value FROM session_state WHERE key=?", (key,)).fetchone()
        return r[0] if r else None

    def set_state(self, key: str, value: str) -> None:
        with _write(self.path) as conn:
            conn.execute("INSERT OR REPLACE INTO session_state (key, value, updated_at)"
                         " VALUES (?,?,?)", (key, value, utcnow()))

    def delete_state(self, key: str) -> None:
        with _write(self.path) as conn:
            conn.execute("DELETE FROM session_state WHERE key=?", (key,))

    def set_current_tool(self, name: str | None, timeout_ms: int | None = None) -> None:
        """What the host's stuck check reads: the running tool and its declared timeout."""
        now = utcnow()
        with _write(self.path) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO container_state (id, current_tool,"
                " tool_declared_timeout_ms, tool_started_at, updated_at) VALUES (1,?,?,?,?)",
                (name, timeout_ms, now if name else None, now))
