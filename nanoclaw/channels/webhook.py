"""The webhook door: the one HTTP server platforms call (the `webhooks` worker), and the
contract a platform's webhook side implements.

`POST /webhook/<channel>` is answered in this order, and nothing is stored before the
signature holds (DESIGN §6, channels.md §1.2):
1. size (`NANOCLAW_WEBHOOK_MAX_BYTES`, else 413) and rate per platform and source
   address (`NANOCLAW_WEBHOOK_RATE` a minute, else 429 with Retry-After: behind a tunnel
   every request comes from 127.0.0.1, so one platform's flood must not starve another);
2. the platform's signature, on the raw bytes as received: a re-serialised body breaks
   HMACs; for a platform that signs nothing, a shared secret in the URL's query,
   compared in constant time (BlueBubbles: `verify_request`) (bad or missing: 401,
   nothing stored);
3. every event in the body stored durably in `inbound_events`, the platform's message
   id as the key, so a redelivery is stored once;
4. then 2xx. A storage failure answers 503, so the platform retries; a failure in one
   platform's code answers that request 500 and touches no other route; a platform
   whose webhook side cannot load (a missing setting) is logged once at ERROR and its
   path answers 503 while the others serve.
`GET /webhook/<channel>` is the platform's subscription handshake, where it has one.

The outbound side of each platform stays in its own `channel:<name>` worker.
"""

from __future__ import annotations

import asyncio
import importlib
import sqlite3
import time
from typing import Any, Mapping

from aiohttp import web

from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger
from nanoclaw.util import is_approval_card

STORE_DEADLINE = 8.0  # seconds to verify and store a body; platforms wait ~10 s at most


class BadPayload(ValueError):
    """A verified body we cannot read: answered 400 and logged, nothing stored."""


class DoorHost:
    """What a webhook side may call back into: store an event, find a card this channel
    sent (to map a button index back to its option), as a channel runner offers."""

    def __init__(self, store: Store, channel_type: str):
        self.store, self.channel_type = store, channel_type

    async def inbound(self, platform_id: str, message_id: str, payload: dict[str, Any],
                      thread_id: str | None = None, kind: str = "chat") -> bool:
        _, new = self.store.enqueue_inbound(self.channel_type, platform_id, message_id,
                                            payload, thread_id, kind)
        return new

    def seen(self, platform_id: str, message_id: str) -> bool:
        """Whether this event is stored already (a redelivery: skip fetching its media)."""
        return self.store.inbound_seen(self.channel_type, platform_id, message_id)

    def is_wired(self, platform_id: str) -> bool:
        return self.store.is_wired(self.channel_type, platform_id)

    def question(self, card_id: str, platform_id: str | None = None) -> dict[str, Any] | None:
        """The card this channel sent under that host card id, or None: only one sent to
        the chat clicked in (or a cold DM resolved to it), and for an approval's id only
        the host's own card (as ChannelRunner.question, H3)."""
        return self.store.sent_card(self.channel_type, card_id, platform_id,
                                    host_only=is_approval_card(card_id))

    def kick(self, platform_id: str | None = None) -> None:
        """The channel worker is another process: it sees new rows by itself."""


class Webhook:
    """A platform's inbound side, run by the door. Subclasses set `name` and implement
    `verify` and `receive`; `handshake` where the platform subscribes by a GET."""

    name = "webhook"
    # what a stored event is answered with: (content type, body); a platform that reads
    # the answer (Google Chat: JSON or nothing) sets its own
    accepted: tuple[str, str] = ("text/plain", "ok\n")

    def __init__(self, settings: Settings, host: DoorHost):
        self.settings, self.host = settings, host

    def handshake(self, query: Mapping[str, str]) -> tuple[int, str]:
        return 405, "no handshake here"

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        """Whether the raw body carries the platform's valid signature."""
        raise NotImplementedError

    def verify_request(self, raw: bytes, headers: Mapping[str, str],
                       query: Mapping[str, str]) -> bool:
        """`verify`, given the URL's query too: for a platform that signs nothing and
        puts a shared secret in the URL it calls (BlueBubbles)."""
        return self.verify(raw, headers)

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        """Store every event of a verified body through `host.inbound`; returns how many
        were new. Raises BadPayload for a body that is not the platform's format. Runs
        under the door's deadline: bound any network call made here, keep the rest (a
        read receipt) for a background task."""
        raise NotImplementedError

    async def close(self) -> None:
        """The door is shutting down: close clients, cancel background work."""


class Broken(Webhook):
    """A platform whose webhook side failed to load (bad settings, a missing library):
    its path answers 503, so the platform retries once it is fixed; the others serve."""

    def __init__(self, name: str, why: str):
        self.name, self.why = name, why

    def handshake(self, query: Mapping[str, str]) -> tuple[int, str]:
        return 503, "not configured\n"

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        return True  # answered 503 below, never stored

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        raise Unready(self.why)


class Unready(Exception):
    """Cannot take events now (answered 503: the platform retries)."""


