"""Mail in by IMAP (aioimaplib): IDLE where the server offers it, else a poll every
`EMAIL_POLL_INTERVAL` seconds (IDLE is also renewed that often, so a silently dropped
connection is noticed).

What was read is remembered by UID, with the mailbox's UIDVALIDITY, in `host_state`
(`email:imap:<user>@<host>/<folder>` = `<uidvalidity>:<last uid>`), advanced only after a
mail is stored: a restart resumes after the last stored mail (no replay, no skip), and a
mail read again after a crash between storing and remembering is the same Message-ID, so
stored once. On the first start, and when UIDVALIDITY changes (the mailbox was
recreated, its UIDs mean nothing now), the unseen mails are read (again): the Message-ID
keeps what was stored already from coming twice. A mail is marked `\\Seen` only after it
is stored. Login refused: a bad setting, the worker stops (no reconnect loop); anything
else: reconnect with backoff.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import Any, Awaitable, Callable

import aioimaplib

from nanoclaw.channels.email_parse import BadMail, Mail, parse
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

BACKOFF = (1.0, 2.0, 5.0, 15.0, 60.0)
FETCH_TIMEOUT = 60.0


class Refused(Exception):
    """The server said NO or BAD to a command."""


def tls_context(settings: Settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=settings.email_ca_file or None)
    return ctx


def _ok(resp: Any, what: str) -> Any:
    if resp.result != "OK":
        raise Refused(f"{what}: {resp.result} {_text(resp.lines)[:200]}")
    return resp


def _text(lines: list) -> str:
    return " ".join(line.decode("utf-8", "replace") if isinstance(line, (bytes, bytearray))
                    else str(line) for line in lines)


class ImapInbox:
    def __init__(self, settings: Settings, store: Any,
                 take: Callable[[Mail], Awaitable[int]]):
        self.settings, self.store, self.take = settings, store, take
        s = settings
        self.key = f"email:imap:{s.email_username}@{s.email_imap_host}/{s.email_imap_folder}"
        self.connected = False
        self.client: aioimaplib.IMAP4 | None = None

    # ---- the remembered position ----------------------------------------------------------
    def position(self) -> tuple[int, int] | None:
        got = self.store.get_state(self.key)
        m = re.fullmatch(r"(\d+):(\d+)", got or "")
        return (int(m.group(1)), int(m.group(2))) if m else None

    def remember(self, validity: int, uid: int) -> None:
        self.store.set_state(self.key, f"{validity}:{uid}")

    # ---- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        failures = 0
        while True:
            delay = 0.2
            try:
                await self._session()
            except (asyncio.CancelledError, ConfigError):
                raise
            except Exception as e:
                if self.connected:  # it had worked: the backoff starts again
                    failures = 0
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                failures += 1
                logger.warning("email: IMAP {}:{} failed ({}: {}); again in {:.0f}s",
                               self.settings.email_imap_host, self.settings.email_imap_port,
                               type(e).__name__, e, delay)
            finally:
                await self.close()
            await asyncio.sleep(delay)

    async def close(self) -> None:
        self.connected = False
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if client.has_pending_idle():
                client.idle_done()
            await asyncio.wait_for(client.logout(), 3)
        except Exception:  # a dead connection
            pass

    async def _connect(self) -> aioimaplib.IMAP4:
        s = self.settings
        if s.email_imap_tls == "tls":
            client = aioimaplib.IMAP4_SSL(s.email_imap_host, s.email_imap_port, timeout=30,
                                          ssl_context=tls_context(s))
        else:
            client = aioimaplib.IMAP4(s.email_imap_host, s.email_imap_port, timeout=30)
        self.client = client
        await asyncio.wait_for(client.wait_hello_from_server(), 30)
        resp = await client.login(s.email_username, s.email_password)
        if resp.result != "OK":
            raise ConfigError(f"EMAIL_USERNAME/EMAIL_PASSWORD refused by the IMAP server"
                              f" {s.email_imap_host}: {_text(resp.lines)[:200]}")
        return client

    async def _session(self) -> None:
        client = await self._connect()
        resp = await client.select(self.settings.email_imap_folder)
        if resp.result != "OK":
            raise ConfigError(f"EMAIL_IMAP_FOLDER {self.settings.email_imap_folder!r} cannot be"
                              f" read: {_text(resp.lines)[:200]}")
        m = re.search(r"UIDVALIDITY (\d+)", _text(resp.lines))
        validity = int(m.group(1)) if m else 0
        pos = self.position()
        if pos is None or pos[0] != validity:
            if pos is not None:
                logger.warning("email: UIDVALIDITY of {} changed ({} → {}); reading its"
                               " unseen mail again", self.settings.email_imap_folder, pos[0],
                               validity)
            last = await self._catch_up(client, validity, None)
        else:
            last = pos[1]
        self.connected = True
        idle = client.has_capability("IDLE")
        logger.info("email: reading {} on {} ({})", self.settings.email_imap_folder,
                    self.settings.email_imap_host, "IDLE" if idle else "polling")
        while True:
            last = await self._catch_up(client, validity, last)
            if idle:
                waiting = await client.idle_start(timeout=self.settings.email_poll_interval)
                try:
                    await client.wait_server_push(self.settings.email_poll_interval + 30)
                finally:
                    if client.has_pending_idle():
                        client.idle_done()
                    await asyncio.wait_for(waiting, 30)
            else:
                await asyncio.sleep(self.settings.email_poll_interval)
                _ok(await client.noop(), "NOOP")

    async def _catch_up(self, client: aioimaplib.IMAP4, validity: int, last: int | None) -> int:
        """Store every mail after UID `last` (or every unseen one); the new last UID."""
        crit = "UNSEEN" if last is None else f"UID {last + 1}:*"
        resp = _ok(await client.uid_search(crit, charset=None), "SEARCH")
        uids = sorted({int(u) for line in resp.lines[:-1]
                       for u in re.findall(rb"\d+", bytes(line))})
        if last is not None:
            uids = [u for u in uids if u > last]  # `N:*` always names the highest UID
        top = last or 0
        for uid in uids:
            await self._one(client, uid)
            top = max(top, uid)
            self.remember(validity, top)
        if last is None:
            self.remember(validity, top)
        return top

    async def _one(self, client: aioimaplib.IMAP4, uid: int) -> None:
        resp = _ok(await asyncio.wait_for(client.uid("fetch", str(uid), "(BODY.PEEK[])"),
                                          FETCH_TIMEOUT), "FETCH")
        raw = next((bytes(x) for x in resp.lines if isinstance(x, bytearray)), None)
        if raw is None:
            logger.warning("email: UID {} has no body (gone meanwhile?); skipped", uid)
            return
        try:
            mail = parse(raw)
        except BadMail as e:
            logger.warning("email: UID {} is not a mail we can read ({}); skipped", uid, e)
            return
        except Exception as e:  # a parser bug must not stop the mailbox
            logger.error("email: UID {} could not be read ({}: {}); skipped", uid,
                         type(e).__name__, e)
            return
        await self.take(mail)  # raises if not stored: not marked, not remembered
        _ok(await client.uid("store", str(uid), "+FLAGS.SILENT (\\Seen)"), "STORE")
