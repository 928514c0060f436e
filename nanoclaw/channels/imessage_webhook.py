"""iMessage, inbound side at the webhook door (BLUEBUBBLES_WEBHOOK_SECRET set): what
BlueBubbles Server POSTs to /webhook/imessage. In the server's API & Webhooks page add
`https://<host>/webhook/imessage?secret=<BLUEBUBBLES_WEBHOOK_SECRET>` for the event
"New Messages".

BlueBubbles signs nothing, so the secret in the URL is the check: compared in constant
time, and a missing or wrong one is 401, nothing stored. The body is `{type, data}`;
`new-message` is stored as the poll stores it (`imessage_inbound.py`), under the
message's guid, so an event the server re-sends (it does, on reconnect and restart) is
stored once; one created before the poll's cursor less its window is old and ignored.
Other types are answered 200 and stored nowhere. A message whose file has not arrived
yet is left to the worker's reconcile pass, which asks for it until it has.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any, Mapping

import aiohttp

from nanoclaw import jsonin
from nanoclaw.channels.imessage_api import LOOKBACK, SINCE, BBError, BlueBubbles
from nanoclaw.channels.imessage_inbound import STORED, Inbound
from nanoclaw.channels.webhook import BadPayload, Unready, Webhook
from nanoclaw.errors import ConfigError

BUDGET = 6.0


class IMessageWebhook(Webhook):
    name = "imessage"

    def __init__(self, settings, host):
        super().__init__(settings, host)
        if not settings.bluebubbles_webhook_secret:
            raise ConfigError("BLUEBUBBLES_WEBHOOK_SECRET is not set")
        self.secret = settings.bluebubbles_webhook_secret.encode()
        self.api = BlueBubbles(settings, timeout=BUDGET)
        self.inbound = Inbound(settings, host, self.api)

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        return False  # the secret is in the URL: verify_request

    def verify_request(self, raw: bytes, headers: Mapping[str, str],
                       query: Mapping[str, str]) -> bool:
        got = str(query.get("secret") or "").encode("utf-8", "replace")
        return bool(got) and hmac.compare_digest(got, self.secret)

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        try:
            body: Any = jsonin.loads(raw)
        except jsonin.BadJSON as e:
            raise BadPayload(str(e)) from None
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            raise BadPayload("not a BlueBubbles webhook: no type")
        if body["type"] != "new-message":
            return 0
        if not isinstance(body.get("data"), dict):
            raise BadPayload("a new-message without data")
        since = self.host.store.get_state(SINCE)
        horizon = int(since) - LOOKBACK if since and since.isdigit() else None
        try:
            got = await asyncio.wait_for(self.inbound.handle(body["data"], horizon=horizon),
                                         BUDGET)
        except (BBError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise Unready(f"reading the message failed: {type(e).__name__}") from None
        return int(got == STORED)

    async def close(self) -> None:
        await self.api.close()
