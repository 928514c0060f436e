"""Matrix events in: the pure parsers (`parse_event`: one raw room event → what the host
stores; `mentions`: does a message name the bot) and `MatrixInbound`, the mixin of
`MatrixChannel` that stores what a /sync brought, once each.

The chat is the room (`matrix:<room id>`), the thread the root of an `m.thread`
relation, the message id the event id. The sender is `matrix:<mxid>` (an mxid holds a
`:`, which the host would otherwise read as already prefixed). A user's edit
(`m.replace`) reaches the agent as `[edited] <new text>`, stored under the edit's own
event id with `edit_of` naming the original; a reply's fallback quote is taken off the
text and given as `reply_to` (a reply to the bot's own message is a mention). A bare
number answers the room's open question card (Matrix has no buttons: cards go out as
numbered lists). Files are fetched from the media repository (decrypted when the event
carries an encrypted `file`), up to the server's upload limit. The bot's own events,
notices (`m.notice`: other bots' output, so two bots never answer each other) and
anything else not a message are skipped; a malformed event is one log line, never a
crash.

An event the bot cannot decrypt (a Megolm session whose key was never shared with its
device) is logged, its key is asked for, and the sender is told in the room what to do
(once per Megolm session, so a burst under one unshared key is one notice): it is never
dropped silently.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from nanoclaw.channels.numbered import number_answer, show_choice
from nanoclaw.channels.text import EDITED, SAFE_FILE, attachment
from nanoclaw.log import logger

CHANNEL = "matrix"
MAX_TEXT = 65_536
MEDIA = {"m.image", "m.file", "m.audio", "m.video"}
TEXT = {"m.text", "m.emote"}  # not m.notice: other bots' output (no bot loops)
PILL = re.compile(r"https://matrix\.to/#/([^\"'<>/?\s]+)")
UNDECRYPTABLE = (
    "I could not decrypt your message (sent from device {device}). Its key was never"
    " shared with my device {me}. To fix it: let your client send keys to unverified"
    " devices (or verify my device), then send the message again.")


class BadEvent(ValueError):
    """An event that is not what Matrix sends; the message is one line."""


@dataclass
class Me:
    user_id: str
    names: tuple[str, ...] = ()   # display name, localpart: plain-text mentions


@dataclass
class Incoming:
    message_id: str
    thread_id: str | None
    payload: dict[str, Any]
    media: list[dict[str, Any]] = field(default_factory=list)


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise BadEvent(f"{what} is not a string")
    return v


def mentions(content: dict[str, Any], me: Me) -> bool:
    """Whether a message names the bot: intentional mentions (`m.mentions`), a matrix.to
    pill in the HTML, or the bot's id, display name or localpart in the text."""
    m = content.get("m.mentions")
    if isinstance(m, dict) and isinstance(m.get("user_ids"), list) \
            and me.user_id in m["user_ids"]:
        return True
    html = content.get("formatted_body")
    if isinstance(html, str):
        from urllib.parse import unquote

        if any(unquote(u) == me.user_id for u in PILL.findall(html)):
            return True
    body = content.get("body")
    if not isinstance(body, str):
        return False
    low = body.lower()
    if me.user_id.lower() in low:
        return True
    for name in me.names:
        n = name.strip().lower()
        if len(n) >= 2 and re.search(rf"(?<![\w@]){re.escape(n)}(?!\w)", low):
            return True
    return False


def strip_fallback(body: str) -> tuple[str, str]:
    """(text, quoted): a reply's `> <@user> …` fallback lines taken off the body."""
    lines = body.split("\n")
    if not lines or not lines[0].startswith("> "):
        return body, ""
    quoted = []
    while lines and lines[0].startswith(">"):
        quoted.append(lines.pop(0)[1:].strip())
    while lines and not lines[0].strip():
        lines.pop(0)
    if quoted:
        quoted[0] = re.sub(r"^<[^>]*>\s*", "", quoted[0])
    return "\n".join(lines), "\n".join(quoted)


