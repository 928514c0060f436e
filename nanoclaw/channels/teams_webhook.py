"""Microsoft Teams, inbound side: Bot Framework activities POSTed to the webhook door at
/webhook/teams (the outbound side is `teams.py`).

`verify` checks the `Authorization` JWT (`teams_api.Validator`); a failure logs which
check failed and is answered 401, nothing stored. A verified activity:
- `message` with text: chat, under the activity id. The chat is the conversation
  without its `;messageid=` suffix (`teams:<conversation id>`); in a channel the suffix
  is the reply chain, our thread. The bot's own `<at>` mention is stripped and makes
  `is_mention`; a personal chat is always a mention. Files (`file.download.info`,
  images) are fetched from allow-listed hosts only, within the door's deadline.
- `message` with `value.ncq` (an Adaptive Card `Action.Submit` of one of our cards): an
  action, mapped to its option through the card sent to that chat; the card is then
  edited to show the choice (an edit queued to the channel's outbox).
- `messageUpdate` (a user's edit): chat `[edited] …` under `<id>:edited:<time>`.
Everything else (conversationUpdate, reactions, invoke) is answered 200, stored nowhere.
Users are `teams:<Bot Framework user id>` (the id has a colon of its own, `29:…`, so it is
namespaced here). The activity's serviceUrl is remembered per conversation (`host_state`) for replies; a
new message in a wired chat shows "typing…" at once, in the background.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import aiohttp

from nanoclaw import jsonin
from nanoclaw.channels.teams_api import Connector, NotAllowed, Rejected, TeamsError, Validator
from nanoclaw.channels.text import EDITED, SAFE_FILE, attachment, decode_choice, parse_question
from nanoclaw.channels.webhook import BadPayload, Webhook
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

CHANNEL = "teams"
FILE_BUDGET = 4.0
MAX_DOWNLOAD = 16 << 20
MAX_TEXT = 100_000
AT = re.compile(r"<at>(.*?)</at>", re.S)
DOWNLOAD_INFO = "application/vnd.microsoft.teams.file.download.info"


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _str(v: Any, n: int = 1000) -> str:
    return v[:n] if isinstance(v, str) else ""


def split_conversation(conv: str) -> tuple[str, str | None]:
    """`19:x@thread.tacv2;messageid=17` → (`19:x@thread.tacv2`, `17`)."""
    base, sep, thread = conv.partition(";messageid=")
    return base, (thread or None) if sep else None


@dataclass
class Activity:
    kind: str                 # chat | edit | action
    conversation: str         # without the reply chain
    thread: str | None
    id: str
    key: str                  # the event's idempotency key
    user: str
    name: str | None
    text: str
    is_group: bool
    is_mention: bool
    service: str
    reply_to: str | None = None
    value: Any = None
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def platform_id(self) -> str:
        return f"{CHANNEL}:{self.conversation}"


def parse(body: Any) -> Activity | None:
    """The activity as NanoClaw sees it, None for one it ignores; BadPayload if it is not
    an activity at all."""
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise BadPayload("not a Bot Framework activity: no type")
    kind = body["type"]
    if kind not in ("message", "messageUpdate"):
        return None
    conv = _dict(body.get("conversation"))
    sender, bot = _dict(body.get("from")), _dict(body.get("recipient"))
    cid, aid, uid = conv.get("id"), body.get("id"), sender.get("id")
    if not all(isinstance(v, str) and 0 < len(v) <= 512 for v in (cid, aid, uid)):
        raise BadPayload("an activity without a conversation, id or sender")
    base, thread = split_conversation(cid)
    if not base or (thread is not None and not 0 < len(thread) <= 128):
        raise BadPayload("an activity with a bad conversation id")
    if uid == bot.get("id"):
        return None  # our own
    ctype = _str(conv.get("conversationType"), 40) or ("channel" if thread else "personal")
    is_group = ctype != "personal" or conv.get("isGroup") is True
    text, mention = _str(body.get("text"), MAX_TEXT), False
    for e in body.get("entities") if isinstance(body.get("entities"), list) else []:
        e = _dict(e)
        if e.get("type") == "mention" and _dict(e.get("mentioned")).get("id") == bot.get("id"):
            mention = True
            if isinstance(e.get("text"), str) and e["text"]:
                text = text.replace(e["text"], "")
    text = AT.sub(lambda m: m.group(1), text).strip()  # other people's mentions: names
    edited = kind == "messageUpdate"
    if edited and _dict(body.get("channelData")).get("eventType") not in (None, "editMessage"):
        return None  # undelete, soft delete: not an edit
    value = body.get("value")
    action = not edited and isinstance(value, dict) and isinstance(value.get("ncq"), str)
    when = _str(body.get("timestamp") or body.get("localTimestamp"), 40)
    files = [a for a in body.get("attachments") if isinstance(a, dict)] if isinstance(
        body.get("attachments"), list) else []
    return Activity(
        "action" if action else "edit" if edited else "chat", base, thread, aid,
        f"{aid}:edited:{when}" if edited else aid, uid, _str(sender.get("name"), 100) or None,
        text, is_group, mention or not is_group, _str(body.get("serviceUrl"), 500),
        _str(body.get("replyToId"), 200) or None, value, files)


class TeamsWebhook(Webhook):
    name = CHANNEL

    def __init__(self, settings, host):
        super().__init__(settings, host)
        if not (settings.teams_app_id and settings.teams_app_password):
            raise ConfigError("TEAMS_APP_ID and TEAMS_APP_PASSWORD must both be set")
        self.validator = Validator(settings)
        self.validator.prefetch()
        self.api = Connector(settings, timeout=FILE_BUDGET)
        self.services: dict[str, str] = {}
        self.tasks: set[asyncio.Task] = set()

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        try:
            body = jsonin.loads(raw)
        except jsonin.BadJSON:
            body = None
        try:
            self.validator.check(headers.get("Authorization", ""),
                                 body if isinstance(body, dict) else {})
        except Rejected as e:
            logger.warning("teams: activity refused, check failed: {} (nothing stored)", e)
            return False
        return True

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        try:
            act = parse(jsonin.loads(raw))
        except jsonin.BadJSON as e:
            raise BadPayload(str(e)) from None
        if act is None:
            return 0
        self._remember(act)
        pid = act.platform_id
        if self.host.seen(pid, act.key):
            return 0
        if act.kind == "action":
            return await self._click(act)
        payload: dict[str, Any] = {
            "text": EDITED + act.text if act.kind == "edit" else act.text,
            "sender_id": f"{CHANNEL}:{act.user}", "sender_name": act.name, "is_mention": act.is_mention,
            "is_group": act.is_group, "attachments": await self._files(act)}
        if act.kind == "edit":
            payload.update(edited=True, edit_of=act.id)
        new = await self.host.inbound(pid, act.key, payload, thread_id=act.thread)
        if new and self.host.is_wired(pid):
            self._background(self._typing(act))
        return int(new)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await self.api.close()

    def _remember(self, act: Activity) -> None:
        """Where replies to this conversation go (checked against the allowlist again
        when used)."""
        if act.service and self.services.get(act.conversation) != act.service:
            self.host.store.set_state(f"teams:service:{act.conversation}", act.service)
            self.services[act.conversation] = act.service

    async def _click(self, act: Activity) -> int:
        pid = act.platform_id
        choice = decode_choice(act.value.get("ncq"))
        card = parse_question(self.host.question(choice[0], pid) or {}) if choice else None
        option = card.value(choice[1]) if card and choice else None
        if card is None or option is None or choice is None:
            logger.info("teams: a click on an unknown card ignored ({})",
                        _str(act.value.get("ncq"), 80))
            return 0
        new = await self.host.inbound(pid, act.key, {
            "question_id": card.question_id, "option": option, "user_id": f"{CHANNEL}:{act.user}"},
            thread_id=act.thread, kind="action")
        if new:
            store = self.host.store
            mid = store.sent_card_message_id(CHANNEL, card.question_id, pid)
            label = card.selected_label(choice[1])
            if mid:
                store.enqueue_send(f"choice:{CHANNEL}:{act.key}", CHANNEL, pid, act.thread,
                                   "chat", {"operation": "edit", "messageId": mid, "text":
                                            f"{card.text()}\n\n**{label}** (by {act.name or act.user})"})
        return int(new)

    async def _files(self, act: Activity) -> list[dict[str, Any]]:
        out = []
        deadline = asyncio.get_running_loop().time() + FILE_BUDGET
        for a in act.files:
            ctype, content = _str(a.get("contentType"), 200), _dict(a.get("content"))
            if ctype == DOWNLOAD_INFO:
                url, mime = _str(content.get("downloadUrl"), 4000), None
            elif ctype.startswith(("image/", "application/", "text/", "audio/", "video/")) \
                    and ctype != "text/html" and not ctype.startswith("application/vnd."):
                url, mime = _str(a.get("contentUrl"), 4000), ctype
            else:
                continue  # the message's HTML copy, cards
            name = SAFE_FILE.sub("_", _str(a.get("name"), 200) or "file")[:128] or "file"
            left = deadline - asyncio.get_running_loop().time()
            try:
                if left < 0.1:
                    raise asyncio.TimeoutError()
                data, got = await asyncio.wait_for(self.api.fetch(url, MAX_DOWNLOAD), left)
                out.append(attachment(name, mime or (got or "").split(";")[0] or None, data))
                continue
            except NotAllowed as e:
                why = f"not fetched: {e}"
            except asyncio.TimeoutError:
                why = "not fetched: the download took too long"
            except (TeamsError, aiohttp.ClientError, OSError, ValueError) as e:
                why = f"download failed: {e}"
            logger.warning("teams: a file of {} {}", act.id[:60], why)
            out.append(attachment(name, mime) | {"error": why})
        return out

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _typing(self, act: Activity) -> None:
        await asyncio.sleep(0)  # after the door has answered
        conv = act.conversation + (f";messageid={act.thread}" if act.thread else "")
        try:
            await asyncio.wait_for(self.api.send(act.service, conv, {"type": "typing"}), 10)
        except Exception as e:  # best effort
            logger.debug("teams: typing in {} failed: {!r}", act.conversation[:60], e)
