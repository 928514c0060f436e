"""What every `Store` mixin shares: the connection, two private read helpers, and the
statements the one-transaction decisions are built from.

SQLite transactions do not nest, so a decision that writes several rows cannot be put
together from `Store` methods (each opens its own transaction). It runs these `_…`
statements inside its own `atomic` instead; they never open or commit one themselves.
(They live here rather than in `store.py` because the mixins in `groups.py` and
`approvals.py` use them and `store.py` imports the mixins.)
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from nanoclaw.util import FOLDER_NAME, new_id, utcnow


class Queries:
    """The base of every `Store` mixin: `conn` and the read helpers they use."""

    conn: sqlite3.Connection

    def nudge(self, *workers: str) -> None:  # Store's: wake workers after a commit
        raise NotImplementedError

    def _nudge_channels(self, channel_types: list[str]) -> None:
        """Wake the channel workers that have new sends (after the commit)."""
        for ch in dict.fromkeys(channel_types):
            self.nudge(f"channel:{ch}")

    def _rows(self, sql: str, args: tuple | dict = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, args)]

    def _row(self, sql: str, args: tuple | dict = ()) -> dict[str, Any] | None:
        row = self.conn.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def _exists(self, sql: str, args: tuple | dict = ()) -> bool:
        return self.conn.execute(sql, args).fetchone() is not None


def _insert_agent_group(conn: sqlite3.Connection, name: str, folder: str, provider: str,
                        model: str, assistant_name: str) -> str:
    ag, now = new_id("ag"), utcnow()
    conn.execute("INSERT INTO agent_groups (id, name, folder, agent_provider, created_at)"
                 " VALUES (?,?,?,?,?)", (ag, name, folder, provider, now))
    conn.execute("INSERT INTO container_configs (agent_group_id, provider, model, assistant_name,"
                 " updated_at) VALUES (?,?,?,?,?)", (ag, provider, model, assistant_name, now))
    return ag


def _free_folder(conn: sqlite3.Connection, name: str) -> str:
    """`Store.free_folder` on a connection (inside a decision's transaction)."""
    folder, n = name, 1
    while not FOLDER_NAME.fullmatch(folder) or conn.execute(
            "SELECT 1 FROM agent_groups WHERE folder=?", (folder,)).fetchone():
        n += 1
        folder = f"{name}-{n}"[:64]
    return folder


def _upsert_user(conn: sqlite3.Connection, user_id: str, kind: str) -> None:
    conn.execute("INSERT INTO users (id, kind, display_name, created_at) VALUES (?,?,NULL,?)"
                 " ON CONFLICT(id) DO NOTHING", (user_id, kind, utcnow()))


def _add_member(conn: sqlite3.Connection, user_id: str, agent_group_id: str,
                added_by: str | None) -> None:
    """Make `user_id` (a user row made if missing) a member of the agent group."""
    _upsert_user(conn, user_id, user_id.partition(":")[0])
    conn.execute("INSERT OR IGNORE INTO agent_group_members (user_id, agent_group_id, added_by,"
                 " added_at) VALUES (?,?,?,?)", (user_id, agent_group_id, added_by, utcnow()))


def _wire_rows(conn: sqlite3.Connection, mg: str, ag: str, *, destination: str,
               engage_mode: str = "pattern", engage_pattern: str | None = ".",
               sender_scope: str = "all", ignored: str = "drop", session_mode: str = "shared",
               priority: int = 0) -> str:
    """`Store.wire`'s statements, without its transaction (decisions that wire a chat
    among other writes run them inside their own)."""
    wid, now = new_id("w"), utcnow()
    conn.execute(
        "INSERT INTO messaging_group_agents (id, messaging_group_id, agent_group_id,"
        " engage_mode, engage_pattern, sender_scope, ignored_message_policy, session_mode,"
        " priority, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (wid, mg, ag, engage_mode, engage_pattern, sender_scope, ignored, session_mode,
         priority, now))
    name, n = destination, 1
    while conn.execute("SELECT 1 FROM agent_destinations WHERE agent_group_id=? AND"
                       " local_name=?", (ag, name)).fetchone():
        n += 1
        name = f"{destination}-{n}"
    if not conn.execute("SELECT 1 FROM agent_destinations WHERE agent_group_id=? AND"
                        " target_id=?", (ag, mg)).fetchone():
        conn.execute("INSERT INTO agent_destinations (agent_group_id, local_name, target_type,"
                     " target_id, created_at) VALUES (?,?,'channel',?,?)", (ag, name, mg, now))
    return wid


def _insert_send(conn: sqlite3.Connection, send: dict[str, Any]) -> bool:
    """One `channel_outbox` row (`Store.enqueue_send`'s arguments as a dict); False when
    its idempotency key was queued before."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO channel_outbox (idem_key, session_id, message_out_id,"
        " channel_type, platform_id, thread_id, in_reply_to, kind, content, created_at)"
        " VALUES (?,?,?,?,?,?,?,?,?,?)",
        (send["idem_key"], send.get("session_id"), send.get("message_out_id"),
         send["channel_type"], send["platform_id"], send.get("thread_id"),
         send.get("in_reply_to"), send["kind"], json.dumps(send["content"]), utcnow()))
    return bool(cur.rowcount)
