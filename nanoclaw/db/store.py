"""Intent-named access to the central DB: one method, one transaction.

Workers hold one `Store` each (opened after fork). Entity reads used by routing, the
inter-worker queues (inbound events, channel outbox, container and worker requests) and
the small host_state key/value table all live here, so SQL does not leak into loops.
A method that queues work for another worker nudges it after its commit (`nudge`).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from nanoclaw import nudge
from nanoclaw.db.admin import AdminQueries
from nanoclaw.db.central import atomic, data_version, open_central
from nanoclaw.db.channels import ChannelQueries
from nanoclaw.util import FOLDER_NAME, new_id, utcnow


def _d(row: sqlite3.Row | None) -> dict[str, Any] | None:
    return dict(row) if row is not None else None


class Store(ChannelQueries, AdminQueries):
    def __init__(self, conn: sqlite3.Connection, data_dir: Path | None = None):
        self.conn = conn
        self.data_dir = data_dir  # where the workers' nudge sockets are; None: no nudges

    @classmethod
    def open(cls, data_dir: Path, create: bool = True) -> "Store":
        return cls(open_central(data_dir, create=create), data_dir)

    def nudge(self, *workers: str) -> None:
        """Wake workers now rather than at their next poll (after a commit; best effort)."""
        if self.data_dir is not None:
            nudge.send(self.data_dir, *workers)

    def close(self) -> None:
        self.conn.close()

    def version(self) -> int:
        return data_version(self.conn)

    def q(self, sql: str, args: tuple | dict = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, args)]

    def q1(self, sql: str, args: tuple | dict = ()) -> dict[str, Any] | None:
        return _d(self.conn.execute(sql, args).fetchone())

    # ---- host state -------------------------------------------------------------------
    def get_state(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM host_state WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_state(self, key: str, value: str | None) -> None:
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO host_state (key, value, updated_at) VALUES (?,?,?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
                (key, value, utcnow()),
            )

    # ---- entities ---------------------------------------------------------------------
    def ensure_user(self, user_id: str, kind: str, display_name: str | None = None) -> None:
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO users (id, kind, display_name, created_at) VALUES (?,?,?,?)"
                " ON CONFLICT(id) DO UPDATE SET display_name=COALESCE(excluded.display_name,"
                " users.display_name)",
                (user_id, kind, display_name, utcnow()),
            )

    # ---- who may do what (checked on the host only) ----
    def is_owner(self, uid: str) -> bool:
        return self.q1("SELECT 1 AS x FROM user_roles WHERE user_id=? AND role='owner'", (uid,)) is not None

    def is_admin(self, uid: str, agent_group_id: str) -> bool:
        """Owner, global admin, or admin of this agent group."""
        return self.q1(
            "SELECT 1 AS x FROM user_roles WHERE user_id=? AND (role='owner' OR (role='admin' AND"
            " (agent_group_id IS NULL OR agent_group_id=?)))", (uid, agent_group_id)) is not None

    def can_access(self, uid: str | None, agent_group_id: str) -> bool:
        """unknown → deny; owner/global admin/group admin/member → allow; else deny."""
        if not uid:
            return False
        if self.is_admin(uid, agent_group_id):
            return True
        return self.q1("SELECT 1 AS x FROM agent_group_members WHERE user_id=? AND agent_group_id=?",
                        (uid, agent_group_id)) is not None

    def may_send(self, session: dict[str, Any], channel_type: str | None,
                 platform_id: str | None) -> bool:
        """May something be sent to this chat on behalf of this session? Its own chat, or a
        chat its agent group has a destination for (the ACL). Applies to the agent's output
        and to every message the host writes for the session alike."""
        if not channel_type or not platform_id:
            return False
        if self.own_chat(session) == (channel_type, platform_id):
            return True
        return self.q1(
            "SELECT 1 AS x FROM agent_destinations d JOIN messaging_groups m ON m.id=d.target_id"
            " WHERE d.agent_group_id=? AND d.target_type='channel' AND m.channel_type=?"
            " AND m.platform_id=?", (session["agent_group_id"], channel_type, platform_id)) is not None

    def own_chat(self, session: dict[str, Any]) -> tuple[str, str] | None:
        """(channel type, platform id) of the chat a session belongs to; None for an
        agent-shared session or a chat since removed."""
        if not session["messaging_group_id"]:
            return None
        mg = self.q1("SELECT channel_type, platform_id FROM messaging_groups WHERE id=?",
                     (session["messaging_group_id"],))
        return (mg["channel_type"], mg["platform_id"]) if mg else None

    def messaging_group(self, channel_type: str, platform_id: str) -> dict[str, Any] | None:
        return self.q1(
            "SELECT * FROM messaging_groups WHERE channel_type=? AND platform_id=?",
            (channel_type, platform_id),
        )

    def wirings(self, messaging_group_id: str) -> list[dict[str, Any]]:
        return self.q(
            "SELECT w.*, a.folder, a.name AS agent_name FROM messaging_group_agents w"
            " JOIN agent_groups a ON a.id = w.agent_group_id"
            " WHERE w.messaging_group_id=? ORDER BY w.priority DESC, w.created_at",
            (messaging_group_id,),
        )

    def agent_group(self, agent_group_id: str) -> dict[str, Any] | None:
        return self.q1("SELECT * FROM agent_groups WHERE id=?", (agent_group_id,))

    def container_config(self, agent_group_id: str) -> dict[str, Any]:
        return self.q1(
            "SELECT * FROM container_configs WHERE agent_group_id=?", (agent_group_id,)
        ) or {"agent_group_id": agent_group_id, "max_messages_per_prompt": 10}

    def destinations(self, agent_group_id: str) -> list[dict[str, Any]]:
        """The agent's name map, projected into each session's inbound.db."""
        rows = self.q(
            "SELECT d.local_name AS name, d.target_type AS type,"
            " m.name AS mg_name, m.channel_type, m.platform_id, a.id AS ag_id, a.name AS ag_name"
            " FROM agent_destinations d"
            " LEFT JOIN messaging_groups m ON d.target_type='channel' AND m.id=d.target_id"
            " LEFT JOIN agent_groups a ON d.target_type='agent' AND a.id=d.target_id"
            " WHERE d.agent_group_id=? ORDER BY d.local_name",
            (agent_group_id,),
        )
        out = []
        for r in rows:
            if r["type"] == "channel" and r["platform_id"] is not None:
                out.append({"name": r["name"], "display_name": r["mg_name"] or r["name"],
                            "type": "channel", "channel_type": r["channel_type"],
                            "platform_id": r["platform_id"], "agent_group_id": None})
            elif r["type"] == "agent" and r["ag_id"] is not None:
                out.append({"name": r["name"], "display_name": r["ag_name"], "type": "agent",
                            "channel_type": "agent", "platform_id": r["ag_id"],
                            "agent_group_id": r["ag_id"]})
        return out

    def create_agent_group(self, name: str, folder: str, provider: str, model: str,
                           assistant_name: str) -> str:
        with atomic(self.conn):
            return _insert_agent_group(self.conn, name, folder, provider, model, assistant_name)

    def free_folder(self, name: str) -> str:
        """`name`, or `name-2`, `name-3`, … : the first valid folder no agent group has."""
        return _free_folder(self.conn, name)

    def create_messaging_group(self, channel_type: str, platform_id: str, name: str | None,
                               is_group: bool, policy: str = "strict") -> str:
        mg = new_id("mg")
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO messaging_groups (id, channel_type, platform_id, name, is_group,"
                " unknown_sender_policy, created_at) VALUES (?,?,?,?,?,?,?)",
                (mg, channel_type, platform_id, name, int(is_group), policy, utcnow()))
        return mg

    def wire(self, mg: str, ag: str, *, destination: str, engage_mode: str = "pattern",
             engage_pattern: str | None = ".", sender_scope: str = "all",
             ignored: str = "drop", session_mode: str = "shared", priority: int = 0) -> str:
        """Wire a chat to an agent and give the agent a destination name for the chat."""
        with atomic(self.conn):
            return _wire_rows(self.conn, mg, ag, destination=destination,
                              engage_mode=engage_mode, engage_pattern=engage_pattern,
                              sender_scope=sender_scope, ignored=ignored,
                              session_mode=session_mode, priority=priority)

    def add_agent_destination(self, agent_group_id: str, local_name: str,
                              target_agent_group_id: str) -> None:
        with atomic(self.conn):
            self.conn.execute(
                "INSERT OR IGNORE INTO agent_destinations (agent_group_id, local_name,"
                " target_type, target_id, created_at) VALUES (?,?,'agent',?,?)",
                (agent_group_id, local_name, target_agent_group_id, utcnow()))

    def grant_role(self, user_id: str, role: str, agent_group_id: str | None = None,
                   granted_by: str | None = None) -> None:
        with atomic(self.conn):
            self.conn.execute(  # DO NOTHING on a duplicate; a CHECK violation still raises
                "INSERT INTO user_roles (user_id, role, agent_group_id, granted_by,"
                " granted_at) VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                (user_id, role, agent_group_id, granted_by, utcnow()))

    def record_unregistered(self, channel_type: str, platform_id: str, user_id: str | None,
                            sender_name: str | None, reason: str, mg: str | None = None,
                            ag: str | None = None) -> None:
        now = utcnow()
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO unregistered_senders (channel_type, platform_id, user_id, sender_name,"
                " reason, messaging_group_id, agent_group_id, message_count, first_seen, last_seen)"
                " VALUES (?,?,?,?,?,?,?,1,?,?) ON CONFLICT(channel_type, platform_id) DO UPDATE SET"
                " message_count=message_count+1, last_seen=excluded.last_seen,"
                " reason=excluded.reason, user_id=excluded.user_id",
                (channel_type, platform_id, user_id, sender_name, reason, mg, ag, now, now))

    # ---- sessions ---------------------------------------------------------------------
    def session(self, session_id: str) -> dict[str, Any] | None:
        return self.q1("SELECT * FROM sessions WHERE id=?", (session_id,))

    def find_session(self, ag: str, mg: str | None, thread_id: str | None,
                     mode: str) -> dict[str, Any] | None:
        if mode == "agent-shared":
            return self.q1("SELECT * FROM sessions WHERE agent_group_id=? AND status='active'"
                           " ORDER BY created_at DESC LIMIT 1", (ag,))
        if mode == "per-thread":
            return self.q1("SELECT * FROM sessions WHERE agent_group_id=? AND messaging_group_id=?"
                           " AND thread_id IS ? AND status='active'", (ag, mg, thread_id))
        return self.q1("SELECT * FROM sessions WHERE agent_group_id=? AND messaging_group_id=?"
                       " AND thread_id IS NULL AND status='active'", (ag, mg))

    def create_session(self, ag: str, mg: str | None, thread_id: str | None,
                       provider: str | None) -> dict[str, Any]:
        sid = new_id("sess")
        now = utcnow()
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO sessions (id, agent_group_id, messaging_group_id, thread_id,"
                " agent_provider, created_at, last_active) VALUES (?,?,?,?,?,?,?)",
                (sid, ag, mg, thread_id, provider, now, now))
        return self.session(sid)  # type: ignore[return-value]

    def touch_session(self, session_id: str) -> None:
        with atomic(self.conn):
            self.conn.execute("UPDATE sessions SET last_active=? WHERE id=?",
                              (utcnow(), session_id))

    def set_container(self, session_id: str, status: str, container_id: str | None = None,
                      token_hash: str | None = None) -> None:
        with atomic(self.conn):
            if status == "running":
                self.conn.execute(
                    "UPDATE sessions SET container_status='running', container_id=?,"
                    " token_hash=?, spawned_at=? WHERE id=?",
                    (container_id, token_hash, utcnow(), session_id))
            else:
                self.conn.execute(
                    "UPDATE sessions SET container_status=?, container_id=NULL, token_hash=NULL"
                    " WHERE id=?", (status, session_id))

    def sessions_where(self, where: str, args: tuple = ()) -> list[dict[str, Any]]:
        return self.q(f"SELECT * FROM sessions WHERE {where}", args)

    def session_for_token(self, token_hash: str) -> dict[str, Any] | None:
        return self.q1("SELECT * FROM sessions WHERE token_hash=? AND container_status='running'",
                       (token_hash,))

    # ---- agents' question cards (H3) ---------------------------------------------------
    def open_question_card(self, session_id: str, message_out_id: str, question_id: Any,
                           channel_type: str, platform_id: str, thread_id: str | None,
                           title: Any, options: Any, created_at: str) -> str:
        """Name an agent's question card with a host id (`q-…`) and remember whose it is;
        the same message asks once (a redelivery gets the same card id). The agent's own
        `questionId` is kept only to hand back with the answer: a card id is never
        something the agent chose, so it cannot name an approval or another card."""
        with atomic(self.conn):
            row = self.conn.execute(
                "SELECT card_id FROM pending_questions WHERE session_id=? AND message_out_id=?",
                (session_id, message_out_id)).fetchone()
            if row is not None:
                return row[0]
            card_id = new_id("q")
            self.conn.execute(
                "INSERT INTO pending_questions (card_id, question_id, session_id,"
                " message_out_id, platform_id, channel_type, thread_id, title, options_json,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (card_id, str(question_id or card_id), session_id, message_out_id, platform_id,
                 channel_type, thread_id, None if title is None else str(title),
                 json.dumps(options if isinstance(options, list) else []), created_at))
        return card_id

    def question_card(self, card_id: str) -> dict[str, Any] | None:
        """The open question card with this host card id."""
        return self.q1("SELECT * FROM pending_questions WHERE card_id=?", (card_id,))

    def question_cards_asking(self, channel_type: str, platform_id: str,
                              question_id: str) -> list[dict[str, Any]]:
        """Open cards sent to one chat under an agent's own question id (for a click that
        names that id instead of the card's)."""
        return self.q("SELECT * FROM pending_questions WHERE channel_type=? AND platform_id=?"
                      " AND question_id=?", (channel_type, platform_id, question_id))

    def close_question_card(self, card_id: str) -> None:
        with atomic(self.conn):
            self.conn.execute("DELETE FROM pending_questions WHERE card_id=?", (card_id,))

    # ---- inbound events (channel → router) --------------------------------------------
    def enqueue_inbound(self, channel_type: str, platform_id: str, message_id: str,
                        payload: dict[str, Any], thread_id: str | None = None,
                        kind: str = "chat") -> tuple[int, bool]:
        """Store a platform event durably; (row id, False) if it was already stored."""
        with atomic(self.conn):
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO inbound_events (channel_type, platform_id, thread_id,"
                " message_id, kind, payload, received_at) VALUES (?,?,?,?,?,?,?)",
                (channel_type, platform_id, thread_id, message_id, kind, json.dumps(payload),
                 utcnow()))
            new = bool(cur.rowcount)
            row_id = cur.lastrowid if new else self.conn.execute(
                "SELECT id FROM inbound_events WHERE channel_type=? AND platform_id=?"
                " AND message_id=?", (channel_type, platform_id, message_id)).fetchone()[0]
        if new:
            self.nudge("router")
        return row_id, new  # type: ignore[return-value]

    def pending_inbound(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.q("SELECT * FROM inbound_events WHERE status='pending' ORDER BY id LIMIT ?",
                      (limit,))

    def mark_routed(self, event_id: int) -> None:
        with atomic(self.conn):
            self.conn.execute("UPDATE inbound_events SET status='routed', routed_at=? WHERE id=?",
                              (utcnow(), event_id))

    def mark_inbound_error(self, event_id: int, error: str, final: bool) -> None:
        with atomic(self.conn):
            self.conn.execute(
                "UPDATE inbound_events SET attempts=attempts+1, error=?, status=? WHERE id=?",
                (error, "failed" if final else "pending", event_id))

    # ---- channel outbox (delivery → channel) ------------------------------------------
    def enqueue_send(self, idem_key: str, channel_type: str, platform_id: str,
                     thread_id: str | None, kind: str, content: dict[str, Any],
                     session_id: str | None = None, message_out_id: str | None = None,
                     in_reply_to: str | None = None) -> bool:
        with atomic(self.conn):
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO channel_outbox (idem_key, session_id, message_out_id,"
                " channel_type, platform_id, thread_id, in_reply_to, kind, content, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (idem_key, session_id, message_out_id, channel_type, platform_id, thread_id,
                 in_reply_to, kind, json.dumps(content), utcnow()))
        if cur.rowcount:
            self.nudge(f"channel:{channel_type}")
        return bool(cur.rowcount)

    def due_sends(self, channel_type: str, limit: int = 100) -> list[dict[str, Any]]:
        return self.q(
            "SELECT * FROM channel_outbox WHERE channel_type=? AND status='pending'"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY id LIMIT ?",
            (channel_type, utcnow(), limit))

    def next_send_due(self, channel_type: str) -> str | None:
        row = self.conn.execute(
            "SELECT MIN(next_attempt_at) FROM channel_outbox WHERE channel_type=?"
            " AND status='pending'", (channel_type,)).fetchone()
        return row[0]

    def mark_sent(self, send_id: int, platform_message_id: str | None) -> None:
        with atomic(self.conn):
            self.conn.execute(
                "UPDATE channel_outbox SET status='sent', platform_message_id=?, sent_at=?,"
                " attempts=attempts+1 WHERE id=?", (platform_message_id, utcnow(), send_id))
        self.nudge("delivery")  # it records the result in the session

    def mark_send_error(self, send_id: int, error: str, next_attempt_at: str | None) -> None:
        """Retry at next_attempt_at, or fail for good when it is None."""
        with atomic(self.conn):
            self.conn.execute(
                "UPDATE channel_outbox SET attempts=attempts+1, error=?, next_attempt_at=?,"
                " status=? WHERE id=?",
                (error, next_attempt_at, "pending" if next_attempt_at else "failed", send_id))
        if next_attempt_at is None:
            self.nudge("delivery")  # it tells the agent

    def unrecorded_sends(self, limit: int = 200) -> list[dict[str, Any]]:
        return self.q("SELECT * FROM channel_outbox WHERE recorded=0 AND status IN"
                      " ('sent','failed') ORDER BY id LIMIT ?", (limit,))

    def mark_recorded(self, send_id: int) -> None:
        with atomic(self.conn):
            self.conn.execute("UPDATE channel_outbox SET recorded=1 WHERE id=?", (send_id,))

    # ---- container requests (router/sweep → containers) -------------------------------
    def request_container(self, session_id: str, action: str, reason: str) -> None:
        """Ask for a wake or kill; skipped when the newest open request for the session
        already asks the same (order matters: kill then wake is a restart)."""
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO container_requests (session_id, action, reason, created_at)"
                " SELECT ?,?,?,? WHERE NOT EXISTS (SELECT 1 FROM container_requests WHERE"
                " id=(SELECT MAX(id) FROM container_requests WHERE session_id=? AND"
                " handled_at IS NULL) AND action=?)",
                (session_id, action, reason, utcnow(), session_id, action))
        self.nudge("containers")

    def open_container_requests(self) -> list[dict[str, Any]]:
        return self.q("SELECT * FROM container_requests WHERE handled_at IS NULL ORDER BY id")

    def close_container_requests(self, ids: list[int]) -> None:
        with atomic(self.conn):
            self.conn.executemany("UPDATE container_requests SET handled_at=? WHERE id=?",
                                  [(utcnow(), i) for i in ids])

    # ---- workers (orchestrator ↔ CLI) -------------------------------------------------
    def save_worker(self, name: str, **fields: Any) -> None:
        fields["updated_at"] = utcnow()
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        upd = ", ".join(f"{k}=excluded.{k}" for k in fields)
        with atomic(self.conn):
            self.conn.execute(
                f"INSERT INTO workers (name, {cols}) VALUES (?, {marks})"
                f" ON CONFLICT(name) DO UPDATE SET {upd}", (name, *fields.values()))

    def workers(self) -> list[dict[str, Any]]:
        return self.q("SELECT * FROM workers ORDER BY name")

    def request_worker(self, name: str, action: str) -> None:
        with atomic(self.conn):
            self.conn.execute("INSERT INTO worker_requests (worker, action, created_at)"
                              " VALUES (?,?,?)", (name, action, utcnow()))
        self.nudge("host")

    def take_worker_requests(self) -> list[dict[str, Any]]:
        with atomic(self.conn):
            rows = self.q("SELECT * FROM worker_requests WHERE handled_at IS NULL ORDER BY id")
            self.conn.execute("UPDATE worker_requests SET handled_at=? WHERE handled_at IS NULL",
                              (utcnow(),))
        return rows

    # ---- token usage and budgets (broker) ---------------------------------------------
    def add_usage(self, agent_group_id: str, day: str, usage: dict[str, int]) -> None:
        """Count one model request's tokens against the group's day."""
        cols = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                "cache_read_input_tokens")
        vals = [int(usage.get(c) or 0) for c in cols]
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO token_usage (agent_group_id, day, requests, input_tokens,"
                " output_tokens, cache_creation_input_tokens, cache_read_input_tokens,"
                " updated_at) VALUES (?,?,1,?,?,?,?,?) ON CONFLICT(agent_group_id, day) DO"
                " UPDATE SET requests=requests+1, input_tokens=input_tokens+excluded.input_tokens,"
                " output_tokens=output_tokens+excluded.output_tokens,"
                " cache_creation_input_tokens=cache_creation_input_tokens"
                "+excluded.cache_creation_input_tokens,"
                " cache_read_input_tokens=cache_read_input_tokens"
                "+excluded.cache_read_input_tokens, updated_at=excluded.updated_at",
                (agent_group_id, day, *vals, utcnow()))

    def tokens_used(self, agent_group_id: str, day: str) -> int:
        row = self.conn.execute(
            "SELECT input_tokens + output_tokens + cache_creation_input_tokens"
            " + cache_read_input_tokens FROM token_usage WHERE agent_group_id=? AND day=?",
            (agent_group_id, day)).fetchone()
        return int(row[0]) if row else 0

    def token_budget(self, agent_group_id: str) -> int | None:
        """The group's own daily budget (container_configs), None when it has none."""
        row = self.conn.execute(
            "SELECT daily_token_budget FROM container_configs WHERE agent_group_id=?",
            (agent_group_id,)).fetchone()
        return row[0] if row and row[0] is not None else None

    # ---- a channel's chats and the agents they talk to (the web page's list) ----------
    def agent_groups(self) -> list[dict[str, Any]]:
        """Every agent group, oldest first: id, name, folder."""
        return self.q("SELECT id, name, folder FROM agent_groups ORDER BY created_at, id")

    def channel_chats(self, channel_type: str) -> list[dict[str, Any]]:
        """A channel's messaging groups, oldest first: id, platform_id, name, created_at,
        `last_activity` (the newest of its creation, its inbound events and its sent
        messages; a stored timestamp) and `agents` (the wired agent groups by priority,
        each id, name, folder)."""
        chats = self.q(
            "SELECT m.id, m.platform_id, m.name, m.created_at, MAX(m.created_at,"
            " COALESCE((SELECT MAX(i.received_at) FROM inbound_events i WHERE"
            " i.channel_type=m.channel_type AND i.platform_id=m.platform_id), ''),"
            " COALESCE((SELECT MAX(COALESCE(o.sent_at, o.created_at)) FROM channel_outbox o"
            " WHERE o.channel_type=m.channel_type AND o.platform_id=m.platform_id"
            " AND o.status='sent'), '')) AS last_activity"
            " FROM messaging_groups m WHERE m.channel_type=? ORDER BY m.created_at, m.id",
            (channel_type,))
        wired: dict[str, list[dict[str, Any]]] = {}
        for r in self.q(
                "SELECT w.messaging_group_id AS mg, a.id, a.name, a.folder"
                " FROM messaging_group_agents w JOIN agent_groups a ON a.id=w.agent_group_id"
                " JOIN messaging_groups m ON m.id=w.messaging_group_id WHERE m.channel_type=?"
                " ORDER BY w.priority DESC, w.created_at", (channel_type,)):
            wired.setdefault(r.pop("mg"), []).append(r)
        for c in chats:
            c["agents"] = wired.get(c["id"], [])
        return chats

    def delete_messaging_group(self, messaging_group_id: str) -> None:
        """Remove a chat, its wirings and the destination names that point at it."""
        with atomic(self.conn):
            self.conn.execute("DELETE FROM agent_destinations WHERE target_type='channel'"
                              " AND target_id=?", (messaging_group_id,))
            self.conn.execute("DELETE FROM messaging_groups WHERE id=?", (messaging_group_id,))

    # ---- decisions that write several rows: one transaction each (habit 8) ------------
    # The methods above each open their own transaction, and SQLite transactions do not
    # nest, so a decision cannot be built from them: these do the whole decision inside
    # one `atomic` through the `_…` helpers below. A failure anywhere writes nothing.
    def admit_sender(self, approval_id: str, added_by: str | None) -> bool:
        """Close a sender approval as allowed and make the sender a member, together;
        False (nothing written) when it was already closed."""
        with atomic(self.conn):
            row = self.conn.execute("SELECT sender_identity, agent_group_id FROM"
                                    " pending_sender_approvals WHERE id=?",
                                    (approval_id,)).fetchone()
            if row is None:
                return False
            self.conn.execute("DELETE FROM pending_sender_approvals WHERE id=?", (approval_id,))
            _add_member(self.conn, row[0], row[1], added_by)
        return True

    def deny_sender(self, approval_id: str) -> bool:
        """Close a sender approval as denied; False when it was already closed."""
        with atomic(self.conn):
            cur = self.conn.execute("DELETE FROM pending_sender_approvals WHERE id=?",
                                    (approval_id,))
        return bool(cur.rowcount)

    def refuse_chat(self, messaging_group_id: str) -> bool:
        """Close a chat's approval as rejected and mark the chat denied (it stays quiet);
        False (nothing written) when it was already closed."""
        with atomic(self.conn):
            cur = self.conn.execute("DELETE FROM pending_channel_approvals WHERE"
                                    " messaging_group_id=?", (messaging_group_id,))
            if not cur.rowcount:
                return False
            self.conn.execute("UPDATE messaging_groups SET denied_at=? WHERE id=?",
                              (utcnow(), messaging_group_id))
        return True

    def connect_chat(self, messaging_group_id: str, agent_group_id: str,
                     wiring: dict[str, Any], member: str | None,
                     added_by: str | None) -> str:
        """Close a chat's approval by wiring the chat to an existing agent (`wiring`: the
        keyword arguments of `wire`) and admitting `member`, all or nothing. Checked first,
        inside the same transaction: "no agent" (the agent group is gone) and "closed"
        (already decided) write nothing and leave the approval as it was; else
        "connected" (a chat wired to the agent meanwhile, say from the terminal, keeps
        that wiring)."""
        with atomic(self.conn):
            if self.conn.execute("SELECT 1 FROM agent_groups WHERE id=?",
                                 (agent_group_id,)).fetchone() is None:
                return "no agent"
            cur = self.conn.execute("DELETE FROM pending_channel_approvals WHERE"
                                    " messaging_group_id=?", (messaging_group_id,))
            if not cur.rowcount:
                return "closed"
            if not self.conn.execute("SELECT 1 FROM messaging_group_agents WHERE"
                                     " messaging_group_id=? AND agent_group_id=?",
                                     (messaging_group_id, agent_group_id)).fetchone():
                _wire_rows(self.conn, messaging_group_id, agent_group_id, **wiring)
            if member:
                _add_member(self.conn, member, agent_group_id, added_by)
        return "connected"

    def create_agent_for_chat(self, messaging_group_id: str, named_by: str, name: str,
                              provider: str, model: str, wiring: dict[str, Any],
                              member: str | None) -> tuple[str, str] | None:
        """"Connect new agent", once named: close the chat's approval (only while it still
        waits for `named_by`'s name), create agent group `name` in a free folder, wire the
        chat to it and admit `member`, all or nothing. (id, folder), or None (nothing
        written) when the approval no longer waits for this name. The folder on disk is
        the caller's, after the commit."""
        with atomic(self.conn):
            cur = self.conn.execute("DELETE FROM pending_channel_approvals WHERE"
                                    " messaging_group_id=? AND naming_by=?",
                                    (messaging_group_id, named_by))
            if not cur.rowcount:
                return None
            folder = _free_folder(self.conn, name)
            ag = _insert_agent_group(self.conn, name, folder, provider, model, name)
            _wire_rows(self.conn, messaging_group_id, ag, **wiring)
            if member:
                _add_member(self.conn, member, ag, named_by)
        return ag, folder

    def install_first_agent(self, name: str, folder: str, provider: str, model: str,
                            owner: str, owner_kind: str, channel_type: str, platform_id: str,
                            is_group: bool, wiring: dict[str, Any]) -> str:
        """`init-first-agent` as one transaction: the agent group in `folder` (found, else
        created) with the global `ncl` scope, `owner` made a user and the owner, the chat
        (found, else created) wired to the agent unless it already is. Returns the agent
        group id. Every step is find-or-create, so running it again is harmless; a
        failure writes nothing. The folder on disk is the caller's, after the commit."""
        with atomic(self.conn):
            row = self.conn.execute("SELECT id FROM agent_groups WHERE folder=?",
                                    (folder,)).fetchone()
            ag = row[0] if row else _insert_agent_group(self.conn, name, folder, provider,
                                                        model, name)
            self.conn.execute("UPDATE container_configs SET cli_scope='global' WHERE"
                              " agent_group_id=?", (ag,))
            _upsert_user(self.conn, owner, owner_kind)
            self.conn.execute(
                "INSERT INTO user_roles (user_id, role, agent_group_id, granted_by,"
                " granted_at) VALUES (?,'owner',NULL,NULL,?) ON CONFLICT DO NOTHING",
                (owner, utcnow()))
            row = self.conn.execute("SELECT id FROM messaging_groups WHERE channel_type=? AND"
                                    " platform_id=?", (channel_type, platform_id)).fetchone()
            mg = row[0] if row else new_id("mg")
            if row is None:
                self.conn.execute(
                    "INSERT INTO messaging_groups (id, channel_type, platform_id, name, is_group,"
                    " unknown_sender_policy, created_at) VALUES (?,?,?,NULL,?,'strict',?)",
                    (mg, channel_type, platform_id, int(is_group), utcnow()))
            if not self.conn.execute("SELECT 1 FROM messaging_group_agents WHERE"
                                     " messaging_group_id=? AND agent_group_id=?",
                                     (mg, ag)).fetchone():
                _wire_rows(self.conn, mg, ag, **wiring)
        return ag


# ---- statements shared by the decisions above; run inside the caller's transaction ----
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
