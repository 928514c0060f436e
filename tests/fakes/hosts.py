"""Helpers for channel tests: wire a platform chat to the default agent through the DB
(until the admin commands are used for it), and read what the host recorded."""

from __future__ import annotations

import json
from typing import Any

from dbread import db_row
from nanoclaw.db.store import Store


def wire_chat(host: Any, channel_type: str, platform_id: str, is_group: bool = False,
              engage_mode: str = "pattern") -> str:
    """Wire a chat to the default agent (`main`), open to any sender; returns its id."""
    store = Store.open(host.data)
    try:
        ag = db_row(store, "SELECT id FROM agent_groups WHERE folder='main'")["id"]
        mg = store.messaging_group(channel_type, platform_id)
        mg_id = mg["id"] if mg else store.create_messaging_group(
            channel_type, platform_id, f"{channel_type} {platform_id}", is_group, policy="public")
        store.wire(mg_id, ag, destination=f"{channel_type}-{platform_id.split(':')[-1]}",
                   engage_mode=engage_mode, engage_pattern="." if engage_mode == "pattern" else None)
        return mg_id
    finally:
        store.close()


def enqueue(host: Any, idem: str, channel_type: str, platform_id: str,
            content: dict[str, Any], kind: str = "chat", thread_id: str | None = None,
            in_reply_to: str | None = None) -> None:
    """Queue a send as delivery would (no session: nothing is told back)."""
    store = Store.open(host.data)
    try:
        store.enqueue_send(idem, channel_type, platform_id, thread_id, kind, content,
                           in_reply_to=in_reply_to)
    finally:
        store.close()


def outbox(host: Any, idem: str) -> dict[str, Any] | None:
    rows = host.q("SELECT * FROM channel_outbox WHERE idem_key=?", (idem,))
    return rows[0] if rows else None


def inbound_events(host: Any, channel_type: str, kind: str | None = None) -> list[dict]:
    rows = host.q("SELECT * FROM inbound_events WHERE channel_type=? ORDER BY id", (channel_type,))
    out = []
    for r in rows:
        if kind is None or r["kind"] == kind:
            r["payload"] = json.loads(r["payload"])
            out.append(r)
    return out


def session_inbound(host: Any, channel_type: str, platform_id: str) -> list[dict]:
    """The rows of the (first) session of a chat's inbound.db."""
    import sqlite3

    s = host.q("SELECT s.* FROM sessions s JOIN messaging_groups m ON m.id=s.messaging_group_id"
               " WHERE m.channel_type=? AND m.platform_id=?", (channel_type, platform_id))
    if not s:
        return []
    path = host.data / "sessions" / s[0]["agent_group_id"] / s[0]["id"] / "db" / "inbound.db"
    conn = sqlite3.connect(str(path), timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM messages_in ORDER BY seq")]
    finally:
        conn.close()


def worker(host: Any, name: str) -> dict[str, Any]:
    return {w["name"]: w for w in host.workers()}.get(name) or {}


def error_log(host: Any) -> str:
    try:
        return (host.base / "logs" / "nanoclaw.error.log").read_text()
    except OSError:
        return ""


def log(host: Any) -> str:
    try:
        return (host.base / "logs" / "nanoclaw.log").read_text()
    except OSError:
        return ""
