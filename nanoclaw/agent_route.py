"""Agent-to-agent messages (reference §8) with return paths and a loop guard.

A row addressed to `channel_type='agent'` goes to the target agent group's session: the
one the answered message came from (its `source_session_id`), else the target's
agent-shared session, created if needed. The sender needs a destination for the target
(sending to itself is always allowed). The guard: at most `agent_pair_limit` messages
from one group to another per minute (the original had none: two agents could
ping-pong forever, #2063); past it the message is refused, logged and told.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import defaultdict, deque
from typing import Any

from nanoclaw import sessiondb
from nanoclaw.config import Settings
from nanoclaw.log import logger
from nanoclaw.store import Store
from nanoclaw.util import safe_child

WINDOW = 60.0


class RouteError(Exception):
    pass


class AgentRouter:
    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self.recent: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def _paths(self, s: dict[str, Any]) -> sessiondb.SessionPaths:
        return sessiondb.of(self.settings, s)

    def guard(self, src: str, dst: str, now: float) -> None:
        q = self.recent[(src, dst)]
        while q and now - q[0] > WINDOW:
            q.popleft()
        if len(q) >= self.settings.agent_pair_limit:
            raise RouteError(f"loop guard: more than {self.settings.agent_pair_limit} messages"
                             f" to this agent within {WINDOW:.0f}s; wait before sending more")
        q.append(now)

    def send(self, s: dict[str, Any], paths: sessiondb.SessionPaths, row: dict[str, Any],
             content: dict[str, Any]) -> str:
        """Deliver one agent→agent row; returns the target session id."""
        src, dst = s["agent_group_id"], row["platform_id"]
        target_group = self.store.agent_group(dst) if dst else None
        if target_group is None:
            raise RouteError(f"unknown agent {dst!r}")
        if dst != src and not self.store.q1(
                "SELECT 1 AS x FROM agent_destinations WHERE agent_group_id=? AND"
                " target_type='agent' AND target_id=?", (src, dst)):
            raise RouteError("no destination for that agent")
        self.guard(src, dst, time.time())
        target = self._return_session(paths, row, dst) or self._shared_session(dst)
        me = self.store.agent_group(src)
        tpaths = self._paths(target)
        mid = f"{s['id']}:{row['id']}"
        sessiondb.insert_message(
            tpaths, id=mid, kind="chat", channel_type="agent",
            platform_id=src, source_session_id=s["id"],
            content={"sender": me["name"] if me else src, "senderId": f"agent:{src}",
                     "text": content.get("text") or content.get("markdown") or "",
                     "attachments": self._forward_files(paths, row["id"], tpaths, mid,
                                                        content.get("files"))})
        self.store.touch_session(target["id"])
        self.store.request_container(target["id"], "wake", "agent message")
        return target["id"]

    @staticmethod
    def _forward_files(paths: sessiondb.SessionPaths, out_id: str,
                       tpaths: sessiondb.SessionPaths, mid: str, files: Any) -> list[dict]:
        """Copy the sender's files (plain names in its outbox/<message>/) into the
        target's inbox/<message>/; anything else is refused."""
        if not files:
            return []
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise RouteError("files must be names of files in the message's outbox")
        try:
            return AgentRouter._copy(paths, out_id, tpaths, mid, files)
        except ValueError as e:  # an unsafe name or a path escape
            raise RouteError(str(e)) from None

    @staticmethod
    def _copy(paths: sessiondb.SessionPaths, out_id: str, tpaths: sessiondb.SessionPaths,
              mid: str, files: list[str]) -> list[dict]:
        src_dir = safe_child(paths.outbox, out_id)
        dst_dir = os.path.join(tpaths.inbox, hashlib.sha1(mid.encode()).hexdigest()[:16])
        os.makedirs(dst_dir, exist_ok=True)
        out = []
        for name in files:
            src = safe_child(src_dir, name)
            if not os.path.isfile(src):
                raise RouteError(f"file {name!r} is not in outbox/{out_id}/")
            shutil.copyfile(src, safe_child(dst_dir, name))
            out.append({"name": name, "type": "file",
                        "localPath": os.path.relpath(os.path.join(dst_dir, name), tpaths.root)})
        return out

    def _return_session(self, paths: sessiondb.SessionPaths, row: dict[str, Any],
                        dst: str) -> dict[str, Any] | None:
        """Where a reply goes back to (reference §8), first match that belongs to the
        target and is active: the answered row's source session, else the newest row
        from that peer that carries one."""
        cands = []
        if row.get("in_reply_to"):
            src_row = sessiondb.message(paths, row["in_reply_to"])
            if src_row and src_row["source_session_id"]:
                cands.append(src_row["source_session_id"])
        with sessiondb.opened(paths.inbound, readonly=True) as conn:
            r = conn.execute("SELECT source_session_id FROM messages_in WHERE channel_type="
                             "'agent' AND platform_id=? AND source_session_id IS NOT NULL"
                             " ORDER BY seq DESC LIMIT 1", (dst,)).fetchone()
        if r:
            cands.append(r[0])
        for sid in cands:
            cand = self.store.session(sid)
            if cand and cand["agent_group_id"] == dst and cand["status"] == "active":
                return cand
        return None

    def _shared_session(self, ag: str) -> dict[str, Any]:
        s = self.store.q1("SELECT * FROM sessions WHERE agent_group_id=? AND"
                          " messaging_group_id IS NULL AND status='active'"
                          " ORDER BY created_at DESC LIMIT 1", (ag,))
        if s is None:
            s = self.store.create_session(ag, None, None, None)
            p = sessiondb.create(sessiondb.of(self.settings, s).root)
            sessiondb.write_routing(p, (None, None, None), self.store.destinations(ag))
            logger.info("new agent-shared session {} for agent group {}", s["id"], ag)
        return s

