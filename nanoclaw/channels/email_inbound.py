"""One received mail → one stored event, the same whichever way it came (IMAP in the
`channel:email` worker, Resend's webhook at the door or its polling).

The chat is the correspondent (`email:<address>`), the message id its Message-ID, the
thread the root of its reply chain. Never stored: our own mail (a self-addressed loop),
automatic mail (auto-replies, bounces, lists: `email_parse.auto_reason`), each logged
once, when it is read. A From address is that user only when the receiving server
authenticated it (`email_auth`); otherwise the mail is stored under another identity,
`email-unverified:<address>`, which no member is: a `request_approval` chat then asks
its owner with an approval card and the agent never answers a forged From (a `public`
chat answers anyone, as public means, and the answer goes to the real address). A bare
number from an authenticated sender answers the chat's open question card.
"""

from __future__ import annotations

from typing import Any

from nanoclaw.channels.email_auth import authenticated
from nanoclaw.channels.email_parse import Mail
from nanoclaw.channels.numbered import number_answer
from nanoclaw.config import Settings
from nanoclaw.log import logger

CHANNEL = "email"
UNVERIFIED = "email-unverified:"


def platform_id(address: str) -> str:
    return f"{CHANNEL}:{address.lower()}"


def own_addresses(settings: Settings) -> set[str]:
    out = {a.strip().lower() for a in (settings.email_address, settings.email_username)
           if "@" in (a or "")}
    return out


async def take(host: Any, settings: Settings, mail: Mail) -> int:
    """Store `mail` through `host.inbound`; 1 if it is new and for the agent, else 0.
    Raises what storing raises (the caller must not acknowledge the mail then)."""
    if mail.from_addr in own_addresses(settings):
        logger.debug("email: our own mail {} not fed back", mail.message_id)
        return 0
    if mail.auto:
        logger.info("email: an automatic mail from {} ignored ({}), {}", mail.from_addr,
                    mail.auto, mail.message_id)
        return 0
    pid, mid = platform_id(mail.from_addr), mail.message_id
    if host.store.inbound_seen(CHANNEL, pid, mid):
        return 0
    ok = authenticated(mail.auth_headers, mail.from_addr, settings.email_require_auth,
                       settings.email_authserv_id)
    text = mail.text or ("" if mail.attachments else mail.subject)
    answer = number_answer(host, CHANNEL, pid, text) if ok else None
    if answer is not None:
        card, option = answer
        return int(await host.inbound(pid, mid, {
            "question_id": card.question_id, "option": option, "user_id": mail.from_addr},
            thread_id=mail.thread, kind="action"))
    name = mail.from_name or mail.from_addr
    if not ok:
        logger.warning("email: {} is not authenticated by the receiving server"
                       " (EMAIL_REQUIRE_AUTH={}); stored as an unverified sender",
                       mail.from_addr, settings.email_require_auth)
        name = f"{name} (unverified: the From address was not authenticated)"
    payload: dict[str, Any] = {
        "text": text, "sender_id": mail.from_addr if ok else UNVERIFIED + mail.from_addr,
        "sender_name": name, "is_mention": True, "is_group": False,
        "attachments": mail.attachments, "subject": mail.subject,
        "authenticated": ok,  # the chain a reply continues: its root and latest links
        "references": mail.references[:1] + mail.references[1:][-19:]}
    return int(await host.inbound(pid, mid, payload, thread_id=mail.thread))
