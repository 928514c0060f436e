"""Turning one platform event into session messages (reference §4 inbound).

`route(event)` finds the chat, its wirings in priority order, decides per wiring whether
it engages, applies the access and command gates, resolves or creates the session,
inserts the `messages_in` row (id `<platform msg id>:<agent group>`, so routing the same
event twice is harmless) and asks the containers worker to wake the agent.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from nanoclaw import nudge
from nanoclaw.approvals import cards, registration
from nanoclaw.channels.text import EDITED
from nanoclaw.config import Settings
from nanoclaw.db.session import (SessionInbound, SessionPaths, create, damaged, of,
                                  set_aside_inbound)
from nanoclaw.db.store import Store
from nanoclaw.errors import NotAllowed, NotFound
from nanoclaw.log import logger
from nanoclaw.routing import gates
from nanoclaw.util import is_approval_card


@dataclass
class Event:
    """A platform message as adapters hand it over (payload of `inbound_events`)."""

    channel_type: str
    platform_id: str
    message_id: str
    text: str = ""
    thread_id: str | None = None
    sender_id: str | None = None
    sender_name: str | None = None
    is_mention: bool = False
    is_group: bool = False
    attachments: list[dict[str, Any]] = field(default_factory=list)
    reply_to: dict[str, Any] | None = None
    kind: str = "chat"
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Event":
        p = json.loads(row["payload"])
        if not isinstance(p, dict):
            raise ValueError("payload is not an object")
        return cls(
            channel_type=row["channel_type"], platform_id=row["platform_id"],
            message_id=row["message_id"], thread_id=row["thread_id"], kind=row["kind"],
            text=str(p.get("text") or ""), sender_id=_opt(p.get("sender_id")),
            sender_name=_opt(p.get("sender_name")), is_mention=bool(p.get("is_mention")),
            is_group=bool(p.get("is_group")), attachments=list(p.get("attachments") or []),
            reply_to=p.get("reply_to") if isinstance(p.get("reply_to"), dict) else None,
            payload=p)

    def to_row(self) -> dict[str, Any]:
        """The `inbound_events` shape, kept with an approval so it can be replayed."""
        return {"channel_type": self.channel_type, "platform_id": self.platform_id,
                "thread_id": self.thread_id, "message_id": self.message_id, "kind": self.kind,
                "payload": json.dumps(self.payload or {
                    "text": self.text, "sender_id": self.sender_id,
                    "sender_name": self.sender_name, "is_mention": self.is_mention,
                    "is_group": self.is_group, "attachments": self.attachments,
                    "reply_to": self.reply_to})}


def _opt(v: Any) -> str | None:
    return None if v is None else str(v)


def user_id_for(ev: Event) -> str | None:
    if not ev.sender_id:
        return None
    return ev.sender_id if ":" in ev.sender_id else f"{ev.channel_type}:{ev.sender_id}"




def engages(wiring: dict[str, Any], ev: Event, sticky_session: bool) -> bool:
    mode = wiring["engage_mode"]
    if mode == "pattern":
        pat = wiring["engage_pattern"] or "."
        if pat == ".":
            return True
        text = ev.text  # an edit is matched on what the user wrote: `^@andy` still engages
        if ev.payload.get("edited") and text.startswith(EDITED):
            text = text[len(EDITED):]
        try:
            return re.search(pat, text) is not None
        except re.error:
            return True  # an invalid pattern counts as a match (reference §4)
    if mode == "mention":
        return ev.is_mention
    return ev.is_mention or (ev.is_group and sticky_session)  # mention-sticky


class Router:
    def __init__(self, store: Store, settings: Settings, threaded: frozenset[str] = frozenset()):
        self.store, self.settings, self.threaded = store, settings, threaded
        self._refused = False  # set while routing one event: a gate refused a sender

    def route(self, ev: Event) -> list[str]:
        """Route one event; returns the ids of the sessions it was delivered to."""
        if ev.kind == "action":
            return self.click(ev)
        thread = ev.thread_id if ev.channel_type in self.threaded else None
        ev.thread_id = thread
        mg = self.store.messaging_group(ev.channel_type, ev.platform_id)
        if mg is None:
            mg = self._new_chat(ev)
            if mg is None:
                return []
        uid = user_id_for(ev)
        if uid:
            self.store.ensure_user(uid, ev.channel_type, ev.sender_name)
            if registration.take_name(self.store, self.settings, uid, mg, ev.text,
                                      self.replay):
                return []  # the name of a new agent, asked for by a channel approval
        wirings = self.store.wirings(mg["id"])
        if not wirings:
            if ev.is_mention and not mg["denied_at"]:
                self.store.record_unregistered(ev.channel_type, ev.platform_id, uid,
                                               ev.sender_name, "no_agent_wired", mg["id"])
                registration.ask_channel(self.store, ev.to_row(), mg)
            return []
        delivered = []
        self._refused = False
        for w in wirings:
            sid = self._offer(ev, mg, w, uid)
            if sid:
                delivered.append(sid)
        if not delivered and not self._refused:  # a gate refusal is the better reason
            self.store.record_unregistered(ev.channel_type, ev.platform_id, uid, ev.sender_name,
                                           "no_agent_engaged", mg["id"])
        return delivered

    def click(self, ev: Event) -> list[str]:
        """A button click: an approval decision or the answer to an agent's question.

        Which one is decided by the card id alone (H3): an approval's id (the host's
        `appr-`/`snd-`/`chan-` namespace) only ever goes to `cards.click`; any other
        id only ever to the question card it names, whose answer goes to its agent. An
        agent never names a card, so neither can be reached through the other."""
        p = ev.payload
        card_id, option = str(p.get("question_id") or ""), str(p.get("option") or "")
        raw = str(p.get("user_id") or "") or None
        clicker = None if raw is None else raw if ":" in raw else f"{ev.channel_type}:{raw}"
        if not card_id:
            raise ValueError("a click needs a question_id")
        if is_approval_card(card_id):
            try:
                what = cards.click(self.store, self.settings, card_id, option, clicker,
                                   self.replay)
                logger.info("approval {}: {} by {}", card_id, what, clicker)
            except registration.StillOpen as e:  # nothing written; the reason, in one line
                logger.info("approval {} not applied: {}", card_id, e)
                self._notice(ev, str(e))
            except NotAllowed:
                self._notice(ev, "Only the approver or an admin can decide this.")
            except NotFound:
                logger.info("click on unknown or closed card {} ignored", card_id)
                self._notice(ev, "This was already decided (or has expired).")
            except cards.NotOffered:
                self._notice(ev, "That is not one of this card's options.")
            return []
        q = self._question_card(ev, card_id)
        if q is None:
            logger.info("click on unknown or answered question card {} ignored", card_id)
            self._notice(ev, "This question was already answered (or has expired).")
            return []
        s = self.store.session(q["session_id"])
        if s is None:
            return []
        mg = self.store.messaging_group_by_id(s["messaging_group_id"]) \
            if s["messaging_group_id"] else None
        public = mg is not None and mg["unknown_sender_policy"] == "public"
        if not (public or self.store.can_access(clicker, s["agent_group_id"])):
            logger.warning("{} may not answer question card {}; ignored", clicker, card_id)
            self._notice(ev, "You are not allowed to answer this question.")
            return []
        offered = self._option_values(q["options_json"])
        if offered and option not in offered:
            logger.warning("click on question card {} with option {!r} not on it; ignored",
                           card_id, option)
            self._notice(ev, "That is not one of this card's options.")
            return []
        qid = q["question_id"]  # the agent's own id: what its waiting tool looks for
        SessionInbound(self._paths(s)).insert(
            id=f"qr-{q['card_id']}", kind="system",
            content={"type": "question_response", "questionId": qid, "selectedOption": option,
                     "userId": clicker}, channel_type=ev.channel_type,
            platform_id=ev.platform_id, thread_id=ev.thread_id)
        self.store.close_question_card(q["card_id"])
        self.store.request_container(s["id"], "wake", "question answered")
        return [s["id"]]

    def replay(self, row: dict[str, Any]) -> list[str]:
        """Route a message an approval kept, once approved: through this router, which
        knows which channels keep threads (a replay must not lose its thread)."""
        return self.route(Event.from_row(row))

    def _question_card(self, ev: Event, card_id: str) -> dict[str, Any] | None:
        """The open question card a click names: by its host card id; else (a click
        naming the agent's own id, as older callers send) the one card in the clicked
        chat asked under that id, and none if several were."""
        q = self.store.question_card(card_id)
        if q is not None:
            return q
        asked = self.store.question_cards_asking(ev.channel_type, ev.platform_id, card_id)
        return asked[0] if len(asked) == 1 else None

    @staticmethod
    def _option_values(options_json: str | None) -> list[str]:
        """The option values a question card offered (as the adapters normalise them)."""
        from nanoclaw.channels.text import parse_question

        try:
            options = json.loads(options_json or "[]")
        except (ValueError, RecursionError):
            return []
        q = parse_question({"type": "ask_question", "questionId": "-", "options": options})
        return [o["value"] for o in q.options] if q else []

    def _notice(self, ev: Event, text: str) -> None:
        self.store.enqueue_send(f"notice:{ev.channel_type}:{ev.message_id}", ev.channel_type,
                                ev.platform_id, ev.thread_id, "chat", {"text": text})

    def _new_chat(self, ev: Event) -> dict[str, Any] | None:
        if ev.channel_type == "cli":
            # The terminal belongs to the local owner: a new CLI chat is another
            # conversation with the agents of the default terminal chat.
            base = self.store.messaging_group("cli", "local")
            mg_id = self.store.create_messaging_group("cli", ev.platform_id,
                                                      f"terminal {ev.platform_id}", False)
            for w in self.store.wirings(base["id"]) if base else []:
                self.store.wire(mg_id, w["agent_group_id"], destination=f"terminal-{ev.platform_id}")
            return self.store.messaging_group("cli", ev.platform_id)
        if not ev.is_mention:
            return None
        self.store.create_messaging_group(ev.channel_type, ev.platform_id, None, ev.is_group,
                                          policy="request_approval")
        return self.store.messaging_group(ev.channel_type, ev.platform_id)

    def _offer(self, ev: Event, mg: dict[str, Any], w: dict[str, Any], uid: str | None) -> str | None:
        mode = w["session_mode"]
        if ev.thread_id is not None and mg["is_group"] and mode != "agent-shared":
            mode = "per-thread"
        session = self.store.find_session(w["agent_group_id"], mg["id"], ev.thread_id, mode)
        if not engages(w, ev, sticky_session=session is not None):
            if w["ignored_message_policy"] == "accumulate" and self._gates_pass(ev, mg, w, uid):
                session = session or self._create_session(w, mg, ev, mode)
                self._insert(session, w, ev, uid, trigger=False)
            return None
        if not self._gates_pass(ev, mg, w, uid):
            self._refused = True
            self.store.record_unregistered(ev.channel_type, ev.platform_id, uid, ev.sender_name,
                                           f"unknown_sender_{mg['unknown_sender_policy']}",
                                           mg["id"], w["agent_group_id"])
            if uid and mg["unknown_sender_policy"] == "request_approval":
                registration.ask_sender(self.store, ev.to_row(), mg, w["agent_group_id"], uid,
                                        ev.sender_name)
            elif ev.is_mention and isinstance(ev.payload.get("members_only_reply"), str):
                self._notice(ev, ev.payload["members_only_reply"])  # the channel's one line
            return None
        session = session or self._create_session(w, mg, ev, mode)
        denial = gates.command_gate(self.store, ev.text, uid, w["agent_group_id"])
        if denial == "drop":
            logger.info("dropped command from {} in {}", uid, ev.platform_id)
            return None
        if denial:
            self._deny(session, ev, denial)
            return None
        self._insert(session, w, ev, uid, trigger=True)
        self._wake(session["id"])
        return session["id"]

    def _wake(self, sid: str) -> None:
        """Ask for the session's agent, unless it runs: a running agent was nudged by the
        insert and reads the row itself (no request row, no containers pass per message).
        The status is read after the row is committed, and the containers worker marks an
        agent stopped before it counts the due rows it left (`Containers._ended`, which
        wakes again for them, after a kill too): so either this read sees the agent
        stopped, or that count sees this row."""
        cur = self.store.session(sid)
        if cur is None or cur["container_status"] != "running":
            self.store.request_container(sid, "wake", "message")

    def _gates_pass(self, ev: Event, mg: dict[str, Any], w: dict[str, Any], uid: str | None) -> bool:
        allowed = self.store.can_access(uid, w["agent_group_id"])
        if w["sender_scope"] == "known" and not allowed:
            return False
        return mg["unknown_sender_policy"] == "public" or allowed

    def _create_session(self, w: dict[str, Any], mg: dict[str, Any], ev: Event,
                        mode: str) -> dict[str, Any]:
        s = self.store.create_session(w["agent_group_id"], None if mode == "agent-shared"
                                      else mg["id"], ev.thread_id if mode == "per-thread" else None,
                                      None)
        paths = create(of(self.settings, s).root, self.settings.agent_owner())
        nudge.advertise(self.settings, paths.root)  # its agent can wake delivery at once
        routing = (None, None, None) if mode == "agent-shared" else (
            ev.channel_type, ev.platform_id, ev.thread_id)
        SessionInbound(paths).write_routing(routing,
                                            self.store.destinations(w["agent_group_id"]))
        logger.info("new session {} for agent group {} ({})", s["id"], w["agent_group_id"], mode)
        return s

    def _paths(self, session: dict[str, Any]) -> SessionPaths:
        return of(self.settings, session)

    def _insert(self, session: dict[str, Any], w: dict[str, Any], ev: Event, uid: str | None,
                trigger: bool) -> None:
        content = {"sender": ev.sender_name or uid or "unknown", "senderId": uid,
                   "senderName": ev.sender_name, "text": ev.text,
                   "attachments": ev.attachments, "replyTo": ev.reply_to}
        row = dict(id=f"{ev.message_id}:{w['agent_group_id']}", kind="chat", content=content,
                   trigger=trigger, platform_id=ev.platform_id, channel_type=ev.channel_type,
                   thread_id=ev.thread_id)
        try:
            SessionInbound(self._paths(session)).insert(**row)
        except sqlite3.DatabaseError as e:
            if not damaged(e):
                raise
            self._set_aside(session, ev, e)
            SessionInbound(self._paths(session)).insert(**row)  # the fresh one
        self.store.touch_session(session["id"])

    def _set_aside(self, session: dict[str, Any], ev: Event, why: Exception) -> None:
        """The session's inbound.db is damaged: stop its agent, keep the file aside, start
        a fresh one and say so in the chat, once, in words; the message that found it
        goes on into the fresh file, so the conversation carries on from it."""
        sid = session["id"]
        self.store.request_container(sid, "kill", "inbound.db damaged")
        kept = set_aside_inbound(self._paths(session))
        logger.error("session {}: quarantined: its inbound.db is damaged ({}); kept as {},"
                     " a fresh one made", sid, why, kept)
        self.store.enqueue_send(
            f"{sid}:damaged:{kept}", ev.channel_type, ev.platform_id, ev.thread_id, "chat",
            {"text": f"This conversation's stored messages were damaged (inbound.db: {why});"
                     f" the file was set aside as {kept} and the conversation carries on from"
                     " your last message. Anything earlier that was not answered yet needs"
                     " to be sent again."}, session_id=sid, message_out_id=f"damaged:{kept}")

    def _deny(self, session: dict[str, Any], ev: Event, reason: str) -> None:
        """Answer a refused command without waking the agent (the original's broken path):
        queued straight to the chat it came from (the host never writes `outbound.db`)."""
        mid = f"{ev.message_id}:{session['agent_group_id']}"
        self.store.enqueue_send(f"{session['id']}:denied:{mid}", ev.channel_type,
                                ev.platform_id, ev.thread_id, "chat", {"text": reason},
                                session_id=session["id"], message_out_id=f"denied:{mid}",
                                in_reply_to=mid)
        self.store.touch_session(session["id"])
        logger.info("refused command from {}: {}", ev.sender_id, reason)