def parse_event(ev: Any, me: Me, is_group: bool, sender_name: str | None = None,
                thread_of: dict[str, str] | None = None) -> Incoming | None:
    """One raw room event as the host's payload; None for what is not chat input (the
    bot's own, state, reactions, redactions); BadEvent for what Matrix would not send."""
    if not isinstance(ev, dict):
        raise BadEvent("an event is not an object")
    if ev.get("type") != "m.room.message" or "state_key" in ev:
        return None
    eid, sender = _str(ev.get("event_id"), "event_id"), _str(ev.get("sender"), "sender")
    if sender == me.user_id:
        return None
    content = ev.get("content")
    if not isinstance(content, dict):
        raise BadEvent("content is not an object")
    if not content:
        return None  # redacted
    rel = content.get("m.relates_to") if isinstance(content.get("m.relates_to"), dict) else {}
    edit_of = None
    if rel.get("rel_type") == "m.replace":
        edit_of = _str(rel.get("event_id"), "the edited event")
        new = content.get("m.new_content")
        if not isinstance(new, dict):
            raise BadEvent("an edit without m.new_content")
        shown = new
    else:
        shown = content
    msgtype = shown.get("msgtype")
    body = shown.get("body")
    if not isinstance(body, str):
        raise BadEvent("body is not a string")
    if msgtype not in TEXT | MEDIA:
        return None  # locations, polls, verification requests: not chat input
    thread = None
    if rel.get("rel_type") == "m.thread":
        thread = _str(rel.get("event_id"), "the thread root")
    elif edit_of and thread_of:
        thread = thread_of.get(edit_of)
    reply = rel.get("m.in_reply_to") if isinstance(rel.get("m.in_reply_to"), dict) else None
    quoted = ""
    if reply and not rel.get("is_falling_back") and msgtype in TEXT:
        body, quoted = strip_fallback(body)
    text = body if msgtype in TEXT else ""
    if msgtype in MEDIA and isinstance(shown.get("filename"), str) and body != shown["filename"]:
        text = body  # a caption (the file's name is in `filename`)
    if msgtype == "m.emote":
        text = f"* {sender_name or sender} {text}"
    payload: dict[str, Any] = {
        "text": text[:MAX_TEXT], "sender_id": f"{CHANNEL}:{sender}",
        "sender_name": sender_name or sender, "is_mention": not is_group or mentions(shown, me),
        "is_group": is_group}
    if reply and not rel.get("is_falling_back"):
        payload["reply_to"] = {"id": _str(reply.get("event_id"), "the replied event"),
                               "text": quoted[:2000], "sender": ""}
    media = []
    if msgtype in MEDIA:
        info = shown.get("info") if isinstance(shown.get("info"), dict) else {}
        f = shown.get("file") if isinstance(shown.get("file"), dict) else None
        url = (f or shown).get("url")
        if isinstance(url, str) and url.startswith("mxc://"):
            size = info.get("size")
            name = SAFE_FILE.sub("_", str(shown.get("filename") or body or "file"))[:128]
            media.append({"name": name or "file",
                          "mime": info.get("mimetype") if isinstance(info.get("mimetype"), str)
                          else None, "url": url, "file": f,
                          "size": size if isinstance(size, int) else None})
    if edit_of:
        payload.update(text=EDITED + payload["text"], edited=True, edit_of=edit_of)
    return Incoming(eid, thread, payload, media)


