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

platform_id `telegram:<chat id>`; thread_id is a forum topic id. The inbound half
(parsing updates, edits, files, clicks) is `telegram_inbound.py`; the outbound half
(sends as Telegram HTML, edits, reactions) is `telegram_outbound.py`.
"""

from __future__ import annotations

import asyncio
import time

from telegram import Bot
from telegram import error as tg
from telegram.request import HTTPXRequest

from nanoclaw.channels.base import Channel
from nanoclaw.channels.telegram_inbound import TelegramInbound
from nanoclaw.channels.telegram_outbound import LIMIT, TelegramOutbound, _seconds
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

ALLOWED = ["message", "edited_message", "callback_query"]

__all__ = ["LIMIT", "TelegramChannel"]  # the limit, as delivery/actions.py cites it


class TelegramChannel(TelegramInbound, TelegramOutbound, Channel):
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
