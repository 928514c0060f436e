"""Webex, inbound side in webhook mode (WEBEX_MODE=webhook): what Webex POSTs to the
webhook door at /webhook/webex. Create the webhooks yourself (`POST /v1/webhooks`,
resources `messages` and `attachmentActions`, event `created`, `targetUrl`
`https://<host>/webhook/webex`, `secret` WEBEX_WEBHOOK_SECRET).

A POST must carry `X-Spark-Signature: <hex HMAC-SHA1(WEBEX_WEBHOOK_SECRET, raw body)>`
(bad or missing: 401, nothing stored). The body names only ids, so the message (or the
card submit) is fetched by id within the door's deadline and stored as the WebSocket
path stores it (`webex_api.store_message`, `store_action`); a fetch that fails answers
503, so Webex tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any, Mapping

import aiohttp

from nanoclaw import jsonin
from nanoclaw.channels.webex_api import Webex, WebexError, store_action, store_message
from nanoclaw.channels.webhook import BadPayload, Unready, Webhook
from nanoclaw.errors import ConfigError

FETCH_BUDGET = 6.0


class WebexWebhook(Webhook):
    name = "webex"

    def __init__(self, settings, host):
        super().__init__(settings, host)
        if not settings.webex_webhook_secret:
            raise ConfigError("WEBEX_WEBHOOK_SECRET is not set (WEBEX_MODE=webhook needs it)")
        self.secret = settings.webex_webhook_secret.encode()
        self.api = Webex(settings, timeout=FETCH_BUDGET)

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        sig = headers.get("X-Spark-Signature", "").strip().lower().encode("utf-8", "replace")
        want = hmac.new(self.secret, raw, hashlib.sha1).hexdigest().encode()
        return bool(sig) and hmac.compare_digest(sig, want)

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        try:
            body: Any = jsonin.loads(raw)
        except jsonin.BadJSON as e:
            raise BadPayload(str(e)) from None
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            raise BadPayload("not a Webex webhook: no data")
        oid = body["data"].get("id")
        if body.get("event") != "created" or not isinstance(oid, str):
            return 0
        try:
            if body.get("resource") == "messages":
                return await asyncio.wait_for(store_message(self.api, self.host, oid),
                                              FETCH_BUDGET)
            if body.get("resource") == "attachmentActions":
                return await asyncio.wait_for(store_action(self.api, self.host, oid),
                                              FETCH_BUDGET)
        except WebexError as e:
            if e.status in (404, 403):
                return 0  # gone, or not ours to read
            raise Unready(f"fetching {oid[:60]} failed: {e}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise Unready(f"fetching {oid[:60]} failed: {e!r}") from None
        return 0

    async def close(self) -> None:
        await self.api.close()
