"""iMessage, how one message from BlueBubbles becomes a stored event, the same way
whether the worker's poll found it or the webhook door was told of it.

Stored under the message's guid in its chat (`imessage:<chatGuid>`): a message the
server hands us again (it re-sends old events on reconnect and restart; the poll reads
back a window) is recognised by its guid and stored once. Never stored: our own
messages (`isFromMe`), group events, stickers. A direct chat is always a mention; in
a group, the assistant's name in the text, an inline reply to us or a tapback on our
message is one (the group's wiring decides the rest). A bare number answers the chat's
open question card (`numbered.py`). A tapback is a chat message saying what was
reacted to, with `reaction: {emoji, message_id}`.

An attachment is fetched only once the Mac has all of it: BlueBubbles reports it while
it is still arriving (a transferState short of 5, no bytes, the download a 404). Until
then the message is not stored (`PENDING`) and the caller asks again later; after
BLUEBUBBLES_ATTACHMENT_WAIT seconds it is stored with the file marked not fetched, and
the user is told to send it again.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from nanoclaw.channels.imessage_api import (
    CHANNEL,
    EMOJI,
    BadMessage,
    BBError,
    BlueBubbles,
    Message,
    parse_message,
)
from nanoclaw.channels.numbered import number_answer, show_choice
from nanoclaw.channels.text import attachment
from nanoclaw.config import Settings
from nanoclaw.log import logger

STORED, SEEN, SKIP, PENDING, OLD, BAD = "stored", "seen", "skip", "pending", "old", "bad"


class Inbound:
    def __init__(self, settings: Settings, host: Any, api: BlueBubbles):
        self.settings, self.host, self.api = settings, host, api
        name = re.escape(settings.assistant_name.strip() or "assistant")
        self.mention = re.compile(rf"(?i)(?<![\w@])@?{name}\b")

    async def handle(self, raw: Any, *, give_up: bool = False,
                     horizon: int | None = None) -> str:
        """Store one message the server handed us; what became of it. `give_up`: store
        it even if a file has not arrived (marked not fetched). `horizon`: a message
        created before it (epoch ms) is old (re-sent by the server) and ignored."""
        try:
            m = parse_message(raw)
        except BadMessage as e:
            logger.info("imessage: an unreadable message skipped ({})", e)
            return BAD
        if m is None or m.from_me:
            return SKIP
        if horizon is not None and 0 < m.date < horizon:
            logger.debug("imessage: old message {} (re-sent by the server) ignored", m.guid)
            return OLD
        store, pid = self.host.store, m.platform_id
        if store.inbound_seen(CHANNEL, pid, m.guid):
            return SEEN
        if not m.attachments and m.tapback is None:
            answer = number_answer(self.host, CHANNEL, pid, m.text)
            if answer is not None:
                card, option = answer
                who = f"{CHANNEL}:{m.sender}"
                new = await self.host.inbound(pid, m.guid, {
                    "question_id": card.question_id, "option": option, "user_id": who},
                    kind="action")
                if new:
                    show_choice(self.host, CHANNEL, pid, None, m.guid, card, option,
                                await self.api.name(m.sender) or m.sender)
                return STORED if new else SEEN
        files, late = await self._files(m)
        if late and not give_up:
            return PENDING
        payload = await self._payload(m, files)
        new = await self.host.inbound(pid, m.guid, payload)
        if new and late:
            logger.warning("imessage: {} file(s) of message {} never finished arriving;"
                           " stored without them", len(late), m.guid)
            if store.is_wired(CHANNEL, pid):
                store.enqueue_send(f"imessage:late:{m.guid}", CHANNEL, pid, None, "chat", {
                    "text": f"I could not get {', '.join(late)}: it never finished arriving."
                            " Please send it again."})
        return STORED if new else SEEN

    async def _payload(self, m: Message, files: list[dict[str, Any]]) -> dict[str, Any]:
        text, ours = m.text, False
        if m.tapback is not None:
            emoji = EMOJI[m.tapback.lstrip("-")]
            said = self._sent_text(m.target)
            ours = said is not None
            what = f'"{said[:200]}"' if said else "a message"
            text = (f"[took back {emoji} from {what}]" if m.tapback.startswith("-")
                    else f"[reacted {emoji} to {what}]")
        payload: dict[str, Any] = {
            "text": text, "sender_id": f"{CHANNEL}:{m.sender}",
            "sender_name": await self.api.name(m.sender) or None,
            "is_group": m.group, "attachments": files}
        if m.tapback is not None:
            payload["reaction"] = {"emoji": EMOJI[m.tapback.lstrip("-")],
                                   "removed": m.tapback.startswith("-"),
                                   "message_id": m.target or ""}
        if m.reply_to:
            said = self._sent_text(m.reply_to)
            ours = ours or said is not None
            payload["reply_to"] = {"id": m.reply_to, "text": said or "",
                                   "sender": "" if said is None else "assistant"}
        payload["is_mention"] = not m.group or ours or bool(self.mention.search(m.text))
        return payload

    def _sent_text(self, guid: str | None) -> str | None:
        """The text of a message we sent (a tapback or a reply names it), or None."""
        c = self.host.store.sent_content(CHANNEL, guid) if guid else None
        if not isinstance(c, dict):
            return None
        return str(c.get("text") or c.get("question") or "")

    async def _files(self, m: Message) -> tuple[list[dict[str, Any]], list[str]]:
        """The message's files, and the names of those not arrived yet."""
        out: list[dict[str, Any]] = []
        late: list[str] = []
        for a in m.attachments:
            if not a.ready:
                late.append(a.name)
                out.append(attachment(a.name, a.mime) | {"error": "not fetched: never"
                                                         " finished arriving"})
                continue
            try:
                out.append(attachment(a.name, a.mime, await self.api.download(a)))
            except BBError as e:
                if e.status == 404 or e.status == 429 or e.status >= 500:
                    late.append(a.name)
                    out.append(attachment(a.name, a.mime) | {
                        "error": "not fetched: never finished arriving"})
                else:
                    out.append(attachment(a.name, a.mime) | {"error": f"not fetched: {e}"})
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                late.append(a.name)
                out.append(attachment(a.name, a.mime) | {"error": f"not fetched: {e!r}"})
            except ValueError as e:
                out.append(attachment(a.name, a.mime) | {"error": f"not fetched: {e}"})
        return out, late
