"""Token usage and budgets: what the broker counts off each model answer, per agent
group and day, and the group's own daily budget. A mixin of `Store`."""

from __future__ import annotations

from nanoclaw.db.central import atomic
from nanoclaw.db.rows import Queries
from nanoclaw.util import utcnow


class UsageQueries(Queries):
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
