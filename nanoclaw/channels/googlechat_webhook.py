"""Google Chat, inbound side: the events an HTTP-endpoint Chat app receives, POSTed to the
webhook door at /webhook/googlechat (the outbound side is `googlechat.py`).

`verify` checks the bearer token (`googlechat_api.Verifier`): a failure logs which
check failed and is answered 401, nothing stored. Both event shapes are read: the
classic one (`type`, `message`, `space`, `user`, `action`) and the 2026 Workspace
add-on envelope (`chat.messagePayload`, `chat.buttonClickedPayload`,
`commonEventObject`). A verified event:
- a message: chat under its resource name (so a redelivery is stored once); the chat is
  the space (`googlechat:spaces/<id>`), the thread its thread's id; a DM is always a
  mention, in a space the bot's own `USER_MENTION` annotation makes one (its text is
  `argumentText`, the mention removed); attached files (`attachmentDataRef`) fetched
  through the Chat API within the door's deadline;
- a button click (`CARD_CLICKED`, or the add-on's `buttonClickedPayload`) on one of our
  cards (`ncq:<card>:<index>`): an action, mapped to its option through the card sent
  to that space; the card is then edited to show the choice;
- anything else (ADDED_TO_SPACE, REMOVED_FROM_SPACE…): answered 200, stored nowhere.
A storage failure answers 503 (the door), so Google retries.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import aiohttp

from nanoclaw import jsonin
from nanoclaw.channels.googlechat_api import Chat, ChatError, Rejected, Verifier
from nanoclaw.channels.text import SAFE_FILE, attachment, decode_choice, parse_question
from nanoclaw.channels.webhook import BadPayload, Webhook
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

CHANNEL = "googlechat"
FILE_BUDGET = 4.0
MAX_DOWNLOAD = 16 << 20
MAX_TEXT = 100_000
SPACE = re.compile(r"spaces/[A-Za-z0-9_-]{1,128}")
MESSAGE = re.compile(r"spaces/[A-Za-z0-9_-]{1,128}/messages/[A-Za-z0-9_.-]{1,256}")
THREAD = re.compile(r"spaces/[A-Za-z0-9_-]{1,128}/threads/([A-Za-z0-9_.-]{1,256})")
USER = re.compile(r"users/[A-Za-z0-9_@.-]{1,128}")


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _str(v: Any, n: int = 1000) -> str:
    return v[:n] if isinstance(v, str) else ""


@dataclass
class Event:
    kind: str             # chat | action
    space: str
    thread: str | None
    key: str
    user: str
    name: str | None
    text: str = ""
    is_group: bool = False
    is_mention: bool = False
    choice: str = ""
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def platform_id(self) -> str:
        return f"{CHANNEL}:{self.space}"


def _click_data(body: dict[str, Any]) -> str:
    common = _dict(body.get("commonEventObject") or body.get("common"))
    params = _dict(common.get("parameters"))
    if isinstance(params.get("ncq"), str):
        return params["ncq"]
    for p in _dict(body.get("action")).get("parameters") or []:
        if _dict(p).get("key") == "ncq" and isinstance(_dict(p).get("value"), str):
            return p["value"]
    return ""


def parse(body: Any) -> Event | None:
    """The event as NanoClaw sees it, None for one it ignores; BadPayload if it is not a
    Chat event at all."""
    if not isinstance(body, dict):
        raise BadPayload("not a Google Chat event: not an object")
    chat = _dict(body.get("chat"))
    if chat:  # the Workspace add-on envelope
        user = _dict(chat.get("user"))
        when = _str(chat.get("eventTime"), 40)
        if chat.get("messagePayload"):
            p = _dict(chat["messagePayload"])
            kind, message, space = "MESSAGE", _dict(p.get("message")), _dict(p.get("space"))
        elif chat.get("buttonClickedPayload"):
            p = _dict(chat["buttonClickedPayload"])
            kind, message, space = "CARD_CLICKED", _dict(p.get("message")), _dict(p.get("space"))
        else:
            return None
    elif isinstance(body.get("type"), str):
        kind, message, space = body["type"], _dict(body.get("message")), _dict(body.get("space"))
        user, when = _dict(body.get("user")), _str(body.get("eventTime"), 40)
    else:
        raise BadPayload("not a Google Chat event: no type and no chat payload")
    if kind not in ("MESSAGE", "CARD_CLICKED"):
        return None
    sname = _str(space.get("name") or _str(message.get("space", {}).get("name")
                                          if isinstance(message.get("space"), dict) else ""), 200)
    if not SPACE.fullmatch(sname):
        raise BadPayload("an event without a valid space")
    sender = _dict(message.get("sender")) if kind == "MESSAGE" else user
    uid = _str(sender.get("name"), 200)
    if not USER.fullmatch(uid):
        raise BadPayload("an event without a valid user")
    if sender.get("type") == "BOT":
        return None  # an app's message (ours, or another app's)
    t = THREAD.fullmatch(_str(_dict(message.get("thread")).get("name"), 400))
    thread = t.group(1) if t else None
    stype = _str(space.get("spaceType") or space.get("type"), 40)
    is_group = stype not in ("DIRECT_MESSAGE", "DM") or space.get("singleUserBotDm") is False
    name = _str(sender.get("displayName"), 100) or None
    if kind == "CARD_CLICKED":
        mname = _str(message.get("name"), 400)
        return Event("action", sname, thread, f"click:{mname[-120:]}:{uid}:{when}", uid, name,
                     choice=_click_data(body), is_group=is_group)
    mname = _str(message.get("name"), 400)
    if not MESSAGE.fullmatch(mname) or not mname.startswith(sname + "/"):
        raise BadPayload("a message without a valid name")
    mention = any(
        _dict(a).get("type") == "USER_MENTION" and _dict(_dict(_dict(a).get("userMention"))
                                                        .get("user")).get("type") == "BOT"
        for a in (message.get("annotations") if isinstance(message.get("annotations"), list)
                  else []))
    text = _str(message.get("argumentText") if mention and isinstance(
        message.get("argumentText"), str) else message.get("text"), MAX_TEXT).strip()
    files = [a for a in message.get("attachment") if isinstance(a, dict)] if isinstance(
        message.get("attachment"), list) else []
    return Event("chat", sname, thread, mname, uid, name, text, is_group,
                 mention or not is_group, files=files)


class ChatWebhook(Webhook):
    name = CHANNEL
    accepted = ("application/json", "{}")  # Google Chat reads the answer: JSON, no message

    def __init__(self, settings, host):
        super().__init__(settings, host)
        if not settings.google_chat_audience.strip():
            raise ConfigError("GOOGLE_CHAT_AUDIENCE is not set: the project number and/or the"
                              " app URL Google's tokens are issued for (without it no event"
                              " can be trusted)")
        self.verifier = Verifier(settings)
        self.api = Chat(settings, timeout=FILE_BUDGET)
        self.tasks: set[asyncio.Task] = set()

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        try:
            self.verifier.check(headers.get("Authorization", ""))
        except Rejected as e:
            logger.warning("googlechat: event refused, check failed: {} (nothing stored)", e)
            return False
        return True

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        try:
            ev = parse(jsonin.loads(raw))
        except jsonin.BadJSON as e:
            raise BadPayload(str(e)) from None
        if ev is None:
            return 0
        pid = ev.platform_id
        if self.host.seen(pid, ev.key):
            return 0
        if ev.kind == "action":
            return await self._click(ev)
        payload = {"text": ev.text, "sender_id": f"{CHANNEL}:{ev.user}", "sender_name": ev.name,
                   "is_mention": ev.is_mention, "is_group": ev.is_group,
                   "attachments": await self._files(ev)}
        return int(await self.host.inbound(pid, ev.key, payload, thread_id=ev.thread))

    async def close(self) -> None:
        await self.api.close()

    async def _click(self, ev: Event) -> int:
        pid = ev.platform_id
        choice = decode_choice(ev.choice)
        card = parse_question(self.host.question(choice[0], pid) or {}) if choice else None
        option = card.value(choice[1]) if card and choice else None
        if card is None or option is None or choice is None:
            logger.info("googlechat: a click on an unknown card ignored ({})", ev.choice[:80])
            return 0
        new = await self.host.inbound(pid, ev.key, {
            "question_id": card.question_id, "option": option,
            "user_id": f"{CHANNEL}:{ev.user}"}, thread_id=ev.thread, kind="action")
        if new:
            store = self.host.store
            mid = store.sent_card_message_id(CHANNEL, card.question_id, pid)
            if mid:
                store.enqueue_send(f"choice:{CHANNEL}:{ev.key}", CHANNEL, pid, ev.thread, "chat",
                                   {"operation": "edit", "messageId": mid, "text":
                                    f"{card.text()}\n\n*{card.selected_label(choice[1])}*"
                                    f" (by {ev.name or ev.user})"})
        return int(new)

    async def _files(self, ev: Event) -> list[dict[str, Any]]:
        out = []
        deadline = asyncio.get_running_loop().time() + FILE_BUDGET
        for a in ev.files:
            name = SAFE_FILE.sub("_", _str(a.get("contentName"), 200) or "file")[:128] or "file"
            mime = _str(a.get("contentType"), 100) or None
            ref = _str(_dict(a.get("attachmentDataRef")).get("resourceName"), 2000)
            if not ref:
                drive = _dict(a.get("driveDataRef")).get("driveFileId")
                why = f"a Google Drive file ({_str(drive, 80)}) is not fetched" if drive else \
                    "no attachment data"
                out.append(attachment(name, mime) | {"error": why})
                continue
            left = deadline - asyncio.get_running_loop().time()
            try:
                if left < 0.1:
                    raise asyncio.TimeoutError()
                data, got = await asyncio.wait_for(self.api.download(ref, MAX_DOWNLOAD), left)
                out.append(attachment(name, mime or (got or "").split(";")[0] or None, data))
                continue
            except asyncio.TimeoutError:
                why = "not fetched: the download took too long"
            except (ChatError, aiohttp.ClientError, OSError, ValueError) as e:
                why = f"download failed: {e}"
            logger.warning("googlechat: a file of {} {}", ev.key[-60:], why)
            out.append(attachment(name, mime) | {"error": why})
        return out
