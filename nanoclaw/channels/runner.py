"""What the generic `channel:<name>` worker does around an adapter: store inbound
messages durably before acknowledging them, and send this channel's rows of
`channel_outbox`, honouring `retry_after`, backing off transient errors and failing a
row for good (recorded, so delivery tells the agent) after `send_attempts` tries.
Between passes it waits on its nudge socket (`data/run/nudge/channel:<name>.sock`), which
delivery pokes after queueing a send, so an idle channel polls only every `poll_idle`.

Time is passed in: `clock` (default `time.time`) stamps parks, retries and typing, and
one pass of the loop is `tick(now)`, so a test drives the runner on a fake clock and
never waits in real time; `backoff` is the transient-error schedule (default `BACKOFF`)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Sequence

from nanoclaw import nudge
from nanoclaw.channels.base import (
    Channel,
    ChannelDead,
    OutboundMessage,
    RetryAfter,
    SendError,
    Unavailable,
)
from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.errors import ConfigError, DiskFull, disk_full
from nanoclaw.log import logger
from nanoclaw.nudge import Poller
from nanoclaw.util import is_approval_card, iso

PARK_SECONDS = 2.0
TYPING_EVERY = 4.0    # seconds between typing refreshes (platforms show it ~5 s)
TYPING_FOR = 60.0     # stop showing typing this long after the message if no reply came
TEARDOWN_GRACE = 5.0
BACKOFF = (1.0, 5.0, 15.0, 60.0, 300.0)


class ChannelRunner:
    def __init__(self, store: Store, settings: Settings, channel_type: str,
                 clock: Callable[[], float] = time.time, backoff: Sequence[float] = BACKOFF):
        self.store, self.settings, self.channel_type = store, settings, channel_type
        self.clock, self.backoff = clock, tuple(backoff)
        self.adapter: Channel | None = None
        self.wakeup = asyncio.Event()
        self.version = -1
        self.next_due: float | None = None
        self.typing: dict[tuple[str, str | None], tuple[float, float]] = {}  # → (until, next)

    # ---- ChannelHost ------------------------------------------------------------------
    async def inbound(self, platform_id: str, message_id: str, payload: dict[str, Any],
                      thread_id: str | None = None, kind: str = "chat") -> bool:
        try:
            _, new = self.store.enqueue_inbound(self.channel_type, platform_id, message_id,
                                                payload, thread_id, kind)
        except Exception as e:  # not stored: the adapter does not acknowledge it
            if disk_full(e):
                raise DiskFull(self.settings.data_dir) from None
            raise
        if new and kind == "chat" and hasattr(self.adapter, "set_typing") and (
                payload.get("is_mention") or not payload.get("is_group")) and self._wired(platform_id):
            now = self.clock()
            self.typing[(platform_id, thread_id)] = (now + TYPING_FOR, now)
            self.wakeup.set()
        return new

    def question(self, card_id: str, platform_id: str | None = None) -> dict[str, Any] | None:
        """The card this channel sent under that host card id (to map a button index back
        to its option value), or None. Given the chat the click came from, only a card
        sent to that chat (H3: a click resolves to the card it was made on, never to
        another card's options). An approval's id resolves only to the host's own card
        (no session), never to a card an agent wrote."""
        return self.store.sent_card(self.channel_type, card_id, platform_id,
                                    host_only=is_approval_card(card_id))

    def last_message_id(self, platform_id: str) -> str | None:
        """The platform id of the last message this chat sent us (to mark it read)."""
        return self.store.last_inbound_id(self.channel_type, platform_id)

    def _wired(self, platform_id: str) -> bool:
        return self.store.is_wired(self.channel_type, platform_id)

    async def refresh_typing(self, now: float) -> None:
        """Show "typing…" in chats waiting for an answer; best effort, never fails a send."""
        for key, (until, nxt) in list(self.typing.items()):
            if now >= until:
                self.typing.pop(key, None)
            elif now >= nxt:
                self.typing[key] = (until, now + TYPING_EVERY)
                try:
                    await asyncio.wait_for(self.adapter.set_typing(*key), 5)  # type: ignore[union-attr]
                except Exception as e:
                    logger.debug("typing in {} failed: {}", key[0], e)

    def kick(self, platform_id: str | None = None) -> None:
        self.store.send_untried_now(self.channel_type, platform_id)
        self.wakeup.set()

    # ---- one pass -----------------------------------------------------------------------
    async def tick(self, now: float) -> bool:
        """Send what is due at `now` and refresh typing; True if something was sent."""
        did = await self.send_due(now)
        if self.typing:
            await self.refresh_typing(now)
        return did

    # ---- sending ----------------------------------------------------------------------
    async def send_due(self, now: float) -> bool:
        v = self.store.version()
        if v == self.version and not self.wakeup.is_set() and (
                self.next_due is None or now < self.next_due):
            return False
        self.version = v
        self.wakeup.clear()
        rows = self.store.due_sends_at(self.channel_type, iso(now))
        for row in rows:
            await self._send(row)
        nxt = self.store.next_send_due(self.channel_type)
        self.next_due = _ts(nxt) if nxt else None
        return bool(rows)

    async def _send(self, row: dict[str, Any]) -> None:
        assert self.adapter is not None
        msg = OutboundMessage(
            row["idem_key"], row["kind"], json.loads(row["content"]), row["in_reply_to"],
            parts=[str(p) for p in json.loads(row["parts"] or "[]")],
            uncertain_since=_ts(row["attempt_at"]) if row["attempt_at"] else None,
            record=lambda part: self.store.record_part(row["id"], part))
        attempt = row["attempts"] + 1
        try:
            pid = row["platform_id"]
            if pid.startswith("@dm:"):
                pid = await self._open_dm(pid[4:])
            self.store.begin_send(row["id"])  # from here the platform may have it
            async with asyncio.timeout(self.settings.send_timeout):
                if msg.uncertain_since is not None:
                    await self._find_sent(pid, row, msg)
                pmid = await self.adapter.deliver(pid, row["thread_id"], msg)
        except TimeoutError:  # asyncio.timeout's: the platform stalled
            self._retry(row, attempt, f"{self.channel_type} did not answer within"
                        f" {self.settings.send_timeout:g}s", self._backoff(attempt))
            return
        except Unavailable as e:
            self.store.park_send(row["id"], iso(self.clock() + PARK_SECONDS))
            logger.debug("send {} parked: {}", row["id"], e)
            return
        except RetryAfter as e:
            self._retry(row, attempt, f"rate limited: {e}", e.seconds)
            return
        except SendError as e:
            self._retry(row, attempt, str(e), None if e.permanent else self._backoff(attempt))
            return
        except Exception as e:  # an adapter bug must not kill the worker or lose the row
            logger.exception("adapter {} failed to send", self.channel_type)
            self._retry(row, attempt, f"{type(e).__name__}: {e}", self._backoff(attempt))
            return
        self.store.mark_sent(row["id"], pmid)
        if msg.content.get("operation") is None:
            self.typing.pop((pid, row["thread_id"]), None)

    async def _find_sent(self, pid: str, row: dict[str, Any], msg: OutboundMessage) -> None:
        """An earlier attempt was cut off inside the platform's call: the part then in
        flight may have landed. Ask the platform (where it can tell) and count what it
        shows as sent, so nothing shows twice; where it cannot, the part goes again."""
        assert self.adapter is not None and msg.uncertain_since is not None
        finder = getattr(self.adapter, "find_sent", None)
        if finder is None:
            return
        try:
            found = await finder(pid, row["thread_id"], msg, msg.uncertain_since)
        except Exception as e:  # sending again is the lesser harm than never sending
            logger.warning("send {} to {}:{}: could not check what already reached the"
                           " platform ({}: {}); sending what is missing again", row["id"],
                           self.channel_type, pid, type(e).__name__, e)
            return
        before = len(msg.parts)
        while len(msg.parts) in found:
            msg.sent(found[len(msg.parts)])
        if len(msg.parts) > before:
            logger.info("send {} to {}:{}: {} part(s) had reached the platform before an"
                        " attempt was cut off; not sent again", row["id"], self.channel_type,
                        pid, len(msg.parts) - before)

    async def _open_dm(self, handle: str) -> str:
        """A cold DM (approvals): ask the adapter for the DM chat, cache it in user_dms."""
        assert self.adapter is not None
        opener = getattr(self.adapter, "open_dm", None)
        pid = await opener(handle) if opener else handle
        mg = self.store.messaging_group(self.channel_type, pid)
        mg_id = mg["id"] if mg else self.store.create_messaging_group(
            self.channel_type, pid, None, is_group=False)
        uid = handle if ":" in handle else f"{self.channel_type}:{handle}"
        self.store.ensure_user(uid, self.channel_type)
        self.store.remember_dm(uid, self.channel_type, mg_id)
        return pid

    def _backoff(self, attempt: int) -> float:
        return self.backoff[min(attempt - 1, len(self.backoff) - 1)]

    def _retry(self, row: dict[str, Any], attempt: int, error: str, delay: float | None) -> None:
        final = delay is None or attempt >= self.settings.send_attempts
        self.store.mark_send_error(row["id"], error,
                                   None if final else iso(self.clock() + delay))
        if final:
            logger.error("send {} to {}:{} failed for good: {}", row["id"], self.channel_type,
                         row["platform_id"], error)
        else:
            logger.warning("send {} to {}:{} failed (attempt {}): {}; retry in {:.1f}s",
                           row["id"], self.channel_type, row["platform_id"], attempt, error, delay)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.wakeup.set()

    def _nudged(self, listener: nudge.Listener) -> None:
        listener.drain()
        self.wakeup.set()

    async def run(self, adapter: Channel, stop: asyncio.Event) -> None:
        self.adapter = adapter
        loop = asyncio.get_running_loop()
        listener = nudge.listen(self.settings, f"channel:{self.channel_type}")
        if listener is not None:
            loop.add_reader(listener.fileno(), self._nudged, listener)
        relay = asyncio.create_task(self._wake_on(stop))  # a stop ends the idle wait too
        try:
            await adapter.setup()
            poll = Poller.for_settings(self.settings, listener is not None)
            full = False
            while not stop.is_set():
                if adapter.fatal:
                    raise ConfigError(adapter.fatal)
                if adapter.dead:
                    raise ChannelDead(adapter.dead)
                now = self.clock()
                try:
                    did = await self.tick(now)
                except Exception as e:  # a result that cannot be stored: wait for space
                    if not disk_full(e):
                        raise
                    if not full:
                        logger.error("{}; sends wait for space ({})",
                                     DiskFull(self.settings.data_dir), e)
                    full, did = True, False
                else:
                    if full:
                        logger.warning("space again: sends carry on")
                    full = False
                wait = poll.next(did, now)
                if self.typing:
                    wait = min(wait, 1.0)
                if self.next_due is not None:  # a retry's time: not a whole idle poll late
                    wait = min(wait, max(self.settings.poll_min, self.next_due - now))
                try:  # asyncio.timeout: no task per tick, unlike wait_for
                    async with asyncio.timeout(wait):
                        await self.wakeup.wait()
                except TimeoutError:
                    pass
        finally:
            relay.cancel()
            if listener is not None:
                loop.remove_reader(listener.fileno())
                listener.close()
            try:
                await asyncio.wait_for(adapter.teardown(), TEARDOWN_GRACE)
            except Exception as e:  # a dead connection may not close cleanly
                logger.warning("channel {} teardown failed: {}", self.channel_type, e)


def _ts(text: str) -> float:
    from nanoclaw.util import parse_iso

    return parse_iso(text)
