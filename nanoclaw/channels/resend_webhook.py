"""Resend, inbound side at the webhook door: the `email.received` events Resend POSTs to
/webhook/resend (the `email` channel's mail; the outbound side is `email_channel.py`).

Resend signs with Svix: `svix-id`, `svix-timestamp` (epoch seconds) and `svix-signature`
(space-separated `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<raw body>">`), keyed by
the base64 secret after the `whsec_` of `RESEND_WEBHOOK_SECRET`. Checked on the raw bytes
before anything else; a timestamp more than five minutes from now is refused like a
forged signature (401, nothing stored). The event carries only metadata: the mail
itself (its raw message, or its fields and attachments) is fetched from the API, then
stored as any received mail (`email_inbound.take`: identity, auto-replies, threads).
A redelivery of a mail already stored (its sender and Message-ID are in the event) is
not fetched again; a fetch that fails answers 503, so Resend retries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import time
from typing import Any, Callable, Mapping

import aiohttp

from nanoclaw import jsonin
from nanoclaw.channels.email_inbound import CHANNEL, platform_id, take
from nanoclaw.channels.email_parse import BadMail, msgids, parse
from nanoclaw.channels.resend_api import Resend, ResendError
from nanoclaw.channels.webhook import BadPayload, DoorHost, Unready, Webhook
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

TOLERANCE = 300.0  # seconds, as Svix's own libraries


def svix_headers(headers: Mapping[str, str]) -> tuple[str, int, list[str]] | None:
    """(id, timestamp, v1 signatures) from a request's Svix headers, or None."""
    sid = str(headers.get("svix-id") or headers.get("webhook-id") or "")
    ts = str(headers.get("svix-timestamp") or headers.get("webhook-timestamp") or "")
    sigs = str(headers.get("svix-signature") or headers.get("webhook-signature") or "")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", sid) or not re.fullmatch(r"\d{1,12}", ts):
        return None
    v1 = [s[3:] for s in sigs.split()[:20] if s.startswith("v1,")]
    return (sid, int(ts), v1) if v1 else None


def secret_key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("RESEND_WEBHOOK_SECRET is not a whsec_… secret (base64 after"
                          " the prefix)") from None


def sign(key: bytes, sid: str, ts: int, raw: bytes) -> str:
    return base64.b64encode(hmac.new(key, f"{sid}.{ts}.".encode() + raw,
                                     hashlib.sha256).digest()).decode()


class ResendWebhook(Webhook):
    name = "resend"

    def __init__(self, settings, host: DoorHost, clock: Callable[[], float] = time.time):
        if not settings.resend_webhook_secret:
            raise ConfigError("RESEND_WEBHOOK_SECRET is not set (/webhook/resend needs it)")
        super().__init__(settings, DoorHost(host.store, CHANNEL))  # the email channel's
        self.key = secret_key(settings.resend_webhook_secret)
        self.clock = clock
        self.api = Resend(settings, timeout=5.0)

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        got = svix_headers(headers)
        if got is None:
            return False
        sid, ts, sigs = got
        want = sign(self.key, sid, ts, raw).encode()
        if not any(hmac.compare_digest(s.encode("utf-8", "replace"), want) for s in sigs):
            return False
        if abs(self.clock() - ts) > TOLERANCE:
            logger.warning("resend: a webhook outside the {:.0f}s tolerance refused", TOLERANCE)
            return False
        return True

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        try:
            body = jsonin.loads(raw)
        except jsonin.BadJSON as e:
            raise BadPayload(str(e)) from None
        if not isinstance(body, dict):
            raise BadPayload("not an object")
        if body.get("type") != "email.received":
            return 0
        data: Any = body.get("data")
        eid = data.get("email_id") if isinstance(data, dict) else None
        if not isinstance(eid, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", eid):
            raise BadPayload("an email.received event without an email_id")
        sender, mid = str(data.get("from") or ""), msgids(str(data.get("message_id") or ""))
        addr = re.findall(r"[^\s<>\"]+@[^\s<>\"]+", sender)
        if addr and mid and self.host.seen(platform_id(addr[-1]), mid[0]):
            return 0  # a redelivery: stored already
        try:
            mail = parse(await self.api.raw_message(eid))
        except BadMail as e:
            logger.warning("resend: email {} is not a mail we can read ({}); skipped", eid, e)
            return 0
        except (ResendError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise Unready(f"fetching email {eid} failed: {e}") from None
        return await take(self.host, self.settings, mail)

    async def close(self) -> None:
        await self.api.close()
