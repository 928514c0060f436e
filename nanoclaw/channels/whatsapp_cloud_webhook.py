"""WhatsApp Cloud API, inbound side: what Meta POSTs to the webhook door at
/webhook/whatsapp-cloud (the outbound side is `whatsapp_cloud.py`).

GET is Meta's subscription handshake: `hub.challenge` is echoed only when `hub.mode` is
`subscribe` and `hub.verify_token` is WHATSAPP_VERIFY_TOKEN (else 403). A POST must
carry `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(WHATSAPP_APP_SECRET, raw body)>`.

A body is `entry[].changes[].value` with `messages[]` (statuses and other fields are
ignored, as are messages to another of the app's numbers). Each message is stored under
its wamid, so a redelivery is stored once (and its media not fetched again):
- text, a location, contacts, a template's quick reply: chat text;
- image, video, audio, document, sticker: their caption, and the file fetched by its
  media id (its URL must be on WHATSAPP_MEDIA_HOSTS; within the door's deadline, else
  the message is stored with a note saying the file was not fetched);
- a reply button or list row of one of our cards (`ncq:<card id>:<index>`): an action,
  mapped to its option through the card sent to that chat; a number sent after a card
  with more than 10 options (sent as numbered text) answers that card, once;
- a reaction: a chat message saying what was reacted to.
A new message in a chat wired to an agent gets its read receipt and "typing…" at once,
in the background (the answer to Meta does not wait for it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any, Mapping

import aiohttp

from nanoclaw import jsonin
from nanoclaw.channels.text import SAFE_FILE, attachment, decode_choice, parse_question
from nanoclaw.channels.webhook import BadPayload, Webhook
from nanoclaw.channels.whatsapp_cloud import ROWS, Graph, GraphError, MediaRefused
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

MEDIA_BUDGET = 4.0   # seconds for all the files of one body (the door allows 8 in all)
MAX_DOWNLOAD = 16 << 20
MEDIA = ("image", "video", "audio", "document", "sticker")
WA_ID = re.compile(r"[0-9]{5,20}")
MEDIA_ID = re.compile(r"[0-9A-Za-z_.-]{1,128}")  # a path segment of the Graph URL
EXT = {"image": ".jpg", "video": ".mp4", "audio": ".ogg", "sticker": ".webp",
       "document": ""}


@dataclass
class Incoming:
    wa_id: str
    id: str
    msg: dict[str, Any]
    name: str | None


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def parse(raw: bytes, phone_id: str) -> list[Incoming]:
    """The messages of a webhook body, in order; BadPayload if it is not one. Malformed
    messages inside a well-formed body are skipped (logged), never fatal. A status
    saying one of our sends failed after Graph took it (e.g. 131047 outside the 24-hour
    window) is logged at WARNING."""
    try:
        body = jsonin.loads(raw)
    except jsonin.BadJSON as e:
        raise BadPayload(str(e)) from None
    if not isinstance(body, dict) or not isinstance(body.get("entry"), list):
        raise BadPayload("not a WhatsApp webhook: no entry list")
    out = []
    for entry in body["entry"]:
        for change in _list(_dict(entry).get("changes")):
            change = _dict(change)
            value = _dict(change.get("value"))
            if change.get("field") != "messages" or not value:
                continue
            to = _dict(value.get("metadata")).get("phone_number_id")
            if to is not None and str(to) != phone_id:
                logger.info("whatsapp-cloud: messages to another number ({}) ignored", to)
                continue
            for st in _list(value.get("statuses")):
                st = _dict(st)
                if st.get("status") == "failed":
                    err = _dict((_list(st.get("errors")) or [{}])[0])
                    logger.warning("whatsapp-cloud: message {} to {} failed after sending:"
                                   " {} {}", _str(st.get("id"))[:80],
                                   _str(st.get("recipient_id"))[:20], err.get("code"),
                                   _str(err.get("title") or err.get("message"))[:200])
            names = {}
            for c in _list(value.get("contacts")):
                c = _dict(c)
                if isinstance(c.get("wa_id"), str):
                    names[c["wa_id"]] = _str(_dict(c.get("profile")).get("name")) or None
            for m in _list(value.get("messages")):
                m = _dict(m)
                frm, mid = m.get("from"), m.get("id")
                if not isinstance(frm, str) or not WA_ID.fullmatch(frm) or not isinstance(
                        mid, str) or not 0 < len(mid) <= 256:
                    logger.warning("whatsapp-cloud: a message without a valid sender or id"
                                   " skipped")
                    continue
                out.append(Incoming(frm, mid, m, names.get(frm)))
    return out


class CloudWebhook(Webhook):
    name = "whatsapp-cloud"

    def __init__(self, settings, host):
        super().__init__(settings, host)
        missing = [n for n, v in (("WHATSAPP_APP_SECRET", settings.whatsapp_app_secret),
                                  ("WHATSAPP_VERIFY_TOKEN", settings.whatsapp_verify_token),
                                  ("WHATSAPP_PHONE_NUMBER_ID",
                                   settings.whatsapp_phone_number_id)) if not v]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} not set (whatsapp-cloud needs them"
                              " with WHATSAPP_ACCESS_TOKEN)")
        self.secret = settings.whatsapp_app_secret.encode()
        self.graph = Graph(settings, timeout=MEDIA_BUDGET)
        self.tasks: set[asyncio.Task] = set()

    # ---- the door's contract ----------------------------------------------------------
    def handshake(self, query: Mapping[str, str]) -> tuple[int, str]:
        token = query.get("hub.verify_token", "").encode("utf-8", "replace")
        if query.get("hub.mode") == "subscribe" and hmac.compare_digest(
                token, self.settings.whatsapp_verify_token.encode()):
            return 200, query.get("hub.challenge", "")
        return 403, "forbidden\n"

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        sig = headers.get("X-Hub-Signature-256", "")
        if not sig.startswith("sha256="):
            return False
        want = hmac.new(self.secret, raw, hashlib.sha256).hexdigest().encode()
        return hmac.compare_digest(sig[7:].strip().lower().encode("utf-8", "replace"), want)

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        deadline = asyncio.get_running_loop().time() + MEDIA_BUDGET
        new = 0
        for inc in parse(raw, self.settings.whatsapp_phone_number_id):
            new += await self._store(inc, deadline)
        return new

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await self.graph.close()

    # ---- one message ------------------------------------------------------------------
    async def _store(self, inc: Incoming, deadline: float) -> int:
        pid, m = f"whatsapp-cloud:{inc.wa_id}", inc.msg
        if self.host.seen(pid, inc.id):
            return 0  # a redelivery: stored already
        kind = m.get("type")
        if kind == "interactive":
            reply = _dict(m.get("interactive"))
            reply = _dict(reply.get("button_reply") or reply.get("list_reply"))
            if reply:
                return await self._click(pid, inc, reply)
        payload: dict[str, Any] = {
            "text": self._text(m), "sender_id": inc.wa_id, "sender_name": inc.name,
            "is_mention": True, "is_group": False, "attachments": []}
        if kind in MEDIA:
            payload["attachments"] = await self._media(inc, kind, deadline)
        if kind == "reaction":
            r = _dict(m.get("reaction"))
            payload["reaction"] = {"emoji": _str(r.get("emoji")),
                                   "message_id": _str(r.get("message_id"))}
        ctx = _dict(m.get("context"))
        if isinstance(ctx.get("id"), str):
            payload["reply_to"] = {"id": ctx["id"], "text": self._sent_text(ctx["id"]),
                                   "sender": _str(ctx.get("from"))}
        answer = self._number_answer(pid, payload["text"])
        if answer is not None:
            qid, option = answer
            return int(await self.host.inbound(pid, inc.id, {
                "question_id": qid, "option": option, "user_id": inc.wa_id}, kind="action"))
        new = await self.host.inbound(pid, inc.id, payload)
        if new and self.host.is_wired(pid):  # an answer is coming: show it
            self._background(self._read(inc.id))
        return int(new)

    def _text(self, m: dict[str, Any]) -> str:
        kind = _str(m.get("type"))
        if kind == "text":
            return _str(_dict(m.get("text")).get("body"))
        if kind in MEDIA:
            return _str(_dict(m.get(kind)).get("caption"))
        if kind == "button":  # a template's quick-reply button
            return _str(_dict(m.get("button")).get("text"))
        if kind == "interactive":
            i = _dict(m.get("interactive"))
            return _str(_dict(i.get("nfm_reply")).get("body")) or "[a form reply]"
        if kind == "location":
            loc = _dict(m.get("location"))
            where = " ".join(_str(loc.get(k)) for k in ("name", "address") if loc.get(k))
            return f"[location {loc.get('latitude')},{loc.get('longitude')} {where}]".strip()
        if kind == "contacts":
            names = [_str(_dict(_dict(c).get("name")).get("formatted_name"))
                     for c in _list(m.get("contacts"))]
            return f"[shared contacts: {', '.join(n for n in names if n) or '?'}]"
        if kind == "reaction":
            r = _dict(m.get("reaction"))
            what = self._sent_text(_str(r.get("message_id")))
            what = f'"{what[:200]}"' if what else "a message"
            emoji = _str(r.get("emoji"))
            return f"[reacted {emoji} to {what}]" if emoji else f"[took back a reaction to {what}]"
        return f"[a WhatsApp message of type {kind or '?'} that cannot be shown here]"

    def _sent_text(self, message_id: str) -> str:
        """The text of a message we sent (a reply or reaction names it), or ''."""
        if not message_id:
            return ""
        c = self.host.store.sent_content(self.name, message_id)
        if not c:
            return ""
        return str(c.get("text") or c.get("question") or "") if isinstance(c, dict) else ""

    async def _click(self, pid: str, inc: Incoming, reply: dict[str, Any]) -> int:
        choice = decode_choice(reply.get("id"))
        card = parse_question(self.host.question(choice[0], pid) or {}) if choice else None
        option = card.value(choice[1]) if card and choice else None
        if option is None:
            logger.info("whatsapp-cloud: a click on an unknown card ignored ({})",
                        _str(reply.get("id"))[:80])
            return 0
        return int(await self.host.inbound(pid, inc.id, {
            "question_id": choice[0], "option": option, "user_id": inc.wa_id},  # type: ignore[index]
            kind="action"))

    def _number_answer(self, pid: str, text: str) -> tuple[str, str] | None:
        """A number answering the chat's latest card, if it went out as numbered text
        (more than 10 options) and is not answered yet."""
        n = text.strip().rstrip(".)")
        if not n.isdigit() or len(n) > 3:
            return None
        sent = self.host.store.latest_sent_question(self.name, pid)
        latest = parse_question(sent) if sent else None
        if latest is None or len(latest.options) <= ROWS:
            return None
        if self.host.store.card_answered(self.name, pid, latest.question_id):
            return None  # answered once already
        card = parse_question(self.host.question(latest.question_id, pid) or {})
        option = card.value(int(n) - 1) if card and int(n) > 0 else None
        return (card.question_id, option) if card and option is not None else None

    async def _media(self, inc: Incoming, kind: str, deadline: float) -> list[dict[str, Any]]:
        media = _dict(inc.msg.get(kind))
        mime = _str(media.get("mime_type")).split(";")[0].strip() or None
        name = SAFE_FILE.sub("_", _str(media.get("filename")) or kind + EXT[kind])[:128] or kind
        media_id = media.get("id")
        if not isinstance(media_id, str) or not MEDIA_ID.fullmatch(media_id):
            return [attachment(name, mime) | {"error": "no media id"}]
        left = deadline - asyncio.get_running_loop().time()
        try:
            if left < 0.1:
                raise asyncio.TimeoutError()
            data, got = await asyncio.wait_for(self.graph.media(media_id, MAX_DOWNLOAD), left)
            return [attachment(name, mime or got, data)]
        except MediaRefused as e:
            logger.warning("whatsapp-cloud: media of {} not fetched: {}", inc.id, e)
            why = f"not fetched: {e}"
        except asyncio.TimeoutError:
            logger.warning("whatsapp-cloud: media of {} not fetched in time", inc.id)
            why = "not fetched: the download took too long"
        except (GraphError, aiohttp.ClientError, OSError, ValueError) as e:
            logger.warning("whatsapp-cloud: media of {} not fetched: {!r}", inc.id, e)
            why = f"download failed: {e}"
        return [attachment(name, mime) | {"error": why}]

    # ---- read receipt and typing, after the answer --------------------------------------
    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _read(self, message_id: str) -> None:
        await asyncio.sleep(0)  # after the door has answered
        try:
            await asyncio.wait_for(self.graph.mark_read(message_id), 10)
        except Exception as e:  # best effort: a receipt never fails a message
            logger.debug("whatsapp-cloud: read receipt for {} failed: {!r}", message_id, e)