class MatrixInbound:
    """The handlers; the connection they use (client, me, host...) is the channel's."""

    client: Any
    me: Me
    host: Any
    upload_limit: int
    thread_of: dict[str, str]

    async def _room_event(self, room: Any, ev: Any) -> None:
        """One timeline event of a joined room: stored once, or skipped with a line."""
        from nio import MegolmEvent

        if isinstance(ev, MegolmEvent):
            return await self._undecryptable(room, ev)
        raw = getattr(ev, "source", None)
        try:
            sender = raw.get("sender") if isinstance(raw, dict) else None
            name = room.user_name(sender) if isinstance(sender, str) else None
            inc = parse_event(raw, self.me, _is_group(room), name, self.thread_of)
        except (BadEvent, KeyError, TypeError, ValueError, AttributeError) as e:
            eid = raw.get("event_id") if isinstance(raw, dict) else None
            logger.warning("matrix: malformed event {} in {} skipped: {}", str(eid)[:80],
                           room.room_id, str(e)[:200])
            return
        if inc is None:
            return
        pid = f"{CHANNEL}:{room.room_id}"
        if inc.thread_id:
            self.thread_of[inc.message_id] = inc.thread_id
            if len(self.thread_of) > 10_000:
                self.thread_of.pop(next(iter(self.thread_of)))
        store = self.host.store
        if store.inbound_seen(CHANNEL, pid, inc.message_id):
            return  # a replay after a restart between storing and saving the token
        p = inc.payload
        reply = p.get("reply_to")
        if not p["is_mention"] and reply and store.sent_content(CHANNEL, reply["id"]):
            p["is_mention"] = True  # a reply to the bot's own message speaks to it
        answer = None if p.get("edited") or inc.media else \
            number_answer(self.host, CHANNEL, pid, p["text"])
        if answer is not None:
            card, option = answer
            user = p["sender_id"]
            new = await self.host.inbound(pid, inc.message_id, {
                "question_id": card.question_id, "option": option, "user_id": user},
                thread_id=inc.thread_id, kind="action")
            if new:
                show_choice(self.host, CHANNEL, pid, inc.thread_id, inc.message_id, card,
                            option, p["sender_name"])
            return
        p["attachments"] = [await self._fetch(m) for m in inc.media]
        await self.host.inbound(pid, inc.message_id, p, inc.thread_id)

    async def _fetch(self, m: dict[str, Any]) -> dict[str, Any]:
        """One file of a message (decrypted if it came encrypted), or why it is missing."""
        name, mime = m["name"], m["mime"]
        if m["size"] is not None and m["size"] > self.upload_limit:
            return attachment(name, mime) | {"error": f"larger than {self.upload_limit} bytes"}
        try:
            got = await asyncio.wait_for(self.client.download(mxc=m["url"]), 60)
            data = getattr(got, "body", None)
            if not isinstance(data, (bytes, bytearray)):
                raise ValueError(getattr(got, "message", None) or type(got).__name__)
            if len(data) > self.upload_limit:
                raise ValueError(f"larger than {self.upload_limit} bytes")
            f = m["file"]
            if f:
                from nio.crypto import decrypt_attachment

                data = decrypt_attachment(bytes(data), f["key"]["k"], f["hashes"]["sha256"],
                                          f["iv"])
            return attachment(name, mime, bytes(data))
        except Exception as e:  # keep the message; say the file could not be fetched
            logger.warning("matrix: file {} not downloaded: {!r}", m["url"][:100], e)
            return attachment(name, mime) | {"error": f"download failed: {str(e)[:200]}"}

    async def _undecryptable(self, room: Any, ev: Any) -> None:
        """Log it, ask the sender's devices for the key, and tell the sender how to fix
        it (a send of its own, once per event), never a silent drop."""
        pid = f"{CHANNEL}:{room.room_id}"
        logger.warning("matrix: could not decrypt event {} from {} in {} (session {},"
                       " device {}); telling the sender", ev.event_id, ev.sender, room.room_id,
                       getattr(ev, "session_id", "?"), getattr(ev, "device_id", "?"))
        try:
            await asyncio.wait_for(self.client.request_room_key(ev), 10)
        except Exception as e:  # best effort: the notice below is what matters
            logger.debug("matrix: key request for {} failed: {!r}", ev.event_id, e)
        text = UNDECRYPTABLE.format(device=getattr(ev, "device_id", None) or "unknown",
                                    me=self.client.device_id)
        # once per sender's Megolm session: a burst of messages under one unshared key
        # is one notice, each still logged
        key = f"undecryptable:{room.room_id}:{ev.sender}:{getattr(ev, 'session_id', '')}"
        self.host.store.enqueue_send(key[:500], CHANNEL, pid, None, "chat",
                                     {"text": text, "notice": True})
        self.host.kick(pid)


def _is_group(room: Any) -> bool:
    """A room of more than two people (joined or invited) is a group; two is a DM."""
    try:
        return int(room.joined_count) + int(room.invited_count) > 2
    except (AttributeError, TypeError, ValueError):
        return True
