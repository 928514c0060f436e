"""Matrix, with matrix-nio's `AsyncClient` against MATRIX_HOMESERVER: the `channel:matrix`
worker. No public URL: messages come by /sync long poll.

We run our own sync loop instead of nio's `sync_forever` so that a sync's `next_batch`
is saved (host_state `matrix:next_batch`) only after every event it brought is stored:
a restart resumes where the last stored sync ended, neither replaying (events are also
deduplicated by event id) nor skipping (a gappy timeline is paged back to the saved
token). The first sync after a start asks for the full state (room members and
encryption are not kept between runs) with the timeline since the token; the very
first start only sets the token, so old history is not answered.

Liveness: every sync is bounded (its long-poll timeout plus a margin; the first,
full-state one after a start by FIRST_SYNC, since a big account's takes long and must
not become a restart loop). A sync that does not answer in time, or that answers at
once without moving its token while events are waiting, is a stalled connection:
retried in-process, and when nothing good came for NANOCLAW_CHANNEL_LIVENESS (at least
a sync timeout plus the margin, twice) the worker exits non-zero (`die`) and the
crash-loop breaker restarts it. A refused token is configuration (not restart-looped).

Invites are joined at once when the inviter is allowed (the owner, an admin, or a member
of an agent group, as `matrix:<mxid>`), or when the room is already wired. Anyone else's
invite is not joined: it becomes one message from the inviter in that room, which the
host's approval asks the owner about; once the owner wires the room, the bot joins and
answers what was said there since the invite.

MATRIX_E2EE=1 turns on end-to-end encryption (vodozemac through matrix-nio): the device
keys and Megolm sessions live in data/channels/matrix/ (0700), with the session of a
password login (`session.json`), so the device stays the same across restarts.

The inbound half (events → payloads, undecryptable events) is `matrix_inbound.py`; the
outbound half (sends, edits, reactions, files, typing, DMs) is `matrix_outbound.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from nanoclaw.channels.base import Channel
from nanoclaw.channels.matrix_inbound import CHANNEL, MatrixInbound, Me
from nanoclaw.channels.matrix_outbound import LIMIT, MatrixOutbound
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

__all__ = ["LIMIT", "MatrixChannel"]

MARGIN = 15.0           # seconds a sync may take beyond its long-poll timeout
FIRST_SYNC = 120.0      # seconds the first (full-state) sync after a start may take
STUCK_SYNCS = 3         # syncs in a row that return at once with the same token
TOKEN_KEY = "matrix:next_batch"
INVITES_KEY = "matrix:invites"
TIMELINE = 100          # events per room per sync; more is paged back (/messages)
DEFAULT_UPLOAD = 50 << 20
SYNC_FILTER = {"presence": {"not_types": ["*"]},
               "room": {"timeline": {"limit": TIMELINE},
                        "ephemeral": {"not_types": ["*"]}}}


def store_dir(settings: Settings) -> Path:
    """`data/channels/matrix/`, made 0700: the device's keys and session."""
    d = settings.data_dir / "channels" / "matrix"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


