"""Telegram, with python-telegram-bot's `Bot` (HTTP Bot API, long polling, base URL from
`TELEGRAM_API_BASE`).

We run our own getUpdates loop instead of PTB's Updater so that an update is confirmed
(the next offset) only after it is stored: a crash or a stalled poll loses nothing, and
a redelivered update is dropped by the inbound idempotency key. Every poll is bounded
(PTB's read timeout, then a hard `wait_for`), so a wedged connection pool is noticed
within `poll timeout + 5 s`; a poll that has not succeeded for `channel_liveness`
seconds makes the worker exit non-zero (a fresh process, under the crash-loop breaker).

Errors are sorted by what to do next (PTB's own networkloop): wait out `retry_after`,
retry a timeout at once, back off other network errors up to 30 s, and treat a rejected
token as configuration (not restart-looped).

Agent Markdown goes out as Telegram HTML (`markdown.telegram_html`, split within 4096
UTF-16 units of markup); a chunk Telegram cannot parse ("can't parse entities") is sent
again as its plain text rather than failing the send.

An edited message (`edited_message`) reaches the agent as a new message: its text
prefixed `[edited] `, `edit_of` naming the original, and the id `edit<update id>:<message
id>`, so it is neither deduplicated against the original nor stored twice when Telegram
delivers the update again (attachments are not fetched again).

platform_id `telegram:<chat id>`; thread_id is a forum topic id. Malformed updates are
logged and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from telegram import (
    Bot,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    ReactionTypeEmoji,
    ReplyParameters,
)
from telegram import error as tg
from telegram.constants import ParseMode
from telegram.request import HTTPXRequest

from nanoclaw.channels.base import Channel, OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.markdown import Chunk, telegram_html
from nanoclaw.channels.text import (
    EDITED,
    attachment,
    card_links,
    decode_choice,
    encode_choice,
    load_files,
    parse_question,
    plain_text,
    reply_target,
)
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

LIMIT = 4096
MAX_DOWNLOAD = 20 << 20  # the Bot API serves files up to 20 MB
ALLOWED = ["message", "edited_message", "callback_query"]


def _seconds(e: tg.RetryAfter) -> float:
    ra = getattr(e, "_retry_after", None)
    if ra is not None and hasattr(ra, "total_seconds"):
        return max(0.0, ra.total_seconds())
    return float(getattr(e, "retry_after", 1) or 1)


class TelegramChannel(Channel):
    name = "telegram"
    supports_threads = True

    @classmethod
    def enabled(cls, settings) -> bool:
        return bool(settings.telegram_bot_token)

    # ---- connection -------------------------------------------------------------------
    async def setup(self) -> None:
        s = self.settings
        base = s.telegram_api_base.rstrip("/")
        self.poll_timeout = s.telegram_poll_timeout
        self.bot = Bot(s.telegram_bot_token, base_url=f"{base}/bot",
                       base_file_url=f"{base}/file/bot",
                       request=HTTPXRequest(connection_pool_size=8, read_timeout=20,
                                            write_timeout=20, connect_timeout=10),
                       get_updates_request=HTTPXRequest(
                           connection_pool_size=1, read_timeout=self.poll_timeout + 5,
                           connect_timeout=10))
        try:
            await asyncio.wait_for(self.bot.initialize(), 30)  # getMe
        except tg.InvalidToken as e:
            raise ConfigError(f"TELEGRAM_BOT_TOKEN was rejected: {e}") from None
        self.me = self.bot.bot
        self.username = (self.me.username or "").lower()
        self.last_ok = time.monotonic()
        self.parts: dict[str, list[int]] = {}  # idem key → chunk ids already sent
        self.poller = asyncio.create_task(self._poll_forever())
        self.poller.add_done_callback(self._poller_done)
        logger.info("telegram connected as @{} (id {})", self.me.username, self.me.id)

    async def teardown(self) -> None:
        poller = getattr(self, "poller", None)
        while poller and not poller.done():
            # again until it ends: Python 3.11's wait_for loses a cancel that lands as
            # its poll returns, and the loop would poll on
            poller.cancel()
            await asyncio.wait({poller}, timeout=1)
        if hasattr(self, "bot"):
            await self.bot.shutdown()

    def is_connected(self) -> bool:
        return time.monotonic() - self.last_ok < self._liveness()

    async def _poll_forever(self) -> None:
        offset: int | None = None
        failures = 0
        while True:
            try:
                updates = await asyncio.wait_for(self.bot._post(  # raw dicts: parsed one by one
                    "getUpdates", {"offset": offset, "timeout": int(self.poll_timeout),
                                   "allowed_updates": ALLOWED},
                    read_timeout=self.poll_timeout + 5), self.poll_timeout + 8)
            except asyncio.CancelledError:
                raise
            except (tg.RetryAfter, tg.TimedOut, asyncio.TimeoutError, tg.TelegramError,
                    OSError) as e:
                failures += 1
                delay = self._poll_failed(e, failures)
                left = self._liveness() - (time.monotonic() - self.last_ok)
                if left <= 0 or self.dead:
                    self.die(self.dead or f"no successful poll for {self._liveness():.0f}s")
                    return
                await asyncio.sleep(min(delay, left + 0.1))
                continue
            except Exception as e:  # a bug or garbage from the server: never a dead loop
                failures += 1
                logger.warning("telegram poll failed unexpectedly: {!r}", e)
                await asyncio.sleep(min(30.0, 2.0 ** failures))
                continue
            if failures:
                logger.info("telegram polling recovered after {} failures", failures)
            failures = 0
            self.last_ok = time.monotonic()
            if not isinstance(updates, list):
                logger.warning("telegram getUpdates returned {}, not a list", type(updates).__name__)
                continue
            for u in updates:
                uid = u.get("update_id") if isinstance(u, dict) else None
                if not isinstance(uid, int) or isinstance(uid, bool):
                    logger.warning("telegram update without an update_id skipped")
                    continue
                await self._handle(u)  # stored (or skipped as malformed) before confirming
                offset = max(offset or 0, uid + 1)

    def _poller_done(self, task: asyncio.Task) -> None:
        if not task.cancelled():
            e = task.exception()
            self.die(f"polling stopped: {e!r}" if e else self.dead or "polling stopped")

    def _poll_failed(self, e: BaseException, failures: int) -> float:
        if isinstance(e, tg.RetryAfter):
            logger.warning("telegram asked us to wait {:.0f}s", _seconds(e))
            return _seconds(e)
        if isinstance(e, (tg.TimedOut, asyncio.TimeoutError)):
            logger.warning("telegram long poll stalled (attempt {}); polling again", failures)
            return 0.0 if failures < 3 else 1.0
        if isinstance(e, tg.InvalidToken):
            self.die(f"the bot token was rejected: {e}")
            return 0.0
        delay = min(30.0, 0.5 * 2 ** failures)
        logger.warning("telegram poll failed ({}: {}); retry in {:.1f}s", type(e).__name__, e, delay)
        return delay

    def _liveness(self) -> float:
        """Seconds without a successful poll before we give up; never less than a poll
        plus its timeout margin, so one stalled poll is retried in-process first."""
        return max(self.settings.channel_liveness, self.poll_timeout + 10)

    # ---- inbound ----------------------------------------------------------------------
    async def _handle(self, u: dict[str, Any]) -> None:
        try:
            if isinstance(u.get("callback_query"), dict):
                return await self._click(u["callback_query"])
            m, edited = u.get("message"), isinstance(u.get("edited_message"), dict)
            if edited:
                m = u["edited_message"]
            if not isinstance(m, dict):
                return  # channel posts and others are not chat input
            ev = self._parse(m)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            logger.warning("malformed telegram update {} skipped: {!r}", u.get("update_id"), e)
            return
        if ev is None:
            return
        pid, mid, payload, thread = ev
        if edited:  # a new message for the agent, unique per edit, stable on redelivery
            payload.update(text=EDITED + payload["text"], edited=True, edit_of=mid,
                           attachments=[])
            mid = f"edit{u['update_id']}:{mid}"
        else:
            payload["attachments"] = await self._download(m)
        await self.host.inbound(pid, mid, payload, thread)

    def _parse(self, m: dict[str, Any]) -> tuple[str, str, dict[str, Any], str | None] | None:
        chat, sender = m["chat"], m.get("from") or {}
        chat_id, mid = chat["id"], m["message_id"]
        if not isinstance(chat_id, int) or not isinstance(mid, int):
            raise ValueError("chat id and message id must be integers")
        if sender.get("is_bot") and sender.get("id") == self.me.id:
            return None
        text = m.get("text") if isinstance(m.get("text"), str) else m.get("caption")
        text = text if isinstance(text, str) else ""
        private = chat.get("type") == "private"
        name = " ".join(str(sender[k]) for k in ("first_name", "last_name") if sender.get(k))
        reply = m.get("reply_to_message") if isinstance(m.get("reply_to_message"), dict) else None
        payload: dict[str, Any] = {
            "text": text, "sender_id": str(sender.get("id", "")) or None,
            "sender_name": name or sender.get("username") or None,
            "is_mention": private or self._mentions(m, text) or bool(
                reply and (reply.get("from") or {}).get("id") == self.me.id),
            "is_group": not private}
        if reply:
            payload["reply_to"] = {"id": str(reply.get("message_id")),
                                   "text": str(reply.get("text") or reply.get("caption") or ""),
                                   "sender": str((reply.get("from") or {}).get("first_name", ""))}
        thread = m.get("message_thread_id") if m.get("is_topic_message") else None
        return f"telegram:{chat_id}", str(mid), payload, None if thread is None else str(thread)

    def _mentions(self, m: dict[str, Any], text: str) -> bool:
        if not self.username:
            return False
        for ent in m.get("entities") or m.get("caption_entities") or []:
            if isinstance(ent, dict) and ent.get("type") == "mention":
                o, n = int(ent.get("offset", 0)), int(ent.get("length", 0))
                if text[o:o + n].lower() == f"@{self.username}":
                    return True
        return f"@{self.username}" in text.lower()

    async def _download(self, m: dict[str, Any]) -> list[dict[str, Any]]:
        files = []
        doc = m.get("document") if isinstance(m.get("document"), dict) else None
        if doc:
            files.append((doc.get("file_id"), doc.get("file_name") or "document",
                          doc.get("mime_type"), doc.get("file_size")))
        photos = m.get("photo") if isinstance(m.get("photo"), list) else []
        if photos and isinstance(photos[-1], dict):  # the largest size comes last
            p = photos[-1]
            files.append((p.get("file_id"), "photo.jpg", "image/jpeg", p.get("file_size")))
        out = []
        for fid, name, mime, size in files:
            if not isinstance(fid, str):
                continue
            if isinstance(size, int) and size > MAX_DOWNLOAD:
                out.append(attachment(str(name), mime) | {"error": "larger than 20 MB"})
                continue
            try:
                f = await asyncio.wait_for(self.bot.get_file(fid), 30)
                data = bytes(await asyncio.wait_for(f.download_as_bytearray(), 60))
                out.append(attachment(str(name), mime, data))
            except Exception as e:  # keep the message; say the file could not be fetched
                logger.warning("telegram file {} not downloaded: {!r}", fid, e)
                out.append(attachment(str(name), mime) | {"error": f"download failed: {e}"})
        return out

    async def _click(self, cq: dict[str, Any]) -> None:
        choice = decode_choice(cq.get("data"))
        msg = cq.get("message") if isinstance(cq.get("message"), dict) else {}
        chat_id = (msg.get("chat") or {}).get("id")
        if choice is None or not isinstance(chat_id, int) or not isinstance(cq.get("id"), str):
            logger.info("telegram click with unknown data ignored")
            return
        qid, index = choice
        # the card sent to the chat clicked in, under the host's card id (never another
        # card's options: H3)
        card = parse_question(self.host.question(qid, f"telegram:{chat_id}") or {})
        option = card.value(index) if card else None
        if card is None or option is None:
            logger.info("telegram click on unknown card {} ignored", qid)
            await self._best_effort(self.bot.answer_callback_query(cq["id"], text="Expired"))
            return
        user = cq.get("from") or {}
        await self.host.inbound(f"telegram:{chat_id}", f"cb:{cq['id']}", {
            "question_id": qid, "option": option, "user_id": str(user.get("id", ""))},
            None, kind="action")
        await self._best_effort(self.bot.answer_callback_query(cq["id"]))
        if isinstance(msg.get("message_id"), int):
            await self._best_effort(self._edit(
                chat_id, msg["message_id"], f"{card.text()}\n\n✓ {card.selected_label(index)}"))

    async def _best_effort(self, coro: Any) -> None:
        try:
            await asyncio.wait_for(coro, 15)
        except Exception as e:
            logger.debug("telegram best-effort call failed: {!r}", e)

    # ---- outbound ---------------------------------------------------------------------
    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        chat_id = _chat_id(platform_id)
        try:
            return await self._deliver(chat_id, thread_id, message)
        except tg.RetryAfter as e:
            raise RetryAfter(_seconds(e), str(e)) from None
        except tg.BadRequest as e:
            if "not modified" in str(e).lower():
                return message.content.get("messageId")
            raise SendError(f"telegram refused: {e}", permanent=True) from None
        except (tg.Forbidden, tg.ChatMigrated) as e:
            raise SendError(f"telegram refused: {e}", permanent=True) from None
        except tg.InvalidToken as e:
            self.die(f"the bot token was rejected: {e}")
            raise Unavailable("token rejected") from None
        except (tg.TelegramError, OSError, asyncio.TimeoutError) as e:
            raise SendError(f"telegram: {type(e).__name__}: {e}") from None

    async def _deliver(self, chat_id: int, thread_id: str | None,
                       message: OutboundMessage) -> str | None:
        c = message.content
        thread = int(thread_id) if thread_id and thread_id.lstrip("-").isdigit() else None
        op = c.get("operation")
        if op == "edit":
            mid = _int(c.get("messageId"))
            await self._edit(chat_id, mid, str(c.get("text") or ""))
            return str(mid)
        if op == "reaction":
            mid = _int(c.get("messageId"))
            await self.bot.set_message_reaction(chat_id, mid,
                                                [ReactionTypeEmoji(str(c.get("emoji") or "👍"))])
            return str(mid)
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        markup = None
        q = parse_question(c)
        if q:
            try:
                markup = InlineKeyboardMarkup([[InlineKeyboardButton(
                    o["label"][:64], callback_data=encode_choice(q.question_id, i))]
                    for i, o in enumerate(q.options)])
            except ValueError as e:
                raise SendError(str(e), permanent=True) from None
        elif c.get("type") == "card" and card_links(c):
            markup = InlineKeyboardMarkup([[InlineKeyboardButton(label[:64], url=url)]
                                           for label, url in card_links(c)])
        files = load_files(c)  # a bad file is a permanent SendError
        chunks = telegram_html(plain_text(c), LIMIT)
        done = self.parts.setdefault(message.idem_key, [])  # resume a half-sent split
        target = _int_or_none(reply_target(message.in_reply_to))
        for i, chunk in enumerate(chunks):
            if i < len(done):
                continue
            last = i == len(chunks) - 1
            sent = await self._send(
                chat_id, chunk, message_thread_id=thread,
                reply_parameters=ReplyParameters(target, allow_sending_without_reply=True)
                if target and i == 0 else None,
                reply_markup=markup if last else None)
            done.append(sent.message_id)
        for j, f in enumerate(files):
            if len(chunks) + j < len(done):
                continue
            sent = await self.bot.send_document(chat_id, InputFile(f.data, filename=f.name),
                                                message_thread_id=thread)
            done.append(sent.message_id)
        self.parts.pop(message.idem_key, None)
        if not done:
            raise SendError("empty message", permanent=True)
        return str(done[0])

    async def _send(self, chat_id: int, chunk: Chunk, **kwargs: Any) -> Any:
        """One chunk as HTML; as plain text if Telegram cannot parse the HTML."""
        try:
            return await self.bot.send_message(chat_id, chunk.markup, parse_mode=ParseMode.HTML,
                                               **kwargs)
        except tg.BadRequest as e:
            if not _unparsable(e):
                raise
            logger.warning("telegram could not parse our HTML ({}); sending plain text", e)
            return await self.bot.send_message(chat_id, chunk.plain, **kwargs)

    async def _edit(self, chat_id: int, message_id: int, text: str) -> None:
        chunk = (telegram_html(text, LIMIT) or [Chunk("…", "…")])[0]
        try:
            await self.bot.edit_message_text(chunk.markup, chat_id=chat_id,
                                             message_id=message_id, parse_mode=ParseMode.HTML)
        except tg.BadRequest as e:
            if not _unparsable(e):
                raise
            logger.warning("telegram could not parse our HTML ({}); editing as plain text", e)
            await self.bot.edit_message_text(chunk.plain, chat_id=chat_id, message_id=message_id)

    async def set_typing(self, platform_id: str, thread_id: str | None) -> None:
        thread = int(thread_id) if thread_id and thread_id.lstrip("-").isdigit() else None
        await self.bot.send_chat_action(_chat_id(platform_id), "typing", message_thread_id=thread)

    async def open_dm(self, handle: str) -> str:
        """A user's private chat has the user's id; `telegram:<id>` or `<id>` both work."""
        h = handle.split(":", 1)[1] if handle.startswith("telegram:") else handle
        if not h.lstrip("-").isdigit():
            raise SendError(f"cannot open a Telegram DM with {handle!r}", permanent=True)
        return f"telegram:{h}"


def _chat_id(platform_id: str) -> int:
    v = platform_id.split(":", 1)[1] if platform_id.startswith("telegram:") else platform_id
    try:
        return int(v)
    except ValueError:
        raise SendError(f"not a Telegram chat: {platform_id!r}", permanent=True) from None


def _int(v: Any) -> int:
    try:
        return int(str(v).rsplit(":", 1)[-1])
    except (TypeError, ValueError):
        raise SendError(f"not a Telegram message id: {v!r}", permanent=True) from None


def _int_or_none(v: str | None) -> int | None:
    """A message id to reply to; an edit's id (`edit<n>:<id>`) answers the original."""
    v = v.rsplit(":", 1)[-1] if v else v
    return int(v) if v and v.lstrip("-").isdigit() else None


def _unparsable(e: tg.BadRequest) -> bool:
    return "can't parse entities" in str(e).lower()
