"""Turning agent output into platform sends (reference §4 outbound).

Each pass: for every watched session whose `outbound.db` moved (a `stat`), queue its new
`messages_out` rows in the central `channel_outbox` (idempotency key
`<session>:<message id>`, so a crash between the two writes duplicates nothing); then
record the channels' results in the session's `delivered` table. A send that finally
failed is told to the agent (a row in its inbound, which wakes it) and logged. Each
watched session folder gets a link to this worker's nudge socket, so its agent wakes us
as soon as it writes (`nudge.advertise`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from nanoclaw import nudge, sessiondb
from nanoclaw.config import Settings
from nanoclaw.log import logger
from nanoclaw.store import Store
from nanoclaw.util import iso

WATCH_RECENT = 600.0  # seconds: sessions active this recently are watched every tick
FULL_SCAN = 30.0      # seconds between scans of every active session


class Delivery:
    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self.signals: dict[str, Any] = {}     # session id → last seen outbound signal
        self.errors: dict[str, str] = {}      # session id → last error logged
        self._paths: dict[str, sessiondb.SessionPaths] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.version = -1
        self.last_full = 0.0
        from nanoclaw.agent_route import AgentRouter

        self.agents = AgentRouter(store, settings)

    def paths(self, s: dict[str, Any]) -> sessiondb.SessionPaths:
        p = self._paths.get(s["id"])  # built once: this runs for every session every tick
        if p is None:
            p = self._paths[s["id"]] = sessiondb.of(self.settings, s)
        return p

    def pass_once(self, now: float) -> bool:
        did = False
        v = self.store.version()
        if v != self.version or now - self.last_full > FULL_SCAN:
            full = now - self.last_full > FULL_SCAN
            self._refresh(now, full)
            if full:
                self.last_full = now
            did |= self._record_results()
            self.version = v
        for sid, s in list(self.sessions.items()):
            did |= self._drain(s)
        return did

    def _refresh(self, now: float, full: bool) -> None:
        if full:
            rows = self.store.sessions_where("status='active'")
        else:
            rows = self.store.sessions_where(
                "status='active' AND (container_status='running' OR last_active >= ?)",
                (iso(now - WATCH_RECENT),))
        keep = {r["id"]: r for r in rows}
        for sid, s in keep.items():
            if full or sid not in self.sessions:
                nudge.advertise(self.settings, self.paths(s).root)
        if not full:  # keep watching what we watched until the next full scan drops it
            for sid, s in self.sessions.items():
                keep.setdefault(sid, s)
        self.sessions = keep

    def _drain(self, s: dict[str, Any]) -> bool:
        paths = self.paths(s)
        sig = sessiondb.change_signal(paths)
        if sig is None or sig == self.signals.get(s["id"]):
            return False
        try:
            rows = sessiondb.undelivered(paths)
            for row in rows:
                self._route(s, paths, row)
        except Exception as e:  # retried when the file changes again; logged once
            if self.errors.get(s["id"]) != str(e):
                self.errors[s["id"]] = str(e)
                logger.error("delivery of session {} failed: {}", s["id"], e)
            self.signals[s["id"]] = sig
            return False
        self.errors.pop(s["id"], None)
        self.signals[s["id"]] = sig
        return bool(rows)

    def _route(self, s: dict[str, Any], paths: sessiondb.SessionPaths, row: dict[str, Any]) -> None:
        try:
            content = json.loads(row["content"])
        except ValueError:
            content = None
        if not isinstance(content, dict):
            sessiondb.mark_delivered(paths, row["id"], None, "failed", "malformed content")
            logger.error("session {}: message {} has malformed content", s["id"], row["id"])
            return
        if row["kind"] == "system":
            self._system(s, paths, row, content)
            return
        ch, pid = row["channel_type"], row["platform_id"]
        if ch == "agent":
            self._to_agent(s, paths, row, content)
            return
        if not ch or not pid or not self._allowed(s, ch, pid):
            why = f"not an allowed destination: {ch}:{pid}"
            sessiondb.mark_delivered(paths, row["id"], None, "failed", why)
            logger.error("session {}: message {} refused: {}", s["id"], row["id"], why)
            if not (row["in_reply_to"] or "").startswith("note-"):  # no note about a note
                self._tell_agent(s, paths, f"Your message {row['id']} was not sent: {why}.")
            return
        if "files" in content:
            try:
                content = {**content, "files": self._files(paths, row["id"], content["files"])}
            except ValueError as e:
                sessiondb.mark_delivered(paths, row["id"], None, "failed", str(e))
                logger.error("session {}: message {} refused: {}", s["id"], row["id"], e)
                self._tell_agent(s, paths, f"Your message {row['id']} was not sent: {e}.")
                return
        if content.get("type") == "ask_question" and content.get("questionId"):
            self.store.conn.execute(
                "INSERT OR IGNORE INTO pending_questions (question_id, session_id,"
                " message_out_id, platform_id, channel_type, thread_id, title, options_json,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (str(content["questionId"]), s["id"], row["id"], pid, ch, row["thread_id"],
                 content.get("title"), json.dumps(content.get("options") or []), row["timestamp"]))
        self.store.enqueue_send(f"{s['id']}:{row['id']}", ch, pid, row["thread_id"], row["kind"],
                                content, session_id=s["id"], message_out_id=row["id"],
                                in_reply_to=row["in_reply_to"])

    def _to_agent(self, s: dict[str, Any], paths: sessiondb.SessionPaths, row: dict[str, Any],
                  content: dict[str, Any]) -> None:
        from nanoclaw.agent_route import RouteError

        try:
            target = self.agents.send(s, paths, row, content)
        except RouteError as e:
            sessiondb.mark_delivered(paths, row["id"], None, "failed", str(e))
            logger.warning("session {}: message to agent {} refused: {}", s["id"],
                           row["platform_id"], e)
            if not (row["in_reply_to"] or "").startswith("note-"):
                self._tell_agent(s, paths, f"Your message to agent {row['platform_id']} was not"
                                 f" sent: {e}")
            return
        sessiondb.mark_delivered(paths, row["id"], f"agent:{target}", "delivered")
        if target not in self.sessions:  # our own write does not move data_version
            t = self.store.session(target)
            if t is not None:
                self.sessions[target] = t
                nudge.advertise(self.settings, self.paths(t).root)

    def _system(self, s: dict[str, Any], paths: sessiondb.SessionPaths, row: dict[str, Any],
                content: dict[str, Any]) -> None:
        """Run a system action; the agent hears about any failure."""
        from nanoclaw import actions

        name = content.get("action") or content.get("type")
        try:
            note = actions.run(actions.Ctx(self.store, self.settings, s, paths, row, content))
        except actions.ActionError as e:
            sessiondb.mark_delivered(paths, row["id"], None, "failed", str(e))
            logger.warning("session {}: action {!r} refused: {}", s["id"], name, e)
            self._tell_agent(s, paths, f"The host refused {name!r}: {e}")
            return
        except Exception as e:
            sessiondb.mark_delivered(paths, row["id"], None, "failed", str(e))
            logger.exception("session {}: action {!r} failed", s["id"], name)
            self._tell_agent(s, paths, f"The host failed to perform {name!r}: {e}")
            return
        sessiondb.mark_delivered(paths, row["id"], None, "delivered")
        if note:
            self._tell_agent(s, paths, note)

    @staticmethod
    def _files(paths: sessiondb.SessionPaths, message_id: str, files: Any) -> list[dict]:
        """Agent files → adapter files. Only plain names of regular files the agent put in
        `outbox/<message id>/` (no symlinks, no escapes) or inline base64 data; a host
        path from the agent would let it mail out any file of the host."""
        from nanoclaw.util import safe_child

        if not isinstance(files, list):
            raise ValueError("files must be a list")
        out = []
        for f in files:
            if isinstance(f, dict) and "path" not in f and isinstance(f.get("data"), str):
                out.append({"name": str(f.get("name") or "file"), "data": f["data"]})
                continue
            name = f if isinstance(f, str) else f.get("name") if isinstance(f, dict) else None
            if not isinstance(name, str) or (isinstance(f, dict) and "path" in f):
                raise ValueError("a file must be the name of a file in the message's outbox")
            folder = safe_child(paths.outbox, message_id)
            path = safe_child(folder, name)
            if not os.path.isfile(path) or os.path.islink(path):
                raise ValueError(f"file {name!r} is not in outbox/{message_id}/")
            out.append({"name": name, "path": os.path.realpath(path)})
        return out

    def _allowed(self, s: dict[str, Any], ch: str, pid: str) -> bool:
        """The session's own chat, or a chat the agent has a destination for (the ACL)."""
        if s["messaging_group_id"]:
            own = self.store.q1("SELECT channel_type, platform_id FROM messaging_groups WHERE id=?",
                                (s["messaging_group_id"],))
            if own and (own["channel_type"], own["platform_id"]) == (ch, pid):
                return True
        return self.store.q1(
            "SELECT 1 AS x FROM agent_destinations d JOIN messaging_groups m ON m.id=d.target_id"
            " WHERE d.agent_group_id=? AND d.target_type='channel' AND m.channel_type=?"
            " AND m.platform_id=?", (s["agent_group_id"], ch, pid)) is not None

    def _record_results(self) -> bool:
        rows = self.store.unrecorded_sends()
        for r in rows:
            s = self.store.session(r["session_id"]) if r["session_id"] else None
            if s is not None:
                paths = self.paths(s)
                status = "delivered" if r["status"] == "sent" else "failed"
                sessiondb.mark_delivered(paths, r["message_out_id"], r["platform_message_id"],
                                         status, r["error"])
                if status == "failed":
                    logger.error("send to {}:{} failed for good after {} attempts: {}",
                                 r["channel_type"], r["platform_id"], r["attempts"], r["error"])
                    self._tell_agent(s, paths, f"Your message to {r['channel_type']}:"
                                     f"{r['platform_id']} could not be delivered: {r['error']}")
            self.store.mark_recorded(r["id"])
        return bool(rows)

    def _tell_agent(self, s: dict[str, Any], paths: sessiondb.SessionPaths, text: str) -> None:
        """A host note to the agent: a chat row from `system`, which wakes it."""
        sessiondb.insert_note(paths, text)
        self.store.request_container(s["id"], "wake", "host note")


