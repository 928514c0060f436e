"""The central-DB statements only the admin operations run (`nanoclaw groups …`,
`users …`, `wire …`, the host verbs' counts, and the agent's `ncl`). A mixin of `Store`:
one method per intent, one transaction each. An unknown id is `NotFound`, a change the
data does not permit is `Refused`; the message is the one line the asker sees."""

from __future__ import annotations

import sqlite3
from typing import Any

from nanoclaw.db.central import atomic
from nanoclaw.db.rows import Queries
from nanoclaw.errors import NotFound, Refused
from nanoclaw.util import utcnow

# what `update_group_config` may set (the names are written into the statement)
CONFIG_COLUMNS = ("provider", "model", "fallback_model", "cli_scope", "skills",
                  "daily_token_budget", "additional_mounts", "upstream", "fallback_upstream")


class AdminQueries(Queries):
    """`wire_chat` also calls Store's `messaging_group`, `create_messaging_group` and
    `wire` (not stubbed here: a stub in a mixin listed before theirs would hide them)."""

    # ---- agent groups -----------------------------------------------------------------
    def find_agent_group(self, ref: str) -> dict[str, Any]:
        """The agent group with this id or folder; NotFound if none."""
        row = self._row("SELECT * FROM agent_groups WHERE id=? OR folder=?", (ref, ref))
        if row is None:
            raise NotFound(f"unknown agent group {ref!r}")
        return row

    def groups_overview(self, agent_group_id: str | None = None) -> list[dict[str, Any]]:
        """Every agent group (or one) with its provider, models and own daily budget."""
        where, args = ("WHERE g.id=?", (agent_group_id,)) if agent_group_id else ("", ())
        return self._rows(
            "SELECT g.id, g.name, g.folder, COALESCE(NULLIF(c.provider, ''), g.agent_provider)"
            " AS provider, c.model, c.fallback_model AS fallback, c.upstream,"
            " c.fallback_upstream, c.daily_token_budget FROM agent_groups g"
            " LEFT JOIN container_configs c"
            f" ON c.agent_group_id=g.id {where} ORDER BY g.created_at", args)

    def folder_taken(self, folder: str) -> bool:
        return self._row("SELECT 1 AS x FROM agent_groups WHERE folder=?", (folder,)) is not None

    def remove_agent_group(self, agent_group_id: str) -> None:
        with atomic(self.conn):
            self.conn.execute("DELETE FROM agent_groups WHERE id=?", (agent_group_id,))

    def update_group_config(self, agent_group_id: str, name: str | None = None,
                            **cols: Any) -> None:
        """Rename the group (if `name`) and set these `container_configs` columns (None
        writes NULL), making its config row first if it predates container_configs."""
        bad = set(cols) - set(CONFIG_COLUMNS)
        if bad:
            raise ValueError(f"not a container_configs setting: {', '.join(sorted(bad))}")
        with atomic(self.conn):
            self.conn.execute("INSERT OR IGNORE INTO container_configs (agent_group_id,"
                              " updated_at) VALUES (?,?)", (agent_group_id, utcnow()))
            if name:
                self.conn.execute("UPDATE agent_groups SET name=? WHERE id=?",
                                  (name, agent_group_id))
            if cols:
                sets = ", ".join(f"{c}=?" for c in cols)
                self.conn.execute(f"UPDATE container_configs SET {sets}, updated_at=? WHERE"
                                  " agent_group_id=?", (*cols.values(), utcnow(), agent_group_id))

    def skills_by_group(self) -> list[dict[str, Any]]:
        """Each group's folder and its stored `skills` (NULL: all)."""
        return self._rows("SELECT g.folder, c.skills FROM agent_groups g LEFT JOIN"
                          " container_configs c ON c.agent_group_id=g.id ORDER BY g.folder")

    # ---- wiring and destinations ------------------------------------------------------
    def wirings_overview(self) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT w.id, m.channel_type, m.platform_id, g.folder AS agent, w.engage_mode,"
            " w.engage_pattern, w.sender_scope, w.ignored_message_policy AS ignored,"
            " w.session_mode, w.priority FROM messaging_group_agents w JOIN messaging_groups m"
            " ON m.id=w.messaging_group_id JOIN agent_groups g ON g.id=w.agent_group_id"
            " ORDER BY m.platform_id, w.priority DESC")

    def wire_chat(self, channel_type: str, platform_id: str, agent_group_id: str, *,
                  is_group: bool, policy: str | None, **wiring: Any) -> str:
        """Wire a chat (found, else made) to an agent; Refused if it already is. Three
        short transactions (the chat, the wiring, its sender policy): `Store.wire`'s
        statements are private to store.py."""
        mg = self.messaging_group(channel_type, platform_id)
        mg_id = mg["id"] if mg else self.create_messaging_group(channel_type, platform_id,
                                                                None, is_group)
        if self._row("SELECT 1 AS x FROM messaging_group_agents WHERE messaging_group_id=? AND"
                     " agent_group_id=?", (mg_id, agent_group_id)):
            raise Refused("that chat is already wired to that agent")
        try:
            wid = self.wire(mg_id, agent_group_id, **wiring)
        except sqlite3.IntegrityError:
            raise Refused("that chat is already wired to that agent") from None
        if policy:
            with atomic(self.conn):
                self.conn.execute("UPDATE messaging_groups SET unknown_sender_policy=? WHERE"
                                  " id=?", (policy, mg_id))
        return wid

    def remove_wiring(self, wiring_id: str) -> str:
        """Unwire; returns the agent group it belonged to. NotFound if no such wiring."""
        with atomic(self.conn):
            row = self.conn.execute("SELECT agent_group_id FROM messaging_group_agents WHERE"
                                    " id=?", (wiring_id,)).fetchone()
            if row is None:
                raise NotFound(f"unknown wiring {wiring_id!r}")
            self.conn.execute("DELETE FROM messaging_group_agents WHERE id=?", (wiring_id,))
        return row[0]

    def add_chat_destination(self, agent_group_id: str, name: str, channel_type: str,
                             platform_id: str) -> None:
        """Name a known chat for the agent; NotFound if the chat is unknown."""
        with atomic(self.conn):
            row = self.conn.execute("SELECT id FROM messaging_groups WHERE channel_type=? AND"
                                    " platform_id=?", (channel_type, platform_id)).fetchone()
            if row is None:
                raise NotFound(f"unknown chat {channel_type} {platform_id!r}")
            self.conn.execute("INSERT INTO agent_destinations VALUES (?,?,'channel',?,?)",
                              (agent_group_id, name, row[0], utcnow()))

    def remove_destination(self, agent_group_id: str, name: str) -> None:
        with atomic(self.conn):
            n = self.conn.execute("DELETE FROM agent_destinations WHERE agent_group_id=? AND"
                                  " local_name=?", (agent_group_id, name)).rowcount
        if not n:
            raise NotFound(f"no destination {name!r} for {agent_group_id}")

    # ---- users, roles, members ----------------------------------------------------------
    def users_overview(self) -> list[dict[str, Any]]:
        return self._rows("SELECT id, kind, display_name, created_at FROM users ORDER BY id")

    def find_user(self, user_id: str) -> dict[str, Any]:
        row = self._row("SELECT * FROM users WHERE id=?", (user_id,))
        if row is None:
            raise NotFound(f"unknown user {user_id!r}")
        return row

    def remove_user(self, user_id: str) -> None:
        with atomic(self.conn):
            n = self.conn.execute("DELETE FROM users WHERE id=?", (user_id,)).rowcount
        if not n:
            raise NotFound(f"unknown user {user_id!r}")

    def roles_overview(self) -> list[dict[str, Any]]:
        return self._rows("SELECT user_id, role, agent_group_id, granted_by, granted_at FROM"
                          " user_roles ORDER BY user_id")

    def revoke_role(self, user_id: str, role: str, agent_group_id: str | None) -> None:
        with atomic(self.conn):
            n = self.conn.execute("DELETE FROM user_roles WHERE user_id=? AND role=? AND"
                                  " agent_group_id IS ?", (user_id, role, agent_group_id)).rowcount
        if not n:
            raise NotFound(f"{user_id} has no such role")

    def members_overview(self, agent_group_id: str | None = None) -> list[dict[str, Any]]:
        where, args = ("WHERE agent_group_id=?", (agent_group_id,)) if agent_group_id \
            else ("", ())
        return self._rows("SELECT user_id, agent_group_id, added_by, added_at FROM"
                          f" agent_group_members {where} ORDER BY user_id", args)

    def add_member(self, user_id: str, agent_group_id: str, added_by: str) -> None:
        with atomic(self.conn):
            self.conn.execute("INSERT OR IGNORE INTO agent_group_members VALUES (?,?,?,?)",
                              (user_id, agent_group_id, added_by, utcnow()))

    def remove_member(self, user_id: str, agent_group_id: str) -> None:
        with atomic(self.conn):
            n = self.conn.execute("DELETE FROM agent_group_members WHERE user_id=? AND"
                                  " agent_group_id=?", (user_id, agent_group_id)).rowcount
        if not n:
            raise NotFound(f"{user_id} is not a member of {agent_group_id}")

    # ---- sessions, usage, sends, approvals ----------------------------------------------
    def session_counts(self) -> tuple[int, int]:
        """(active sessions, those with a running agent)."""
        n, r = self.conn.execute("SELECT COUNT(*), SUM(container_status='running') FROM"
                                 " sessions WHERE status='active'").fetchone()
        return n, r or 0

    def count_sends(self, status: str) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM channel_outbox WHERE status=?",
                                 (status,)).fetchone()[0]

    def usage_by_day(self, since: str, agent_group_id: str | None = None
                     ) -> list[dict[str, Any]]:
        """Token counts per group and day from `since` (a date), with the group's own
        daily budget (`own`, NULL: the default)."""
        where, args = "u.day >= ?", [since]
        if agent_group_id:
            where += " AND u.agent_group_id = ?"
            args.append(agent_group_id)
        return self._rows(
            "SELECT COALESCE(g.folder, u.agent_group_id) AS grp, u.day, u.requests,"
            " u.input_tokens AS input, u.output_tokens AS output,"
            " u.cache_creation_input_tokens AS cache_write,"
            " u.cache_read_input_tokens AS cache_read, c.daily_token_budget AS own"
            " FROM token_usage u LEFT JOIN agent_groups g ON g.id=u.agent_group_id"
            " LEFT JOIN container_configs c ON c.agent_group_id=u.agent_group_id"
            f" WHERE {where} ORDER BY grp, u.day", tuple(args))

    def approval_for_request(self, request_id: str, action: str) -> str | None:
        """The approval already asked for this request row, if any."""
        row = self.conn.execute("SELECT approval_id FROM pending_approvals WHERE request_id=?"
                                " AND action=?", (request_id, action)).fetchone()
        return row[0] if row else None