class MatrixChannel(MatrixInbound, MatrixOutbound, Channel):
    name = "matrix"
    supports_threads = True

    def __init__(self, settings: Settings, host: Any):
        super().__init__(settings, host)
        self.client: Any = None
        self.task: asyncio.Task | None = None
        self.invites_task: asyncio.Task | None = None
        self.upload_limit = DEFAULT_UPLOAD
        self.thread_of: dict[str, str] = {}
        self.joining = asyncio.Lock()  # one join pass at a time (sync loop, join loop, sends)
        self.last_ok = time.monotonic()
        self.me = Me("")

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return bool(settings.matrix_homeserver and (settings.matrix_access_token or (
            settings.matrix_user_id and settings.matrix_password)))

    # ---- connection -------------------------------------------------------------------
    async def setup(self) -> None:
        from nio import AsyncClient, AsyncClientConfig

        s = self.settings
        self.sync_timeout = s.matrix_sync_timeout
        d = store_dir(s)
        cfg = AsyncClientConfig(max_limit_exceeded=0, max_timeouts=0, request_timeout=30,
                                encryption_enabled=s.matrix_e2ee, store_sync_tokens=False)
        self.client = AsyncClient(s.matrix_homeserver, s.matrix_user_id or "",
                                  s.matrix_device_id or None,
                                  store_path=str(d) if s.matrix_e2ee else "", config=cfg)
        try:
            await asyncio.wait_for(self._login(d), 60)
        except ConfigError:
            await self.client.close()
            raise
        if s.matrix_e2ee and self.client.should_upload_keys:
            got = await asyncio.wait_for(self.client.keys_upload(), 30)
            logger.info("matrix: device keys uploaded ({})", type(got).__name__)
        await self._profile()
        self.last_ok = time.monotonic()
        self.task = asyncio.get_running_loop().create_task(self._sync_forever())
        self.task.add_done_callback(self._sync_done)
        self.invites_task = asyncio.get_running_loop().create_task(self._invites_forever())
        logger.info("matrix connected as {} (device {}, e2ee {})", self.me.user_id,
                    self.client.device_id, "on" if s.matrix_e2ee else "off")

    async def _login(self, d: Path) -> None:
        from nio import LoginResponse, WhoamiResponse

        s, c = self.settings, self.client
        if s.matrix_access_token:
            c.access_token = s.matrix_access_token
            who = await c.whoami() if not (s.matrix_user_id and s.matrix_device_id) else None
            if who is not None and not isinstance(who, WhoamiResponse):
                if getattr(who, "status_code", None) == "M_UNKNOWN_TOKEN":
                    raise ConfigError("MATRIX_ACCESS_TOKEN was refused by the homeserver")
                raise ConnectionError(f"matrix: whoami failed: {who}")
            user = who.user_id if who else s.matrix_user_id
            device = (who.device_id if who else None) or s.matrix_device_id
            if s.matrix_e2ee and not device:
                raise ConfigError("MATRIX_E2EE needs the token's device: set MATRIX_DEVICE_ID")
            c.restore_login(user, device or "", s.matrix_access_token)
        else:
            saved = d / "session.json"
            try:
                sess = json.loads(saved.read_text())
            except (OSError, ValueError):
                sess = {}
            if sess.get("user_id") == s.matrix_user_id and sess.get("access_token"):
                c.restore_login(sess["user_id"], sess["device_id"], sess["access_token"])
            else:
                got = await c.login(s.matrix_password, device_name="nanoclaw")
                if not isinstance(got, LoginResponse):
                    if getattr(got, "status_code", None) in ("M_FORBIDDEN", "M_USER_DEACTIVATED"):
                        raise ConfigError(f"MATRIX_USER_ID/MATRIX_PASSWORD were refused: {got}")
                    raise ConnectionError(f"matrix: login failed: {got}")
                tmp = saved.with_suffix(".tmp")
                tmp.write_text(json.dumps({"user_id": got.user_id, "device_id": got.device_id,
                                           "access_token": got.access_token}))
                os.chmod(tmp, 0o600)
                os.replace(tmp, saved)
        self.me = Me(c.user_id, (c.user_id.split(":", 1)[0].lstrip("@"),))

    async def _profile(self) -> None:
        """The bot's display name (a plain-text mention) and the server's upload limit."""
        try:
            got = await asyncio.wait_for(self.client.get_displayname(self.me.user_id), 10)
            name = getattr(got, "displayname", None)
            if isinstance(name, str) and name:
                self.me = Me(self.me.user_id, (name, *self.me.names))
        except Exception as e:
            logger.debug("matrix: display name not read: {!r}", e)
        try:
            got = await asyncio.wait_for(self.client.content_repository_config(), 10)
            size = getattr(got, "upload_size", None)
            if isinstance(size, int) and size > 0:
                self.upload_limit = size
        except Exception as e:
            logger.debug("matrix: media config not read: {!r}", e)

    async def teardown(self) -> None:
        for t in (self.task, self.invites_task):
            while t is not None and not t.done():
                t.cancel()
                await asyncio.wait({t}, timeout=1)
        if self.client is not None:
            await self.client.close()

    def is_connected(self) -> bool:
        return self.task is not None and time.monotonic() - self.last_ok < self._liveness()

    def _liveness(self) -> float:
        """Seconds without a good sync before the connection is dead: never less than two
        syncs with their margin, so one stalled sync is retried in-process first."""
        return max(self.settings.channel_liveness, 2 * (self.sync_timeout + self._margin()))

    # ---- the sync loop ----------------------------------------------------------------
    async def _sync_forever(self) -> None:
        from nio import SyncResponse

        store = self.host.store
        since = store.get_state(TOKEN_KEY)
        first, stuck, failures = True, 0, 0
        while True:
            timeout = 0 if first or since is None else self.sync_timeout
            # the first, full-state sync of a big account may take minutes: not a stall
            bound = max(FIRST_SYNC, self._liveness()) if first else timeout + self._margin()
            began = time.monotonic()
            try:
                got = await asyncio.wait_for(self.client.sync(
                    timeout=int(timeout * 1000), since=since, full_state=first or None,
                    sync_filter=SYNC_FILTER), bound)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a stall (TimeoutError), a dropped connection, garbage
                failures += 1
                why = f"{type(e).__name__}: {str(e)[:200]}" if str(e) else type(e).__name__
                if self._gone_dead(f"sync failed: {why}"):
                    return
                logger.warning("matrix: sync failed ({}); retrying", why)
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            if not isinstance(got, SyncResponse):
                failures += 1
                if not await self._sync_error(got, failures):
                    return
                continue
            if failures:
                logger.info("matrix: sync recovered after {} failures", failures)
            failures = 0
            waiting = _has_events(got)
            if since is not None and got.next_batch == since and not first and (
                    waiting or time.monotonic() - began < timeout / 2):
                stuck += 1  # answered at once without moving on: nothing gets through
                if stuck >= STUCK_SYNCS:
                    self.die(f"the sync token stopped moving ({stuck} syncs in a row at"
                             f" {since[:40]})")
                    return
                if self._gone_dead("the sync token stopped moving"):
                    return
                await asyncio.sleep(min(5.0, 0.5 * stuck))
                continue
            stuck = 0
            if since is None:
                logger.info("matrix: first start; answering messages from now on")
                await self._invites(got)
            else:
                await self._handle_sync(got, since)
            await self._keys()
            store.set_state(TOKEN_KEY, got.next_batch)
            since, first = got.next_batch, False
            self.last_ok = time.monotonic()

    def _margin(self) -> float:
        """How long a sync may take beyond its long-poll timeout before it is stalled."""
        return min(MARGIN, max(1.0, self.sync_timeout))

    def _gone_dead(self, why: str) -> bool:
        """True (and the worker told) when nothing good came for the liveness window."""
        if time.monotonic() - self.last_ok < self._liveness():
            return False
        logger.error("matrix: the connection is dead: no good sync for {:.0f}s ({});"
                     " reconnecting", self._liveness(), why)
        self.die(f"no good sync for {self._liveness():.0f}s ({why})")
        return True

    async def _sync_error(self, got: Any, failures: int) -> bool:
        """Wait as a refused sync asks; False when the loop must end."""
        if getattr(got, "status_code", None) == "M_UNKNOWN_TOKEN":
            self.halt("the Matrix access token was refused (logged out or revoked)")
            return False
        ms = getattr(got, "retry_after_ms", None)
        delay = ms / 1000 if isinstance(ms, (int, float)) and ms > 0 else \
            min(30.0, 0.5 * 2 ** min(failures, 6))
        if self._gone_dead(f"sync refused: {got}"):
            return False
        logger.warning("matrix: sync refused ({}); retry in {:.1f}s", str(got)[:200], delay)
        await asyncio.sleep(delay)
        return True

    def _sync_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return  # teardown
        e = task.exception()
        self.die(f"the sync loop stopped: {e!r}" if e else self.dead or self.fatal
                 or "the sync loop stopped")

    async def _handle_sync(self, got: Any, since: str) -> None:
        for room_id, info in got.rooms.join.items():
            room = self.client.rooms.get(room_id)
            if room is None:
                continue
            events = list(info.timeline.events)
            if info.timeline.limited and info.timeline.prev_batch:
                events = await self._gap(room_id, info.timeline.prev_batch, since) + events
            pending = self._pending_invites().pop(room_id, None)
            if pending is not None:
                events = self._since_invite(events, pending)
            for ev in events:
                await self._room_event(room, ev)
            if pending is not None:
                self._forget_invite(room_id)
        await self._invites(got)

    def _since_invite(self, events: list[Any], pending: dict[str, Any]) -> list[Any]:
        """A room just joined: only what was said since we were invited is answered (the
        history before is not ours to answer). Cut after our invite event where the
        timeline shows it, else by time with a wide margin for the server's clock."""
        for i in range(len(events) - 1, -1, -1):
            src = getattr(events[i], "source", None) or {}
            if src.get("type") == "m.room.member" and src.get("state_key") == self.me.user_id \
                    and (src.get("content") or {}).get("membership") == "invite":
                return events[i + 1:]
        since = (pending.get("at") or 0) - 300
        return [e for e in events if (getattr(e, "server_timestamp", 0) or 0) / 1000 >= since]

    async def _gap(self, room_id: str, start: str, since: str) -> list[Any]:
        """Events between the saved token and a gappy timeline's start, oldest first."""
        from nio import RoomMessagesResponse

        out: list[Any] = []
        token = start
        for _ in range(20):
            got = await asyncio.wait_for(self.client.room_messages(
                room_id, start=token, end=since, limit=100), 30)
            if not isinstance(got, RoomMessagesResponse) or not got.chunk:
                break
            out.extend(got.chunk)
            if not got.end or got.end == token:
                break
            token = got.end
        out.reverse()
        if out:
            logger.info("matrix: {} event(s) in {} paged back after a gap", len(out), room_id)
        return out

    async def _keys(self) -> None:
        """What nio's sync_forever does after each sync, for encrypted rooms."""
        c = self.client
        if not self.settings.matrix_e2ee or c.olm is None:
            return
        try:
            await c.send_to_device_messages()
            if c.should_upload_keys:
                await c.keys_upload()
            if c.should_query_keys:
                await c.keys_query()
            if c.should_claim_keys:
                await c.keys_claim(c.get_users_for_key_claiming())
        except Exception as e:  # the next sync tries again
            logger.warning("matrix: key upkeep failed: {!r}", e)

    # ---- invites ----------------------------------------------------------------------
    def _pending_invites(self) -> dict[str, dict[str, Any]]:
        try:
            got = json.loads(self.host.store.get_state(INVITES_KEY) or "{}")
            return got if isinstance(got, dict) else {}
        except ValueError:
            return {}

    def _forget_invite(self, room_id: str) -> None:
        pending = self._pending_invites()
        if pending.pop(room_id, None) is not None:
            self.host.store.set_state(INVITES_KEY, json.dumps(pending))

    def _allowed(self, user: str) -> bool:
        """The owner, an admin or a member of an agent group, by `matrix:<mxid>`."""
        uid, store = f"{CHANNEL}:{user}", self.host.store
        return uid in store.approvers(None) or any(
            r["user_id"] == uid for r in store.roles_overview()) or any(
            m["user_id"] == uid for m in store.members_overview())

    async def _invites(self, got: Any) -> None:
        pending = self._pending_invites()
        changed = False
        for room_id, info in got.rooms.invite.items():
            inviter, direct = None, False
            for ev in getattr(info, "invite_state", []) or []:
                src = getattr(ev, "source", None) or {}
                if src.get("type") == "m.room.member" and src.get("state_key") == self.me.user_id:
                    inviter = src.get("sender")
                    content = getattr(ev, "content", None) or src.get("content") or {}
                    direct = isinstance(content, dict) and content.get("is_direct") is True
            if not isinstance(inviter, str) or room_id in pending:
                continue
            pid = f"{CHANNEL}:{room_id}"
            if self._allowed(inviter) or self.host.store.is_wired(CHANNEL, pid):
                logger.info("matrix: joining {} (invited by {})", room_id, inviter)
                pending[room_id] = {"inviter": inviter, "at": time.time(), "join": True}
                changed = True
                continue
            logger.info("matrix: invite to {} from {}, who is not allowed yet: asking the"
                        " owner", room_id, inviter)
            pending[room_id] = {"inviter": inviter, "at": time.time(), "direct": direct}
            changed = True
            what = "a direct chat" if direct else "a room"
            await self.host.inbound(pid, f"invite:{room_id}", {
                "text": f"({inviter} invited me to {what})", "sender_id": f"{CHANNEL}:{inviter}",
                "sender_name": inviter, "is_mention": True, "is_group": not direct,
                "attachments": []})
        if changed:
            self.host.store.set_state(INVITES_KEY, json.dumps(pending))
            await self._join_due()

    async def _invites_forever(self) -> None:
        """Join the rooms whose invite is now allowed (the owner wired the room)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._join_due()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("matrix: joining invited rooms failed: {!r}", e)

    async def _join_due(self) -> None:
        async with self.joining:
            await self._join_pass()

    async def _join_pass(self) -> None:
        from nio import JoinResponse

        pending = self._pending_invites()
        for room_id, inv in list(pending.items()):
            if inv.get("joined"):
                continue
            if not (inv.get("join") or self.host.store.is_wired(CHANNEL, f"{CHANNEL}:{room_id}")):
                continue
            got = await asyncio.wait_for(self.client.join(room_id), 30)
            if isinstance(got, JoinResponse):
                logger.info("matrix: joined {}", room_id)
                inv["joined"] = True
            elif getattr(got, "status_code", None) in ("M_FORBIDDEN", "M_NOT_FOUND"):
                logger.info("matrix: the invite to {} is gone ({}); forgotten", room_id, got)
                pending.pop(room_id, None)
            else:
                logger.warning("matrix: joining {} failed: {}", room_id, got)
                continue
            fresh = self._pending_invites()
            if room_id in pending:
                fresh[room_id] = pending[room_id]
            else:
                fresh.pop(room_id, None)
            self.host.store.set_state(INVITES_KEY, json.dumps(fresh))


def _has_events(got: Any) -> bool:
    rooms = got.rooms
    return any(info.timeline.events for info in rooms.join.values()) or bool(rooms.invite) \
        or bool(getattr(got, "to_device_events", None))
