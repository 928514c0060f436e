"""GitHub, inbound side at the webhook door: what a repository's webhook POSTs to
/webhook/github (the outbound side and the reconcile loop are `github.py`).

A POST must carry `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(GITHUB_WEBHOOK_SECRET,
raw body)>`, checked by gidgethub's `validate_event` on the bytes as received (the older
SHA-1 `X-Hub-Signature` alone is refused), and `X-GitHub-Event` / `X-GitHub-Delivery`.
Read: `issue_comment` and `pull_request_review_comment` (created, edited) and `issues`
(opened); anything else (`ping`, …) is answered 200 and stored nowhere. A comment is
stored under its own id, so a redelivery of the same delivery (GitHub's manual or API
redelivery keeps `X-GitHub-Delivery`), or the reconcile loop finding the same comment,
stores it once (`github_inbound.py`).

Served only with GITHUB_WEBHOOK_SECRET set (`channels/__init__.py`, `WEBHOOK_NEEDS`).
"""

from __future__ import annotations

import re
from typing import Mapping

from gidgethub import ValidationFailure
from gidgethub.sansio import validate_event

from nanoclaw.channels.github_api import session
from nanoclaw.channels.github_inbound import Bot, Inbound, NotGitHub, parse_event
from nanoclaw.channels.webhook import BadPayload, Webhook
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

DELIVERY = re.compile(r"[0-9A-Fa-f-]{8,64}")


class GitHubWebhook(Webhook):
    name = "github"

    def __init__(self, settings, host):
        super().__init__(settings, host)
        if not settings.github_webhook_secret:
            raise ConfigError("GITHUB_WEBHOOK_SECRET is not set (the github webhook needs it;"
                              " without it the channel polls)")
        self.secret = settings.github_webhook_secret
        self.http = None
        self.bot = Bot(settings.github_bot_username)

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        sig = headers.get("X-Hub-Signature-256", "")
        if not sig.startswith("sha256="):
            return False
        try:
            validate_event(raw, signature=sig.strip(), secret=self.secret)
        except ValidationFailure:
            return False
        return True

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        event = headers.get("X-GitHub-Event", "")
        delivery = headers.get("X-GitHub-Delivery", "")
        if not DELIVERY.fullmatch(delivery):
            raise BadPayload("no valid X-GitHub-Delivery")
        try:
            comments = parse_event(event, raw)
        except NotGitHub as e:
            raise BadPayload(str(e)) from None
        if not comments:
            logger.debug("github: {} event {} not for the agent", event[:40], delivery)
            return 0
        if self.http is None:
            self.http = session(timeout=10)
        inbound = Inbound(self.settings, self.host, self.bot, self.http)
        return sum([await inbound.store(c) for c in comments])

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