def load(target: str, settings: Settings, host: DoorHost) -> Webhook:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)(settings, host)


def load_all(targets: Mapping[str, str], settings: Settings, store: Store) -> dict[str, Webhook]:
    """Every enabled platform's webhook side; one that fails to load is logged (once,
    at ERROR) and answers 503, and harms no other."""
    hooks: dict[str, Webhook] = {}
    for name, target in targets.items():
        try:
            hooks[name] = load(target, settings, DoorHost(store, name))
        except Exception as e:
            why = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            logger.error("webhook {}: not served ({}); /webhook/{} answers 503", name, why, name)
            hooks[name] = Broken(name, why)
    return hooks


class RateLimit:
    """A token bucket per source address: `per_minute` requests, bursts of a tenth."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = max(1.0, per_minute / 10.0)
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # source → (tokens, at)

    def take(self, source: str) -> float:
        """0 if admitted, else seconds until a request would be."""
        now = self.clock()
        tokens, at = self.buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self.buckets[source] = (tokens - 1.0, now)
            if len(self.buckets) > 10_000:  # forget the oldest sources
                for key in sorted(self.buckets, key=lambda k: self.buckets[k][1])[:5_000]:
                    del self.buckets[key]
            return 0.0
        self.buckets[source] = (tokens, now)
        return (1.0 - tokens) / self.rate


class Door:
    def __init__(self, store: Store, settings: Settings, webhooks: dict[str, Webhook]):
        self.store, self.settings, self.webhooks = store, settings, webhooks
        self.limit = RateLimit(settings.webhook_rate)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.webhook_max_bytes)
        app.router.add_route("GET", "/webhook/{channel}", self.get)
        app.router.add_route("POST", "/webhook/{channel}", self.post)
        return app

    def _admit(self, request: web.Request) -> Webhook:
        hook = self.webhooks.get(request.match_info["channel"])
        if hook is None:
            raise web.HTTPNotFound(text="no such webhook\n")
        # per platform and address: behind a tunnel every request comes from 127.0.0.1,
        # and one platform's flood must not shut another out
        wait = self.limit.take(f"{request.match_info['channel']} {request.remote or '?'}")
        if wait:
            raise web.HTTPTooManyRequests(text="slow down\n",
                                          headers={"Retry-After": str(int(wait) + 1)})
        return hook

    async def get(self, request: web.Request) -> web.Response:
        hook = self._admit(request)
        try:
            status, text = hook.handshake(request.query)
        except Exception:
            logger.exception("webhook {}: handshake failed", hook.name)
            return web.Response(status=500, text="handshake failed\n")
        return web.Response(status=status, text=text)

    async def post(self, request: web.Request) -> web.Response:
        hook = self._admit(request)
        if request.content_length and request.content_length > self.settings.webhook_max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.settings.webhook_max_bytes,
                                                actual_size=request.content_length)
        raw = await request.read()  # aiohttp refuses a body over client_max_size (413)
        try:
            ok = hook.verify_request(raw, request.headers, request.query)
        except Exception:
            logger.exception("webhook {}: signature check failed", hook.name)
            ok = False
        if not ok:
            logger.warning("webhook {}: bad or missing signature from {}; nothing stored",
                           hook.name, request.remote)
            return web.Response(status=401, text="bad signature\n")
        try:
            new = await asyncio.wait_for(hook.receive(raw, request.headers), STORE_DEADLINE)
        except BadPayload as e:
            logger.warning("webhook {}: unreadable body ({}); nothing stored", hook.name, e)
            return web.Response(status=400, text="unreadable body\n")
        except Unready as e:
            logger.warning("webhook {}: not ready ({}); answered 503", hook.name, e)
            return web.Response(status=503, text="try again\n")
        except (sqlite3.Error, OSError, asyncio.TimeoutError) as e:
            logger.error("webhook {}: could not store the events ({}: {}); answered 503 so"
                         " the platform retries", hook.name, type(e).__name__, e)
            return web.Response(status=503, text="try again\n")
        except Exception:
            logger.exception("webhook {}: failed", hook.name)
            return web.Response(status=500, text="failed\n")
        if new:
            logger.debug("webhook {}: {} new event(s)", hook.name, new)
        kind, body = hook.accepted
        return web.Response(status=200, text=body, content_type=kind)

    async def serve(self, stop: asyncio.Event) -> None:
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        host, port = self.settings.webhook_host, self.settings.webhook_port
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(f"NANOCLAW_WEBHOOK_PORT {port} on {host}: {e.strerror}"
                              " (choose another port)") from None
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://{host}:{bound}"
        self.store.set_state("webhook_url", url)
        logger.info("webhook door on {} for {}", url,
                    ", ".join(f"/webhook/{n}" for n in sorted(self.webhooks)))
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            for hook in self.webhooks.values():
                try:
                    await asyncio.wait_for(hook.close(), 5)
                except Exception as e:
                    logger.debug("webhook {}: close failed: {!r}", hook.name, e)
