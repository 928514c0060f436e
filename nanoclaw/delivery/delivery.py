"""Turning agent output into platform sends (reference §4 outbound).

Each pass: for every watched session whose `outbound.db` moved (a `stat`), queue its new
`messages_out` rows in the central `channel_outbox` (idempotency key
`<session>:<message id>`, so a crash between the two writes duplicates nothing); then
record the channels' results in the session's `delivered` table. A send that finally
failed is told to the agent (a row in its inbound, which wakes it; once in
`FAILURE_NOTE_EVERY` per chat, so an agent answering the note into the same refusing
chat is not told again and again) and logged. Each
watched session folder gets a link to this worker's nudge socket, so its agent wakes us
as soon as it writes (`nudge.advertise`).

`outbound.db` is the agent's and read as such (`SessionOutbound`, `agent_db`): a file with a
schema not the runner's, or too slow to read, quarantines its session — the agent is
stopped, its chat is told once, and the containers worker sets the file aside before
the next start — so one hostile sandbox never stalls delivery for the others. A file
the agent sends is copied out of its `outbox/` through `hostile.py` into
`data/outfiles/`, which only the host writes, before any adapter sees it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any

from nanoclaw import hostile, nudge
from nanoclaw.config import Settings
from nanoclaw.db.session import OUTBOX, HostileDB, SessionInbound, SessionOutbound, SessionPaths, of
from nanoclaw.db.store import Store
from nanoclaw.delivery import actions
from nanoclaw.errors import Refused
from nanoclaw.log import logger, one_line
from nanoclaw.util import is_safe_name, iso, utcnow

WATCH_RECENT = 600.0  # seconds: sessions active this recently are watched every tick
# A chat the platform keeps refusing is told to the agent once in this long: the agent's
# answer to that note goes to the same chat, fails the same way, and would be told again
# and answered again, a loop that spends the model on nothing.
FAILURE_NOTE_EVERY = 600.0
FULL_SCAN = 30.0      # seconds between scans of every active session


class Delivery:
    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self.signals: dict[str, Any] = {}     # session id → last seen outbound signal
        # session id → (outbound inode, seq): every row up to seq was handed on (queued,
        # routed or refused) or recorded; a pass reads only the rows above it
        self.floors: dict[str, tuple[int, int]] = {}
        self.errors: dict[str, str] = {}      # session id → last error logged
        self.quarantined: set[str] = set()    # `<session>:quarantine:<inode>` already told
        self._paths: dict[str, SessionPaths] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.failure_told: dict[tuple[str, str, str], float] = {}  # (session, chat) → told
        self.version = -1
        self.last_full = 0.0
        from nanoclaw.delivery.agent_route import AgentRouter

        self.agents = AgentRouter(store, settings)

    def paths(self, s: dict[str, Any]) -> SessionPaths:
        p = self._paths.get(s["id"])  # built once: this runs for every session every tick
        if p is None:
            p = self._paths[s["id"]] = of(self.settings, s)
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
            rows = self.store.active_sessions()
        else:
            rows = self.store.watched_sessions(iso(now - WATCH_RECENT))
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
        outbound = SessionOutbound(paths)
        sig = outbound.change_signal()
        if sig is None or sig == self.signals.get(s["id"]):
            return False
        try:
            rows = self._handed_on(s, paths, outbound, sig)
        except HostileDB as e:
            self._quarantine(s, sig, e)
            self.signals[s["id"]] = sig
            return False
        except sqlite3.OperationalError as e:
            if "locked" in str(e):  # the agent is mid-write: look again next pass
                return False
            raise
        except Exception as e:  # retried when the file changes again; logged once
            if self.errors.get(s["id"]) != str(e):
                self.errors[s["id"]] = str(e)
                logger.error("delivery of session {} failed: {}", s["id"], e)
            self.signals[s["id"]] = sig
            return False
        self.errors.pop(s["id"], None)
        self.signals[s["id"]] = sig
        return bool(rows)

    def _handed_on(self, s: dict[str, Any], paths: SessionPaths, outbound: SessionOutbound,
                   sig: Any) -> list[dict[str, Any]]:
        """Route the session's due rows above its floor that have no recorded result
        (a row queued again is harmless: the outbox's key dedupes it), then raise the
        floor to the last row below which nothing waits. The agent's seqs only grow, so
        a new row is always above the floor; another file (set aside) starts at 0."""
        inode, floor = self.floors.get(s["id"], (sig[2], 0))
        if inode != sig[2]:
            floor = 0
        rows = outbound.after(floor)
        done = SessionInbound(paths).delivered_among([r["id"] for r in rows if r["due"]])
        sent, blocked = [], False
        for row in rows:
            if row["due"] and row["id"] not in done:
                self._route(s, paths, row)
                sent.append(row)
            blocked |= not row["due"] or not isinstance(row["seq"], int)  # (the agent's file)
            if not blocked:
                floor = row["seq"]
        self.floors[s["id"]] = (sig[2], floor)
        return sent

    def _quarantine(self, s: dict[str, Any], sig: Any, why: HostileDB) -> None:
        """Stop a session whose agent wrote an outbound.db the host refuses to read, and
        say so once per state of that file, in the session's own chat."""
        sid = s["id"]
        key = f"{sid}:quarantine:{sig[2] if sig else 0}"  # once per file (its inode)
        if key in self.quarantined:
            return
        self.quarantined.add(key)
        failed = SessionInbound(self.paths(s)).fail_due(utcnow())  # what it was working on
        logger.error("session {}: quarantined ({} message(s) failed): {}", sid, len(failed), why)
        self.store.request_container(sid, "kill", "quarantined: outbound.db refused")
        own = self.store.own_chat(s)
        if own:
            text = (f"This conversation's agent was stopped: its output failed the host's"
                    f" safety checks ({why.kind}). What it was working on was not delivered;"
                    f" your next message starts it afresh.")
            self.store.enqueue_send(key, *own, s["thread_id"], "chat", {"text": text},
                                    session_id=sid, message_out_id=key)

    def _route(self, s: dict[str, Any], paths: SessionPaths, row: dict[str, Any]) -> None:
        odd = [k for k in ("kind", "channel_type", "platform_id", "thread_id", "in_reply_to",
                           "content") if row[k] is not None and not isinstance(row[k], str)]
        if odd:  # SQLite keeps whatever type the agent stored (a BLOB, a number)
            why = f"malformed row: {', '.join(odd)} not text"
            SessionInbound(paths).mark_delivered(row["id"], None, "failed", why)
            logger.error("session {}: message {!r} refused: {}", s["id"], row["id"], why)
            return
        try:
            content = json.loads(row["content"]) if row["content"] is not None else None
            json.dumps(content, ensure_ascii=False).encode()  # a lone surrogate: no text
        except (ValueError, RecursionError):
            content = None
        if not isinstance(content, dict):
            SessionInbound(paths).mark_delivered(row["id"], None, "failed", "malformed content")
            logger.error("session {}: message {} has malformed content", s["id"], row["id"])
            return
        if row["kind"] == "system":
            self._system(s, paths, row, content)
            return
        ch, pid = row["channel_type"], row["platform_id"]
        if ch == "agent":
            self._to_agent(s, paths, row, content)
            return
        if not self.store.may_send(s, ch, pid):
            why = one_line(f"not an allowed destination: {ch}:{pid}")
            SessionInbound(paths).mark_delivered(row["id"], None, "failed", why)
            logger.error("session {}: message {} refused: {}", s["id"], row["id"], why)
            if not (row["in_reply_to"] or "").startswith("note-"):  # no note about a note
                self._tell_agent(s, paths, f"Your message {row['id']} was not sent: {why}.")
            return
        if "files" in content:
            try:
                content = {**content, "files": self._files(s, paths, row["id"],
                                                           content["files"])}
            except ValueError as e:
                SessionInbound(paths).mark_delivered(row["id"], None, "failed", str(e))
                logger.error("session {}: message {} refused: {}", s["id"], row["id"], e)
                self._tell_agent(s, paths, f"Your message {row['id']} was not sent: {e}.")
                return
        if content.get("type") == "ask_question":
            # The card goes out under a host-made id, never the agent's `questionId` (H3):
            # an agent could name an approval, and that card's clicks would decide it.
            card_id = self.store.open_question_card(
                s["id"], row["id"], content.get("questionId"), ch, pid, row["thread_id"],
                content.get("title"), content.get("options"), row["timestamp"])
            content = {**content, "questionId": card_id}
        self.store.enqueue_send(f"{s['id']}:{row['id']}", ch, pid, row["thread_id"], row["kind"],
                                content, session_id=s["id"], message_out_id=row["id"],
                                in_reply_to=row["in_reply_to"])

    def _to_agent(self, s: dict[str, Any], paths: SessionPaths, row: dict[str, Any],
                  content: dict[str, Any]) -> None:
        from nanoclaw.delivery.agent_route import RouteError

        try:
            target = self.agents.send(s, paths, row, content)
        except RouteError as e:
            SessionInbound(paths).mark_delivered(row["id"], None, "failed", str(e))
            logger.warning("session {}: message to agent {} refused: {}", s["id"],
                           row["platform_id"], e)
            if not (row["in_reply_to"] or "").startswith("note-"):
                self._tell_agent(s, paths, f"Your message to agent {row['platform_id']} was not"
                                 f" sent: {e}")
            return
        SessionInbound(paths).mark_delivered(row["id"], f"agent:{target}", "delivered")
        if target not in self.sessions:  # our own write does not move data_version
            t = self.store.session(target)
            if t is not None:
                self.sessions[target] = t
                nudge.advertise(self.settings, self.paths(t).root)

    def _system(self, s: dict[str, Any], paths: SessionPaths, row: dict[str, Any],
                content: dict[str, Any]) -> None:
        """Run a system action; the agent hears about any failure."""
        name = content.get("action") or content.get("type")
        try:
            note = actions.run(actions.Ctx(self.store, self.settings, s, paths, row, content))
        except Refused as e:  # actions.ActionError, and any other refusal
            SessionInbound(paths).mark_delivered(row["id"], None, "failed", str(e))
            logger.warning("session {}: action {!r} refused: {}", s["id"], name, e)
            self._tell_agent(s, paths, f"The host refused {name!r}: {e}")
            return
        except Exception as e:
            SessionInbound(paths).mark_delivered(row["id"], None, "failed", str(e))
            logger.exception("session {}: action {!r} failed", s["id"], name)
            self._tell_agent(s, paths, f"The host failed to perform {name!r}: {e}")
            return
        SessionInbound(paths).mark_delivered(row["id"], None, "delivered")
        if note:
            self._tell_agent(s, paths, note)

    def _files(self, s: dict[str, Any], paths: SessionPaths, message_id: str,
               files: Any) -> list[dict]:
        """Agent files → adapter files. Only plain names of regular files the agent put in
        `outbox/<message id>/`, copied out through `hostile.py` (no link, FIFO or hard
        link is followed or read) into `data/outfiles/<session>/<message>/`, or inline
        base64 data; a host path from the agent would let it mail out any host file."""
        if not isinstance(files, list):
            raise ValueError("files must be a list")
        out = []
        names = []
        for f in files:
            if isinstance(f, dict) and "path" not in f and isinstance(f.get("data"), str):
                out.append({"name": str(f.get("name") or "file"), "data": f["data"]})
                continue
            name = f if isinstance(f, str) else f.get("name") if isinstance(f, dict) else None
            if not isinstance(name, str) or (isinstance(f, dict) and "path" in f):
                raise ValueError("a file must be the name of a file in the message's outbox")
            if not is_safe_name(name) or not is_safe_name(message_id):
                raise ValueError(f"unsafe file name: {name!r}")
            names.append(name)
        if not names:
            return out
        staged = self.settings.data_dir / "outfiles" / s["id"] / message_id
        os.makedirs(staged.parent, mode=0o700, exist_ok=True)
        try:
            with paths.work_folder() as work, hostile.Folder.open(staged, create=True) as dst:
                for name in names:
                    work.copy_to(f"{OUTBOX}/{message_id}/{name}", dst, name,
                                 mode=0o600)
                    out.append({"name": name, "path": str(staged / name)})
        except hostile.Refused as e:
            raise ValueError(f"file not sent: {e}") from None
        except OSError as e:
            raise ValueError(f"file not sent: {e.strerror}") from None
        return out

    def _record_results(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        rows = self.store.unrecorded_sends()
        for r in rows:
            s = self.store.session(r["session_id"]) if r["session_id"] else None
            if s is not None:
                paths = self.paths(s)
                status = "delivered" if r["status"] == "sent" else "failed"
                SessionInbound(paths).mark_delivered(r["message_out_id"], r["platform_message_id"],
                                         status, r["error"])
                if status == "failed":
                    logger.error("send to {}:{} failed for good after {} attempts: {}",
                                 r["channel_type"], r["platform_id"], r["attempts"], r["error"])
                    key = (s["id"], r["channel_type"], r["platform_id"])
                    told = self.failure_told.get(key)
                    if told is not None and now - told < FAILURE_NOTE_EVERY:
                        logger.warning("session {}: not telling its agent again of a failed send"
                                       " to {}:{} (told {:.0f} s ago)", s["id"],
                                       r["channel_type"], r["platform_id"], now - told)
                    else:
                        self.failure_told[key] = now
                        self._tell_agent(s, paths, f"Your message to {r['channel_type']}:"
                                         f"{r['platform_id']} could not be delivered:"
                                         f" {r['error']}. Further failures there are not"
                                         f" reported for {FAILURE_NOTE_EVERY / 60:.0f} minutes;"
                                         " don't retry there now.")
            self.store.mark_recorded(r["id"])
        return bool(rows)

    def _tell_agent(self, s: dict[str, Any], paths: SessionPaths, text: str) -> None:
        """A host note to the agent: a chat row from `system`, which wakes it."""
        SessionInbound(paths).note(text)
        self.store.request_container(s["id"], "wake", "host note")


