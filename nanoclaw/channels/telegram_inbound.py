"""Telegram's inbound half (`TelegramInbound`, a mixin of `TelegramChannel`): turning one
raw getUpdates update into the host's payload: a message (text or caption, sender,
mention, the message replied to, forum topic), its files, or a button click.

An edited message (`edited_message`) reaches the agent as a new message: its text
prefixed `[edited] `, `edit_of` naming the original, and the id `edit<update id>:<message
id>`, so it is neither deduplicated against the original nor stored twice when Telegram
delivers the update again (attachments are not fetched again).

Malformed updates are logged and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from telegram import Bot, User

from nanoclaw.channels.base import ChannelHost
from nanoclaw.channels.text import EDITED, attachment, decode_choice, parse_question
from nanoclaw.log import logger

MAX_DOWNLOAD = 20 << 20  # the Bot API serves files up to 20 MB


class TelegramInbound:
    """The update handlers; the connection they use (bot, me, host...) is the channel's."""

    bot: Bot
    me: User
    username: str
    host: ChannelHost
    _edit: Callable[[int, int, str], Awaitable[None]]  # the channel's (outbound)

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
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
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
