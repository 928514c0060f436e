"""Time-driven housekeeping of every active session (reference §6).

Per pass: sync finished acks into inbound statuses; wake sessions with due rows and no
agent; kill agents that are stuck (a claim older than the tolerance with no heartbeat
since) or idle past the ceiling. `decide_stuck` is pure; the I/O is at the edge.
"""

from __future__ import annotations

import os
from typing import Any

from nanoclaw import scheduling, sessiondb
from nanoclaw.config import Settings
from nanoclaw.log import logger
from nanoclaw.store import Store
from nanoclaw.util import iso, parse_iso


def decide_stuck(now: float, heartbeat: float | None, claims: list[float], ceiling: float,
                 tolerance: float, tool_timeout: float = 0.0) -> str | None:
    """'ceiling' | 'stuck' | None, for one running agent.

    heartbeat: mtime of `.heartbeat` (None: missing, i.e. a fresh agent given grace);
    claims: times of its `processing` acks; tool_timeout: a declared Bash timeout, which
    stretches both limits. Stuck: a claim older than the tolerance while the heartbeat
    is older than the tolerance too (no progress for that long mid-turn).
    """
    if heartbeat is not None and now - heartbeat > max(ceiling, tool_timeout):
        return "ceiling"
    limit = max(tolerance, tool_timeout)
    for claimed in claims:
        # A claim older than the limit with no sign of life for as long: the agent beats
        # once when it claims, so "no beat since the claim" alone would miss a hung call.
        if now - claimed > limit and (heartbeat is None or now - heartbeat > limit):
            return "stuck"
    return None


def declared_tool_timeout(paths: sessiondb.SessionPaths) -> float:
    """Seconds a running tool declared it may take (e.g. a long Bash), else 0."""
    try:
        with sessiondb._open(paths.outbound, readonly=True) as conn:
            row = conn.execute("SELECT current_tool, tool_declared_timeout_ms FROM"
                               " container_state WHERE id=1").fetchone()
    except Exception:
        return 0.0
    if not row or not row[0] or not row[1]:
        return 0.0
    return float(row[1]) / 1000.0


class Sweep:
    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self.errors: dict[str, str] = {}  # session id → last error logged (log once)
        # session id → (files' signature, next due time) of a session found quiet: with
        # no agent, unchanged files and nothing due, a pass has nothing to do there.
        self.quiet: dict[str, tuple[Any, float | None]] = {}

    def pass_once(self, now: float) -> None:
        from nanoclaw import approvals

        if approvals.expire(self.store, self.settings, now):
            logger.info("expired approvals told to their agents")
        for s in self.store.sessions_where("status='active'"):
            try:
                self._session(s, now)
                self.errors.pop(s["id"], None)
            except Exception as e:  # one bad session never stops the sweep
                if self.errors.get(s["id"]) != str(e):
                    self.errors[s["id"]] = str(e)
                    logger.error("sweep of session {} failed: {}", s["id"], e)

    def _session(self, s: dict[str, Any], now: float) -> None:
        paths = sessiondb.of(self.settings, s)
        sig = (sessiondb.file_signal(paths.inbound), sessiondb.change_signal(paths))
        if sig[0] is None:
            return
        running = s["container_status"] == "running"
        quiet = self.quiet.pop(s["id"], None)
        if not running and quiet and quiet[0] == sig and (quiet[1] is None or quiet[1] > now):
            self.quiet[s["id"]] = quiet
            return
        sessiondb.sync_acks(paths)
        if scheduling.recur(paths, self.settings.tz, now):
            logger.info("session {}: next occurrence of a recurring task scheduled", s["id"])
        if not running:
            if sessiondb.due_count(paths, iso(now)):
                self.store.request_container(s["id"], "wake", "due rows")
            else:
                nxt = sessiondb.next_due(paths)
                sig = (sessiondb.file_signal(paths.inbound), sessiondb.change_signal(paths))
                self.quiet[s["id"]] = (sig, parse_iso(nxt) if nxt else None)
            return
        try:
            hb: float | None = os.stat(paths.heartbeat).st_mtime
        except FileNotFoundError:
            hb = None
        claims = [parse_iso(t) for st, t in sessiondb.acks(paths).values() if st == "processing"]
        verdict = decide_stuck(now, hb, claims, self.settings.idle_ceiling,
                               self.settings.claim_tolerance, declared_tool_timeout(paths))
        if verdict:
            logger.warning("session {}: agent {} ({}); killing it", s["id"],
                           "idle past the ceiling" if verdict == "ceiling" else "stuck on a claim",
                           verdict)
            self.store.request_container(s["id"], "kill", verdict)
