"""Email as chat: the `channel:email` worker. Two transports behind one channel:
- IMAP + SMTP with any ordinary mailbox (`EMAIL_IMAP_HOST` + `EMAIL_SMTP_HOST`, with
  `EMAIL_USERNAME`/`EMAIL_PASSWORD`): mail in by IMAP IDLE (`email_imap.py`), out by
  SMTP (`email_smtp.py`);
- Resend (`RESEND_API_KEY`): out through its API with an `Idempotency-Key`
  (`resend_api.py`); in through its webhook at `/webhook/resend` (`resend_webhook.py`,
  with `RESEND_WEBHOOK_SECRET`) or, without one, by polling its received emails here.
SMTP sends when `EMAIL_SMTP_HOST` is set, else Resend.

A chat is the correspondent's address (`email:<address>`), a thread the reply chain
(its root Message-ID). A reply answers the user's mail (`In-Reply-To`, `References`,
`Re:` subject: it threads in their mail program), Markdown as text/plain with an HTML
twin, files attached; a card goes as a numbered list, answered by a bare number.
Mail cannot be edited or reacted to: those sends fail at once, saying so. No typing.
A reply longer than `LIMIT` characters goes as several mails in the same thread; each
carries a Message-ID made from its part key, so a retried part is the same message.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from nanoclaw.channels.base import Channel, OutboundMessage, SendError, Unavailable
from nanoclaw.channels.email_compose import (
    LIMIT,
    compose,
    domain_of,
    first_line_subject,
    reply_subject,
    text_of,
    to_html,
)
from nanoclaw.channels.email_inbound import CHANNEL, platform_id, take
from nanoclaw.channels.email_parse import ADDR, BadMail, parse
from nanoclaw.channels.text import load_files, parse_question, reply_target, split_text
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger


def imap_mode(s: Settings) -> bool:
    return bool(s.email_imap_host and s.email_smtp_host)


def enabled(s: Settings) -> bool:
    return imap_mode(s) or bool(s.resend_api_key)


def address_of(pid: str) -> str:
    addr = pid.removeprefix(f"{CHANNEL}:")
    if not pid.startswith(f"{CHANNEL}:") or not ADDR.fullmatch(addr):
        raise SendError(f"not an email chat: {pid[:80]!r}", permanent=True)
    return addr


class EmailChannel(Channel):
    name = CHANNEL
    supports_threads = True

    def __init__(self, settings: Settings, host: Any):
        super().__init__(settings, host)
        self.sender = (settings.email_address or (settings.email_username
                       if "@" in settings.email_username else "")).strip()
        self.inbox: Any = None
        self.api: Any = None
        self.tasks: list[asyncio.Task] = []

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return enabled(settings)

    async def setup(self) -> None:
        s = self.settings
        if not ADDR.fullmatch(self.sender):
            raise ConfigError("EMAIL_ADDRESS is not set: the address replies come from"
                              " (or an EMAIL_USERNAME that is one)")
        if s.resend_api_key:
            from nanoclaw.channels.resend_api import Resend

            self.api = Resend(s)
        if s.email_imap_host and not s.email_smtp_host:
            raise ConfigError("EMAIL_IMAP_HOST is set without EMAIL_SMTP_HOST")
        if imap_mode(s):
            from nanoclaw.channels.email_imap import ImapInbox

            self.inbox = ImapInbox(s, self.host.store, self._take)
            self._start(self.inbox.run(), "IMAP")
        elif self.api is not None and not s.resend_webhook_secret:
            self._start(self._poll_resend(), "Resend polling")

    def _start(self, coro: Any, what: str) -> None:
        task = asyncio.create_task(coro)
        task.add_done_callback(lambda t: self._ended(t, what))
        self.tasks.append(task)

    def _ended(self, task: asyncio.Task, what: str) -> None:
        if task.cancelled():
            return
        e = task.exception()
        if isinstance(e, ConfigError):
            self.halt(str(e))
        elif e is not None:
            logger.error("email: {} stopped: {}: {}", what, type(e).__name__, e)
            self.die(f"{what} stopped: {type(e).__name__}")

    async def _take(self, mail: Any) -> int:
        return await take(self.host, self.settings, mail)

    async def teardown(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            try:
                await t
            except BaseException:  # noqa: BLE001 - stopping; its end was logged
                pass
        if self.inbox is not None:
            await self.inbox.close()
        if self.api is not None:
            await self.api.close()

    def is_connected(self) -> bool:
        return self.inbox.connected if self.inbox is not None else True

    async def open_dm(self, handle: str) -> str:
        """A DM is the address itself (an approval card to an owner known by mail)."""
        pid = platform_id(handle.removeprefix(f"{CHANNEL}:").strip())
        address_of(pid)  # a handle that is no address fails the send, saying so
        return pid

    # ---- sending -------------------------------------------------------------------------
    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        to = address_of(platform_id)
        c, op = message.content, message.content.get("operation")
        if op == "edit":
            raise SendError("a sent mail cannot be edited (email has no edits)", permanent=True)
        if op == "reaction":
            raise SendError("email has no reactions", permanent=True)
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        text, files = text_of(c), load_files(c)
        parts = split_text(text, LIMIT) if text.strip() else ([""] if files else [])
        if not parts:
            raise SendError("empty message", permanent=True)
        subject, answered, refs = self._threading(platform_id, thread_id, message, text, c)
        for i, body in enumerate(parts):
            if i < len(message.parts):
                continue  # sent before an earlier attempt was cut off
            last = i == len(parts) - 1
            message.sent(await self._send_one(to, subject, body, files if last else [],
                                              message.part_key(i), answered, refs))
        return message.parts[0]

    def _threading(self, pid: str, thread: str | None, message: OutboundMessage, text: str,
                   c: dict[str, Any]) -> tuple[str, str | None, list[str]]:
        """(subject, the Message-ID answered, References) for a send."""
        answered = reply_target(message.in_reply_to) or thread
        if answered and not re.fullmatch(r"[^<>\s]{1,500}", answered):
            answered = None
        store = self.host.store
        got = store.inbound_payload(CHANNEL, pid, answered) if answered else None
        if answered and got is not None:  # the answered mail's own chain, then it
            refs = [r for r in got.get("references") or [] if isinstance(r, str)]
            return reply_subject(str(got.get("subject") or "")), answered, refs + [answered]
        if answered:  # a mail we do not have: the thread's root, then it
            root = store.inbound_payload(CHANNEL, pid, thread) if thread else None
            refs = [thread] if thread and thread != answered else []
            return reply_subject(str((root or {}).get("subject") or "")), answered, \
                refs + [answered]
        q = parse_question(c)
        return (q.title or first_line_subject(q.question)) if q else first_line_subject(text), \
            None, []

    async def _send_one(self, to: str, subject: str, body: str, files: list, key: str,
                        answered: str | None, refs: list[str]) -> str:
        s = self.settings
        mid = f"{key}@{domain_of(self.sender)}"
        if s.email_smtp_host:
            from nanoclaw.channels import email_smtp

            msg = compose(sender=self.sender, sender_name=s.email_from_name, to=to,
                          subject=subject, text=body, message_id=mid, in_reply_to=answered,
                          references=refs, files=files)
            await email_smtp.send(s, msg, self.sender, to)
            return mid
        if self.api is None:
            raise Unavailable("no transport to send with")
        headers = {"Auto-Submitted": "auto-replied"}
        if answered:
            headers["In-Reply-To"] = f"<{answered}>"
            headers["References"] = " ".join(f"<{r}>" for r in refs[-20:])
        return await self.api.send(sender=self.sender, sender_name=s.email_from_name, to=to,
                                   subject=subject, text=body or " ", html=to_html(body),
                                   headers=headers, files=files, key=key)

    # ---- Resend without a webhook: poll its received emails ----------------------------------
    async def _poll_resend(self) -> None:
        key = "email:resend:seen"  # the ids of the latest listing already taken
        known = self.host.store.get_state(key)
        seen, first = set((known or "").split()), known is None
        while True:
            try:
                listed = await self.api.received_list()
                ids = [str(e.get("id")) for e in listed if e.get("id")]
                for eid in reversed(ids):  # oldest first
                    if eid in seen:
                        continue
                    if not first:
                        await self._take_resend(eid)
                    seen.add(eid)
                seen = {i for i in ids if i in seen}
                self.host.store.set_state(key, " ".join(sorted(seen)) or "-")
                first = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("email: polling Resend failed: {}: {}", type(e).__name__, e)
            await asyncio.sleep(self.settings.email_poll_interval)

    async def _take_resend(self, email_id: str) -> None:
        try:
            mail = parse(await self.api.raw_message(email_id))
        except BadMail as e:
            logger.warning("email: Resend email {} is not a mail we can read ({})", email_id, e)
            return
        await self._take(mail)
