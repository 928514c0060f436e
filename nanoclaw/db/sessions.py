"""Sessions and what keeps their agents running: the `sessions` rows (found, created,
their container state and token), the containers worker's queue of wake and kill
requests, the workers table the orchestrator keeps for the CLI, and the small
`host_state` key/value table. A mixin of `Store`."""

from __future__ import annotations

from typing import Any

from nanoclaw.db.central import atomic
from nanoclaw.db.rows import Queries
from nanoclaw.util import new_id, utcnow


class SessionQueries(Queries):
    # ---- sessions ---------------------------------------------------------------------
    def session(self, session_id: str) -> dict[str, Any] | None:
        return self._row("SELECT * FROM sessions WHERE id=?", (session_id,))

    def active_sessions(self, agent_group_id: str | None = None) -> list[dict[str, Any]]:
        """Every active session (of one agent group, when given)."""
        if agent_group_id is None:
            return self._rows("SELECT * FROM sessions WHERE status='active'")
        return self._rows("SELECT * FROM sessions WHERE status='active' AND agent_group_id=?",
                          (agent_group_id,))

    def sessions_overview(self, limit: int = 200) -> list[dict[str, Any]]:
        """Active sessions with their agent group and chat, newest activity first (the
        web console's status view)."""
        return self._rows(
            "SELECT s.id, s.agent_group_id, g.name AS agent_name, g.folder, s.thread_id,"
            " m.channel_type, m.platform_id, s.container_status, s.spawned_at, s.last_active"
            " FROM sessions s JOIN agent_groups g ON g.id=s.agent_group_id"
            " LEFT JOIN messaging_groups m ON m.id=s.messaging_group_id"
            " WHERE s.status='active' ORDER BY s.last_active DESC LIMIT ?", (limit,))

    def watched_sessions(self, active_since: str) -> list[dict[str, Any]]:
        """Active sessions whose agent runs or that were active since `active_since`."""
        return self._rows("SELECT * FROM sessions WHERE status='active' AND"
                          " (container_status='running' OR last_active >= ?)", (active_since,))

    def running_sessions(self) -> list[dict[str, Any]]:
        """Sessions the table says have a running agent."""
        return self._rows("SELECT * FROM sessions WHERE container_status='running'")

    def find_session(self, ag: str, mg: str | None, thread_id: str | None,
                     mode: str) -> dict[str, Any] | None:
        if mode == "agent-shared":
            return self._row("SELECT * FROM sessions WHERE agent_group_id=? AND status='active'"
                             " ORDER BY created_at DESC LIMIT 1", (ag,))
        if mode == "per-thread":
            return self._row("SELECT * FROM sessions WHERE agent_group_id=? AND"
                             " messaging_group_id=? AND thread_id IS ? AND status='active'",
                             (ag, mg, thread_id))
        return self._row("SELECT * FROM sessions WHERE agent_group_id=? AND messaging_group_id=?"
                         " AND thread_id IS NULL AND status='active'", (ag, mg))

    def chatless_session(self, agent_group_id: str) -> dict[str, Any] | None:
        """The newest active session of an agent group that belongs to no chat (where
        other agents' messages go)."""
        return self._row("SELECT * FROM sessions WHERE agent_group_id=? AND"
                         " messaging_group_id IS NULL AND status='active'"
                         " ORDER BY created_at DESC LIMIT 1", (agent_group_id,))

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

    def session_for_token(self, token_hash: str) -> dict[str, Any] | None:
        return self._row("SELECT * FROM sessions WHERE token_hash=? AND"
                         " container_status='running'", (token_hash,))

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
        return self._rows("SELECT * FROM container_requests WHERE handled_at IS NULL ORDER BY id")

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
        return self._rows("SELECT * FROM workers ORDER BY name")

    def forget_worker(self, name: str) -> None:
        """Drop the row of a worker this host no longer runs."""
        with atomic(self.conn):
            self.conn.execute("DELETE FROM workers WHERE name=?", (name,))

    def request_worker(self, name: str, action: str) -> None:
        with atomic(self.conn):
            self.conn.execute("INSERT INTO worker_requests (worker, action, created_at)"
                              " VALUES (?,?,?)", (name, action, utcnow()))
        self.nudge("host")

    def take_worker_requests(self) -> list[dict[str, Any]]:
        with atomic(self.conn):
            rows = self._rows("SELECT * FROM worker_requests WHERE handled_at IS NULL"
                              " ORDER BY id")
            self.conn.execute("UPDATE worker_requests SET handled_at=? WHERE handled_at IS NULL",
                              (utcnow(),))
        return rows

    # ---- host state -------------------------------------------------------------------
    def get_state(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM host_state WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_state(self, key: str, value: str | None) -> None:
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO host_state (key, value, updated_at) VALUES (?,?,?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
                (key, value, utcnow()))
