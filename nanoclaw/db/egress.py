"""The egress door's rows: each agent group's web policy (`agent_groups.web`) and what
the door let through or refused (`egress_log`, one row per group, day, destination and
decision). A mixin of `Store`."""

from __future__ import annotations

from typing import Any

from nanoclaw.db.central import atomic
from nanoclaw.db.rows import Queries
from nanoclaw.util import utcnow


class EgressQueries(Queries):
    def web_policy(self, agent_group_id: str) -> str | None:
        """The group's stored policy text; None when there is no such group."""
        row = self.conn.execute("SELECT web FROM agent_groups WHERE id=?",
                                (agent_group_id,)).fetchone()
        return row[0] if row else None

    def set_web_policy(self, agent_group_id: str, policy: str) -> None:
        with atomic(self.conn):
            self.conn.execute("UPDATE agent_groups SET web=? WHERE id=?",
                              (policy, agent_group_id))

    def egress_seen(self, agent_group_id: str, day: str, host: str, port: int, allowed: bool,
                    reason: str = "", nbytes: int = 0, connections: int = 1) -> None:
        """Count one connection (or, with `connections=0`, only its bytes) to a
        destination against the group's day."""
        now = utcnow()
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO egress_log (agent_group_id, day, host, port, allowed, reason,"
                " connections, bytes, first_at, last_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(agent_group_id, day, host, port, allowed, reason) DO UPDATE SET"
                " connections=connections+excluded.connections, bytes=bytes+excluded.bytes,"
                " last_at=excluded.last_at",
                (agent_group_id, day, host[:255], port, int(allowed), reason[:300],
                 connections, nbytes, now, now))

    def egress_bytes(self, agent_group_id: str, day: str) -> int:
        row = self.conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM egress_log WHERE"
                                " agent_group_id=? AND day=?", (agent_group_id, day)).fetchone()
        return int(row[0])

    def egress_by_day(self, since: str, agent_group_id: str | None = None
                      ) -> list[dict[str, Any]]:
        where, args = "e.day >= ?", [since]
        if agent_group_id:
            where += " AND e.agent_group_id = ?"
            args.append(agent_group_id)
        return self._rows(
            "SELECT COALESCE(g.folder, e.agent_group_id) AS grp, e.day, e.host, e.port,"
            " e.allowed, e.reason, e.connections, e.bytes, e.last_at FROM egress_log e"
            " LEFT JOIN agent_groups g ON g.id=e.agent_group_id"
            f" WHERE {where} ORDER BY grp, e.day, e.allowed DESC, e.host, e.port", tuple(args))

    def prune_egress(self, before_day: str) -> int:
        with atomic(self.conn):
            return self.conn.execute("DELETE FROM egress_log WHERE day < ?",
                                     (before_day,)).rowcount
