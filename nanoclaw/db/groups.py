"""Agent groups and the chats they talk to: agent groups and their container configs,
messaging groups (chats), wirings, destinations, users and roles, and the who-may reads
the host checks everything against (`is_owner`, `is_admin`, `can_access`, `may_send`).
A mixin of `Store`."""

from __future__ import annotations

import json
from typing import Any

from nanoclaw.db.central import atomic
from nanoclaw.db.rows import (Queries, _free_folder, _insert_agent_group, _upsert_user,
                              _wire_rows)
from nanoclaw.util import new_id, utcnow


class GroupQueries(Queries):
    # ---- who may do what (checked on the host only) -----------------------------------
    def is_owner(self, uid: str) -> bool:
        return self._exists("SELECT 1 FROM user_roles WHERE user_id=? AND role='owner'", (uid,))

    def is_admin(self, uid: str, agent_group_id: str) -> bool:
        """Owner, global admin, or admin of this agent group."""
        return self._exists(
            "SELECT 1 FROM user_roles WHERE user_id=? AND (role='owner' OR (role='admin' AND"
            " (agent_group_id IS NULL OR agent_group_id=?)))", (uid, agent_group_id))

    def can_access(self, uid: str | None, agent_group_id: str) -> bool:
        """unknown → deny; owner/global admin/group admin/member → allow; else deny."""
        if not uid:
            return False
        if self.is_admin(uid, agent_group_id):
            return True
        return self._exists("SELECT 1 FROM agent_group_members WHERE user_id=? AND"
                            " agent_group_id=?", (uid, agent_group_id))

    def may_send(self, session: dict[str, Any], channel_type: str | None,
                 platform_id: str | None) -> bool:
        """May something be sent to this chat on behalf of this session? Its own chat, or a
        chat its agent group has a destination for (the ACL). Applies to the agent's output
        and to every message the host writes for the session alike."""
        if not channel_type or not platform_id:
            return False
        if self.own_chat(session) == (channel_type, platform_id):
            return True
        return self._exists(
            "SELECT 1 FROM agent_destinations d JOIN messaging_groups m ON m.id=d.target_id"
            " WHERE d.agent_group_id=? AND d.target_type='channel' AND m.channel_type=?"
            " AND m.platform_id=?", (session["agent_group_id"], channel_type, platform_id))

    def approvers(self, agent_group_id: str | None) -> list[str]:
        """Who may be asked to approve for an agent group, in order: its own admins, then
        global admins, then owners (each by when the role was granted); no duplicates."""
        rows = self._rows(
            "SELECT user_id FROM user_roles WHERE (role='admin' AND agent_group_id=?)"
            " OR (role='admin' AND agent_group_id IS NULL) OR role='owner'"
            " ORDER BY CASE WHEN role='owner' THEN 2 WHEN agent_group_id IS NULL THEN 1"
            " ELSE 0 END, granted_at", (agent_group_id,))
        return list(dict.fromkeys(r["user_id"] for r in rows))

    def user_dm(self, user_id: str) -> tuple[str, str] | None:
        """(channel type, platform id) of a user's DM chat once a send resolved one."""
        row = self._row("SELECT m.channel_type, m.platform_id FROM user_dms d JOIN"
                        " messaging_groups m ON m.id=d.messaging_group_id WHERE d.user_id=?",
                        (user_id,))
        return (row["channel_type"], row["platform_id"]) if row else None

    # ---- chats --------------------------------------------------------------------------
    def own_chat(self, session: dict[str, Any]) -> tuple[str, str] | None:
        """(channel type, platform id) of the chat a session belongs to; None for an
        agent-shared session or a chat since removed."""
        if not session["messaging_group_id"]:
            return None
        mg = self.messaging_group_by_id(session["messaging_group_id"])
        return (mg["channel_type"], mg["platform_id"]) if mg else None

    def messaging_group(self, channel_type: str, platform_id: str) -> dict[str, Any] | None:
        return self._row("SELECT * FROM messaging_groups WHERE channel_type=? AND platform_id=?",
                         (channel_type, platform_id))

    def messaging_group_by_id(self, messaging_group_id: str) -> dict[str, Any] | None:
        return self._row("SELECT * FROM messaging_groups WHERE id=?", (messaging_group_id,))

    def wirings(self, messaging_group_id: str) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT w.*, a.folder, a.name AS agent_name FROM messaging_group_agents w"
            " JOIN agent_groups a ON a.id = w.agent_group_id"
            " WHERE w.messaging_group_id=? ORDER BY w.priority DESC, w.created_at",
            (messaging_group_id,))

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

    def channel_chats(self, channel_type: str) -> list[dict[str, Any]]:
        """A channel's messaging groups, oldest first: id, platform_id, name, created_at,
        `last_activity` (the newest of its creation, its inbound events and its sent
        messages; a stored timestamp) and `agents` (the wired agent groups by priority,
        each id, name, folder)."""
        chats = self._rows(
            "SELECT m.id, m.platform_id, m.name, m.created_at, MAX(m.created_at,"
            " COALESCE((SELECT MAX(i.received_at) FROM inbound_events i WHERE"
            " i.channel_type=m.channel_type AND i.platform_id=m.platform_id), ''),"
            " COALESCE((SELECT MAX(COALESCE(o.sent_at, o.created_at)) FROM channel_outbox o"
            " WHERE o.channel_type=m.channel_type AND o.platform_id=m.platform_id"
            " AND o.status='sent'), '')) AS last_activity"
            " FROM messaging_groups m WHERE m.channel_type=? ORDER BY m.created_at, m.id",
            (channel_type,))
        wired: dict[str, list[dict[str, Any]]] = {}
        for r in self._rows(
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

    # ---- users and roles ----------------------------------------------------------------
    def ensure_user(self, user_id: str, kind: str, display_name: str | None = None) -> None:
        row = self._row("SELECT display_name FROM users WHERE id=?", (user_id,))
        if row is not None and (display_name is None or row["display_name"] == display_name):
            return  # known, nothing new: no write (the router asks at every message)
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO users (id, kind, display_name, created_at) VALUES (?,?,?,?)"
                " ON CONFLICT(id) DO UPDATE SET display_name=COALESCE(excluded.display_name,"
                " users.display_name)",
                (user_id, kind, display_name, utcnow()))

    def grant_role(self, user_id: str, role: str, agent_group_id: str | None = None,
                   granted_by: str | None = None) -> None:
        with atomic(self.conn):
            self.conn.execute(  # DO NOTHING on a duplicate; a CHECK violation still raises
                "INSERT INTO user_roles (user_id, role, agent_group_id, granted_by,"
                " granted_at) VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                (user_id, role, agent_group_id, granted_by, utcnow()))

    # ---- agent groups, their configs and destinations -----------------------------------
    def agent_group(self, agent_group_id: str) -> dict[str, Any] | None:
        return self._row("SELECT * FROM agent_groups WHERE id=?", (agent_group_id,))

    def agent_groups(self) -> list[dict[str, Any]]:
        """Every agent group, oldest first: id, name, folder."""
        return self._rows("SELECT id, name, folder FROM agent_groups ORDER BY created_at, id")

    def create_agent_group(self, name: str, folder: str, provider: str, model: str,
                           assistant_name: str) -> str:
        with atomic(self.conn):
            return _insert_agent_group(self.conn, name, folder, provider, model, assistant_name)

    def free_folder(self, name: str) -> str:
        """`name`, or `name-2`, `name-3`, … : the first valid folder no agent group has."""
        return _free_folder(self.conn, name)

    def container_config(self, agent_group_id: str) -> dict[str, Any]:
        return self._row("SELECT * FROM container_configs WHERE agent_group_id=?",
                         (agent_group_id,)) or {"agent_group_id": agent_group_id,
                                                "max_messages_per_prompt": 10}

    def set_packages(self, agent_group_id: str, apt: list[str], npm: list[str]) -> None:
        """The group's extra packages (the image is rebuilt with them at the next start)."""
        with atomic(self.conn):
            self.conn.execute("UPDATE container_configs SET packages_apt=?, packages_npm=?,"
                              " updated_at=? WHERE agent_group_id=?",
                              (json.dumps(apt), json.dumps(npm), utcnow(), agent_group_id))

    def set_mcp_servers(self, agent_group_id: str, servers: dict[str, Any]) -> None:
        with atomic(self.conn):
            self.conn.execute("UPDATE container_configs SET mcp_servers=?, updated_at=? WHERE"
                              " agent_group_id=?", (json.dumps(servers), utcnow(),
                                                    agent_group_id))

    def destinations(self, agent_group_id: str) -> list[dict[str, Any]]:
        """The agent's name map, projected into each session's inbound.db."""
        rows = self._rows(
            "SELECT d.local_name AS name, d.target_type AS type,"
            " m.name AS mg_name, m.channel_type, m.platform_id, a.id AS ag_id, a.name AS ag_name"
            " FROM agent_destinations d"
            " LEFT JOIN messaging_groups m ON d.target_type='channel' AND m.id=d.target_id"
            " LEFT JOIN agent_groups a ON d.target_type='agent' AND a.id=d.target_id"
            " WHERE d.agent_group_id=? ORDER BY d.local_name", (agent_group_id,))
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

    def has_destination(self, agent_group_id: str, local_name: str) -> bool:
        """Whether the agent already has a destination of this name."""
        return self._exists("SELECT 1 FROM agent_destinations WHERE agent_group_id=? AND"
                            " local_name=?", (agent_group_id, local_name))

    def may_message_agent(self, agent_group_id: str, target_agent_group_id: str) -> bool:
        """Whether an agent has a destination for another agent (its leave to message it)."""
        return self._exists("SELECT 1 FROM agent_destinations WHERE agent_group_id=? AND"
                            " target_type='agent' AND target_id=?",
                            (agent_group_id, target_agent_group_id))

    def add_agent_destination(self, agent_group_id: str, local_name: str,
                              target_agent_group_id: str) -> None:
        with atomic(self.conn):
            self.conn.execute(
                "INSERT OR IGNORE INTO agent_destinations (agent_group_id, local_name,"
                " target_type, target_id, created_at) VALUES (?,?,'agent',?,?)",
                (agent_group_id, local_name, target_agent_group_id, utcnow()))

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
