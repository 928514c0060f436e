"""Telegram's outbound half (`TelegramOutbound`, a mixin of `TelegramChannel`): a message,
an edit, a reaction, a typing indicator or a DM, with Telegram's errors sorted into the
worker's vocabulary (wait out `retry_after`, fail a refusal now, a rejected token kills
the worker).

Agent Markdown goes out as Telegram HTML (`markdown.telegram_html`, split within 4096
UTF-16 units of markup); a chunk Telegram cannot parse ("can't parse entities") is sent
again as its plain text rather than failing the send. A split half sent when the send
failed is resumed, not repeated (`parts`, by idempotency key).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

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

from nanoclaw.channels.base import OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.markdown import Chunk, telegram_html
from nanoclaw.channels.text import (
    card_links,
    encode_choice,
    load_files,
    parse_question,
    plain_text,
    reply_target,
)
from nanoclaw.log import logger

LIMIT = 4096


def _seconds(e: tg.RetryAfter) -> float:
    ra = getattr(e, "_retry_after", None)
    if ra is not None and hasattr(ra, "total_seconds"):
        return max(0.0, ra.total_seconds())
    return float(getattr(e, "retry_after", 1) or 1)


class TelegramOutbound:
    """The sends; the connection they use (bot, parts, die...) is the channel's."""

    bot: Bot
    die: Callable[[str], None]

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
        done = message.parts  # resume a half-sent split
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
            message.sent(sent.message_id)
        for j, f in enumerate(files):
            if len(chunks) + j < len(done):
                continue
            sent = await self.bot.send_document(chat_id, InputFile(f.data, filename=f.name),
                                                message_thread_id=thread)
            message.sent(sent.message_id)
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
