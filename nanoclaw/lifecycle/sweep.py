"""Time-driven housekeeping of every active session (reference §6).

Per pass: sync finished acks into inbound statuses; wake sessions with due rows and no
agent; kill agents that are stuck (a claim older than the tolerance with no heartbeat
since) or idle past the ceiling. `decide_stuck` is pure; the I/O is at the edge. A
running agent whose files have not moved since the last pass costs only a few `stat`s:
its claims are remembered (re-read at least every `RECHECK` seconds).
"""

from __future__ import annotations

from typing import Any

from nanoclaw.agents import scheduling
from nanoclaw.config import Settings
from nanoclaw.db.session import (HEARTBEAT, HostileDB, SessionInbound, SessionOutbound,
                                  SessionPaths, of)
from nanoclaw.db.store import Store
from nanoclaw.errors import disk_full
from nanoclaw.log import logger
from nanoclaw.util import iso, parse_iso

RECHECK = 60.0  # seconds: re-read a quiet running agent's files at least this often


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


def declared_tool_timeout(paths: SessionPaths) -> float:
    """Seconds a running tool declared it may take (e.g. a long Bash), else 0."""
    try:
        row = SessionOutbound(paths).current_tool()
    except Exception:
        return 0.0
    if not row or not row[0] or not isinstance(row[1], (int, float)) or row[1] <= 0:
        return 0.0
    return min(float(row[1]) / 1000.0, 86400.0)


class Sweep:
    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self.errors: dict[str, str] = {}  # session id → last error logged (log once)
        # session id → (files' signature, next due time) of a session found quiet: with
        # no agent, unchanged files and nothing due, a pass has nothing to do there.
        self.quiet: dict[str, tuple[Any, float | None]] = {}
        # session id → (files' signature, read at, claim times, declared tool timeout) of
        # a running agent: while the signature holds, its acks need no new read.
        self.seen: dict[str, tuple[Any, float, list[float], float]] = {}

    def pass_once(self, now: float) -> None:
        from nanoclaw.approvals import requests as approvals

        if approvals.expire(self.store, self.settings, now):
            logger.info("expired approvals told to their agents")
        active = self.store.active_sessions()
        for s in active:
            try:
                self._session(s, now)
                self.errors.pop(s["id"], None)
            except Exception as e:  # one bad session never stops the sweep
                if disk_full(e):
                    raise  # not this session's fault: the worker waits for space
                if self.errors.get(s["id"]) != str(e):
                    self.errors[s["id"]] = str(e)
                    logger.error("sweep of session {} failed: {}", s["id"], e)
        ids = {s["id"] for s in active}
        for memo in (self.seen, self.quiet):
            for sid in [k for k in memo if k not in ids]:
                del memo[sid]

    def _session(self, s: dict[str, Any], now: float) -> None:
        paths = of(self.settings, s)
        inbound, outbound = SessionInbound(paths), SessionOutbound(paths)
        sig = (inbound.change_signal(), outbound.change_signal())
        if sig[0] is None:
            return
        running = s["container_status"] == "running"
        quiet = self.quiet.pop(s["id"], None)
        if not running and quiet and quiet[0] == sig and (quiet[1] is None or quiet[1] > now):
            self.quiet[s["id"]] = quiet
            return
        seen = self.seen.pop(s["id"], None)
        if running and seen and seen[0] == sig and now - seen[1] < RECHECK:
            self.seen[s["id"]] = seen
            self._check_stuck(s, paths, now, seen[2], seen[3])
            return
        inbound.sync_acks()
        if scheduling.recur(paths, self.settings.tz, now):
            logger.info("session {}: next occurrence of a recurring task scheduled", s["id"])
        if not running:
            if inbound.due_count(iso(now)):
                self.store.request_container(s["id"], "wake", "due rows")
            else:
                nxt = inbound.next_due()
                sig = (inbound.change_signal(), outbound.change_signal())
                self.quiet[s["id"]] = (sig, parse_iso(nxt) if nxt else None)
            return
        try:
            claims = [parse_iso(t) for st, t in outbound.acks().values()
                      if st == "processing" and isinstance(t, str)]
        except (HostileDB, ValueError):
            claims = []  # delivery quarantines a session whose outbound.db is refused
        tool = declared_tool_timeout(paths)
        self.seen[s["id"]] = (sig, now, claims, tool)  # the signature from before the reads
        self._check_stuck(s, paths, now, claims, tool)

    def _check_stuck(self, s: dict[str, Any], paths: SessionPaths, now: float,
                     claims: list[float], tool: float) -> None:
        try:
            with paths.work_folder() as work:
                st = work.stat(HEARTBEAT)
            hb: float | None = st.st_mtime if st is not None else None
        except (OSError, ValueError):
            hb = None
        verdict = decide_stuck(now, hb, claims, self.settings.idle_ceiling,
                               self.settings.claim_tolerance, tool)
        if verdict:
            logger.warning("session {}: agent {} ({}); killing it", s["id"],
                           "idle past the ceiling" if verdict == "ceiling" else "stuck on a claim",
                           verdict)
            self.store.request_container(s["id"], "kill", verdict)
