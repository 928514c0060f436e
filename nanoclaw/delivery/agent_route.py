"""Agent-to-agent messages (reference §8) with return paths and a loop guard.

A row addressed to `channel_type='agent'` goes to the target agent group's session: the
one the answered message came from (its `source_session_id`), else the target's
agent-shared session, created if needed. The sender needs a destination for the target
(sending to itself is always allowed). The guard: at most `agent_pair_limit` messages
from one group to another per minute (the original had none: two agents could
ping-pong forever, #2063); past it the message is refused, logged and told.

A command in the text (`/clear`) passes the same gate as a platform message, with the
sending agent's authority (none: agents hold no role), so a child cannot wipe its
parent's conversation. Files are copied between the two agents' folders through
`hostile.py`: both folders are the agents' own ground.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict, deque
from typing import Any

from nanoclaw import hostile
from nanoclaw.config import Settings
from nanoclaw.db.session import (INBOX, OUTBOX, SessionInbound, SessionPaths, create,
                                  of)
from nanoclaw.db.store import Store
from nanoclaw.errors import Refused
from nanoclaw.log import logger
from nanoclaw.routing import gates
from nanoclaw.util import is_safe_name

WINDOW = 60.0


class RouteError(Refused):
    """An agent's message to another agent is refused; the message says why."""


class AgentRouter:
    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self.recent: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def _paths(self, s: dict[str, Any]) -> SessionPaths:
        return of(self.settings, s)

    def guard(self, src: str, dst: str, now: float) -> None:
        q = self.recent[(src, dst)]
        while q and now - q[0] > WINDOW:
            q.popleft()
        if len(q) >= self.settings.agent_pair_limit:
            raise RouteError(f"loop guard: more than {self.settings.agent_pair_limit} messages"
                             f" to this agent within {WINDOW:.0f}s; wait before sending more")
        q.append(now)

    def send(self, s: dict[str, Any], paths: SessionPaths, row: dict[str, Any],
             content: dict[str, Any]) -> str:
        """Deliver one agent→agent row; returns the target session id."""
        src, dst = s["agent_group_id"], row["platform_id"]
        target_group = self.store.agent_group(dst) if dst else None
        if target_group is None:
            raise RouteError(f"unknown agent {dst!r}")
        if dst != src and not self.store.may_message_agent(src, dst):
            raise RouteError("no destination for that agent")
        text = content.get("text") or content.get("markdown") or ""
        denial = gates.command_gate(self.store, str(text), f"agent:{src}", dst)
        if denial:
            raise RouteError("commands are not passed between agents" if denial == "drop"
                             else denial)
        self.guard(src, dst, time.time())
        target = self._return_session(paths, row, dst) or self._shared_session(dst)
        me = self.store.agent_group(src)
        tpaths = self._paths(target)
        mid = f"{s['id']}:{row['id']}"
        SessionInbound(tpaths).insert(
            id=mid, kind="chat", channel_type="agent",
            platform_id=src, source_session_id=s["id"],
            content={"sender": me["name"] if me else src, "senderId": f"agent:{src}",
                     "text": text,
                     "attachments": self._forward_files(paths, row["id"], tpaths, mid,
                                                        content.get("files"),
                                                        self.settings.agent_owner())})
        self.store.touch_session(target["id"])
        self.store.request_container(target["id"], "wake", "agent message")
        return target["id"]

    @staticmethod
    def _forward_files(paths: SessionPaths, out_id: str,
                       tpaths: SessionPaths, mid: str, files: Any,
                       owner: tuple[int, int] | None = None) -> list[dict]:
        """Copy the sender's files (plain names of regular files in its
        `outbox/<message>/`) into the target's `inbox/<hash of the message>/`; anything
        else (a link, a FIFO, a hard link, an odd name) is refused."""
        if not files:
            return []
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise RouteError("files must be names of files in the message's outbox")
        if not is_safe_name(out_id) or not all(is_safe_name(f) for f in files):
            raise RouteError("files must be plain names of files in the message's outbox")
        sub = hashlib.sha1(mid.encode()).hexdigest()[:16]
        out = []
        try:
            with paths.work_folder() as src, tpaths.work_folder() as dst:
                for name in files:
                    src.copy_to(f"{OUTBOX}/{out_id}/{name}", dst,
                                f"{INBOX}/{sub}/{name}", owner=owner)
                    out.append({"name": name, "type": "file",
                                "localPath": f"{INBOX}/{sub}/{name}"})
        except hostile.Refused as e:
            raise RouteError(f"file not sent: {e}") from None
        except OSError as e:
            raise RouteError(f"file not sent: {e.strerror}") from None
        return out

    def _return_session(self, paths: SessionPaths, row: dict[str, Any],
                        dst: str) -> dict[str, Any] | None:
        """Where a reply goes back to (reference §8), first match that belongs to the
        target and is active: the answered row's source session, else the newest row
        from that peer that carries one."""
        cands = []
        if row.get("in_reply_to"):
            src_row = SessionInbound(paths).message(row["in_reply_to"])
            if src_row and src_row["source_session_id"]:
                cands.append(src_row["source_session_id"])
        last = SessionInbound(paths).last_source_session(dst)
        if last:
            cands.append(last)
        for sid in cands:
            cand = self.store.session(sid)
            if cand and cand["agent_group_id"] == dst and cand["status"] == "active":
                return cand
        return None

    def _shared_session(self, ag: str) -> dict[str, Any]:
        s = self.store.chatless_session(ag)
        if s is None:
            s = self.store.create_session(ag, None, None, None)
            p = create(of(self.settings, s).root, self.settings.agent_owner())
            SessionInbound(p).write_routing((None, None, None), self.store.destinations(ag))
            logger.info("new agent-shared session {} for agent group {}", s["id"], ag)
        return s

