"""WhatsApp Web, as a linked device of an account, through the `WAClient` seam
(`whatsapp_client.py`; neonize/whatsmeow underneath).

Linking is `nanoclaw channels login whatsapp`'s job (`whatsapp_login`); the keys stay in
`data/channels/whatsapp/` (0700). Started unlinked, this worker never shows a QR code:
it stops with a ConfigError (exit 78, waits, not restarted) asking for the login.

Failures a restart cannot fix — WhatsApp logging the device out, a "conflict" (another
client took the session: a second instance), a temporary ban, an outdated client — are
told to the owner once, at ERROR (logs/nanoclaw.error.log; `nanoclaw workers` and
`doctor` show the worker FATAL) and in `status.json`; then the worker exits 78 and waits.

Liveness watches transport and application apart (the peers' "connected but deaf"
bug). whatsmeow reconnects by itself; a transport down (or failing keepalives) for
NANOCLAW_CHANNEL_LIVENESS s, or a connection the client calls up while no message,
receipt or presence arrives for NANOCLAW_WHATSAPP_SILENCE s, exits to the breaker.

Ids: a person (and the DM with them) is `whatsapp:<phone digits>`, a LID mapped to the
number when WhatsApp or the library's store knows it (else `whatsapp:<n>@lid`); a group
is `whatsapp:<id>@g.us`. Our own messages are not input, except notes to self. A card
goes out as numbered text; the number sent in that chat (not quoting another message)
answers the latest card once. Text is WhatsApp-formatted and split at 4000.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import OrderedDict
from typing import Any

from nanoclaw.channels import whatsapp_client as wac
from nanoclaw.channels.base import Channel, OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.markdown import whatsapp_text
from nanoclaw.channels.text import (
    EDITED,
    SAFE_FILE,
    attachment,
    load_files,
    parse_question,
    plain_text,
    reply_target,
)
from nanoclaw.channels.whatsapp_client import WAEvent, WAMessage, WANotConnected, WASendError
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

LIMIT = 4000
MAX_DOWNLOAD = 32 << 20
REMEMBER = 500  # recent messages kept for reactions and quoted replies
LOGOUT_REASONS = {"LOGGED_OUT", "MAIN_DEVICE_GONE", "UNKNOWN_LOGOUT"}
RELINK = "`nanoclaw channels login whatsapp`, then `nanoclaw workers restart channel:whatsapp`"
class WhatsAppChannel(Channel):
    name = "whatsapp"
    supports_threads = False

    @classmethod
    def enabled(cls, settings) -> bool:
        return bool(settings.whatsapp_enabled)

    # ---- connection -------------------------------------------------------------------
    async def setup(self) -> None:
        self.dir = wac.store_dir(self.settings)
        self.client = wac.new_client(self.settings)
        self.client.handler = self._on_event
        if not await self.client.is_paired():
            raise ConfigError(f"WhatsApp is not linked yet: link it with {RELINK}")
        now = time.monotonic()
        self.connected, self.keepalive_bad = False, False
        self.down_since, self.last_app = now, now
        self.me: tuple[str, str] = ("", "")
        self.lids: dict[str, str] = {}                       # LID → phone JID
        self.known: OrderedDict[str, WAMessage] = OrderedDict()
        self.sent: OrderedDict[str, None] = OrderedDict()    # ids we sent (self-chat echo)
        self.cards = self._load_cards()
        await self.client.connect()
        self.watchdog = asyncio.create_task(self._watch())

    async def teardown(self) -> None:
        if getattr(self, "watchdog", None):
            self.watchdog.cancel()
        if hasattr(self, "client"):
            await self.client.disconnect()

    def is_connected(self) -> bool:
        return getattr(self, "connected", False) and not getattr(self, "keepalive_bad", False)

    def _fatal(self, state: str, message: str) -> None:
        """Logged out, conflict, banned: told once, then the worker exits with the
        bad-configuration code and waits (`halt`), never a reconnect loop."""
        if self.fatal:
            return
        logger.error("whatsapp: {}", message)  # once; the supervisor then marks it FATAL
        self._status(state, reason=message)
        self.halt(message)

    def _status(self, state: str, **fields: Any) -> None:
        try:
            wac.write_status(self.dir, state, **fields)
        except OSError as e:
            logger.warning("whatsapp status not written: {}", e)

    async def _on_event(self, ev: WAEvent) -> None:  # noqa: C901 (one branch per kind)
        now, k = time.monotonic(), ev.kind
        if k == "connected":
            self.connected, self.keepalive_bad, self.last_app = True, False, now
            try:
                pn, lid = (_bare(j) for j in await self.client.me())
                self.me = (pn, lid)
                if pn and lid:
                    self.lids[self.me[1]] = self.me[0]
            except Exception as e:
                logger.warning("whatsapp: own id unknown: {!r}", e)
            logger.info("whatsapp connected as {}", self.me[0] or "?")
            self._status("connected", jid=self.me[0])
            self.host.kick()  # sends parked while disconnected go now
        elif k in ("disconnected", "keepalive_timeout"):
            if self.is_connected():
                self.down_since = now
            if k == "disconnected":
                self.connected = False
            else:
                self.keepalive_bad = True
            logger.warning("whatsapp transport {}; the client reconnects", k.replace("_", " "))
        elif k == "keepalive_restored":
            self.keepalive_bad = False
        elif k == "logged_out" or (k == "connect_failure" and ev.reason in LOGOUT_REASONS):
            self._fatal("logged_out", f"WhatsApp logged this device out ({ev.reason});"
                        f" link it again with {RELINK}")
        elif k == "conflict":
            self._fatal("conflict", "another WhatsApp Web client took over this session"
                        " (conflict: is a second NanoClaw running with the same"
                        " data/channels/whatsapp?); stop it, then"
                        " `nanoclaw workers restart channel:whatsapp`")
        elif k == "temp_ban" or (k == "connect_failure" and ev.reason == "TEMP_BANNED"):
            self._fatal("banned", f"WhatsApp temporarily banned this account ({ev.reason});"
                        " wait it out, then `nanoclaw workers restart channel:whatsapp`")
        elif k == "outdated" or (k == "connect_failure" and ev.reason == "CLIENT_OUTDATED"):
            self._fatal("outdated", "WhatsApp says this client is outdated: upgrade neonize")
        elif k == "qr":
            self._fatal("logged_out", f"WhatsApp asks to link this device again: {RELINK}")
        elif k == "connect_failure":
            logger.warning("whatsapp connect failed: {}", ev.reason)
        elif k == "stopped" and not self.fatal:
            self.die(f"the WhatsApp client stopped {ev.reason}".strip())
        elif k == "activity":
            self.last_app = now
        elif k == "message" and ev.message is not None:
            self.last_app = now
            try:
                await self._handle(ev.message)
            except Exception as e:  # one bad message never stops the listener
                logger.warning("whatsapp message {} skipped: {!r}", ev.message.id, e)

    async def _watch(self) -> None:
        s = self.settings
        tick = max(0.05, min(5.0, s.channel_liveness / 4, s.whatsapp_silence / 4))
        while not self.fatal and not self.dead:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if not self.is_connected():
                if now - self.down_since > s.channel_liveness:
                    self.die(f"no working connection to WhatsApp for {s.channel_liveness:.0f}s")
            elif now - self.last_app > s.whatsapp_silence:
                try:
                    up = await asyncio.wait_for(self.client.is_connected(), 10)
                except Exception as e:  # cannot even ask: count it as down
                    logger.warning("whatsapp: is_connected failed: {!r}", e)
                    up = False
                if up:
                    self.die(f"connected but deaf: no message, receipt or presence from"
                             f" WhatsApp for {s.whatsapp_silence:.0f}s")
                else:  # the client knows better: a dead transport
                    self.connected, self.down_since = False, now

    # ---- inbound ----------------------------------------------------------------------
    async def _person(self, jid: str, alt: str = "") -> str:
        """One id per person: the phone number's digits, via the LID map if needed."""
        jid, alt = _bare(jid), _bare(alt)
        user, _, server = jid.partition("@")
        if server == "lid":
            pn = alt if alt.endswith("@s.whatsapp.net") else self.lids.get(jid)
            pn = pn or await self.client.pn_for_lid(jid)
            if pn:
                self.lids[jid] = _bare(pn)
                return _bare(pn).partition("@")[0]
            return jid
        if server == "s.whatsapp.net":
            if alt.endswith("@lid"):
                self.lids[alt] = jid
            return user
        return jid

    async def _handle(self, m: WAMessage) -> None:
        if m.reaction is not None:
            return  # a reaction is not chat input (it proved liveness already)
        if not m.id or not _bare(m.chat):
            logger.warning("whatsapp message without an id or a chat skipped")
            return
        mine = {j for j in self.me if j}
        if m.from_me and (m.id in self.sent or _bare(m.chat) not in mine):
            return  # our own messages, except the owner's notes to self
        self._remember(self.known, m.id, m)
        sender = await self._person(m.sender, m.sender_alt)
        if m.is_group:
            pid = f"whatsapp:{_bare(m.chat)}"
        else:
            pid = f"whatsapp:{await self._person(m.chat, m.chat_alt or m.sender_alt)}"
        if await self._answer(pid, m, sender):
            return
        text = EDITED + m.text if m.is_edit else m.text
        names = [j.partition("@")[0] for j in mine]
        payload: dict[str, Any] = {
            "text": text, "sender_id": sender, "sender_name": m.push_name or None,
            "is_mention": not m.is_group or bool(mine & {_bare(j) for j in m.mentions})
            or _bare(m.quoted_sender) in mine or any(f"@{n}" in m.text for n in names),
            "is_group": m.is_group, "attachments": await self._download(m)}
        if m.is_edit:
            payload["edited"] = True
        if m.quoted_id:
            payload["reply_to"] = {"id": m.quoted_id, "text": m.quoted_text,
                                   "sender": await self._person(m.quoted_sender)
                                   if m.quoted_sender else ""}
        await self.host.inbound(pid, m.id, payload)

    async def _answer(self, pid: str, m: WAMessage, sender: str) -> bool:
        """A number sent in the chat of the latest card (not quoting another message):
        that card's option, as a click. The card is answered once."""
        card = self.cards.get(pid)
        n = m.text.strip().rstrip(".)")
        if not card or not n.isdigit() or len(n) > 3 or (
                m.quoted_id and m.quoted_id not in card["mids"]):
            return False
        q = parse_question(self.host.question(card["qid"], card["pid"]) or {})
        index = int(n) - 1
        option = q.value(index) if q and index >= 0 else None
        if option is None:
            return False
        await self.host.inbound(pid, f"act:{m.id}", {
            "question_id": card["qid"], "option": option, "user_id": sender}, kind="action")
        self.cards.pop(pid, None)
        self._save_cards()
        try:
            await self.client.send_text(_chat_jid(pid), f"✓ {q.selected_label(index)}")
        except Exception as e:
            logger.debug("whatsapp card confirmation not sent: {!r}", e)
        return True

    async def _download(self, m: WAMessage) -> list[dict[str, Any]]:
        out = []
        for f in m.media:
            name = SAFE_FILE.sub("_", f.name)[:128] or "file"  # the sender chose it
            if f.size and f.size > MAX_DOWNLOAD:
                out.append(attachment(name, f.mime) | {"error": "larger than 32 MB"})
                continue
            try:
                data = await asyncio.wait_for(self.client.download(f), 60)
                out.append(attachment(name, f.mime, data[:MAX_DOWNLOAD]))
            except Exception as e:
                logger.warning("whatsapp media {} not downloaded: {!r}", m.id, e)
                out.append(attachment(name, f.mime) | {"error": f"download failed: {e}"})
        return out

    # ---- outbound ---------------------------------------------------------------------
    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        if self.fatal or not self.is_connected():
            raise Unavailable(self.fatal or "not connected to WhatsApp")
        try:
            return await self._deliver(_chat_jid(platform_id), platform_id, message)
        except WANotConnected as e:
            raise Unavailable(str(e)) from None
        except WASendError as e:
            if "429" in str(e) or "rate-overlimit" in str(e):
                raise RetryAfter(30.0, str(e)) from None
            raise SendError(f"whatsapp: {e}", permanent=e.permanent) from None
        except (OSError, asyncio.TimeoutError) as e:
            raise SendError(f"whatsapp: {type(e).__name__}: {e}") from None

    async def _deliver(self, chat: str, pid: str, message: OutboundMessage) -> str | None:
        c = message.content
        op = c.get("operation")
        if op in ("edit", "reaction"):
            mid = str(reply_target(str(c.get("messageId") or "")) or "")
            if op == "edit":
                return await self.client.edit(chat, mid, str(c.get("text") or ""))
            target = self.known.get(mid)
            return await self.client.react(chat, target.sender if target else chat, mid,
                                           str(c.get("emoji") or "👍"))
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        q = parse_question(c)
        text = plain_text(c)
        if q:
            text += "\n\n" + "\n".join(f"{i + 1}. {o['label']}" for i, o in enumerate(q.options))
            text += "\n\nReply with the number."
        files = load_files(c)
        chunks = whatsapp_text(text, LIMIT)
        done = message.parts
        quote = self.known.get(reply_target(message.in_reply_to) or "")
        for i, chunk in enumerate(chunks):
            if i >= len(done):
                message.sent(await self.client.send_text(chat, chunk, quote if i == 0 else None))
                self._remember(self.sent, done[-1], None)
        for j, f in enumerate(files):
            if len(chunks) + j >= len(done):
                message.sent(await self.client.send_file(chat, f.name, f.data))
                self._remember(self.sent, done[-1], None)
        if not done:
            raise SendError("empty message", permanent=True)
        if q:
            self.cards[pid] = {"qid": q.question_id, "pid": pid, "mids": done}
            self._save_cards()
        return done[0]

    async def set_typing(self, platform_id: str, thread_id: str | None) -> None:
        if self.is_connected():
            await self.client.typing(_chat_jid(platform_id))

    async def open_dm(self, handle: str) -> str:
        """`whatsapp:15551234567`, `+1 555 123 4567` or a JID → the DM's platform id."""
        h = handle.removeprefix("whatsapp:")
        if "@" in h:
            return f"whatsapp:{await self._person(h)}"
        digits = re.sub(r"[\s()+.-]", "", h)
        if not digits.isdigit():
            raise SendError(f"cannot open a WhatsApp DM with {handle!r}", permanent=True)
        return f"whatsapp:{digits}"

    # ---- small state ------------------------------------------------------------------
    def _remember(self, d: OrderedDict, key: str, value: Any) -> None:
        d[key] = value
        while len(d) > REMEMBER:
            d.popitem(last=False)

    def _load_cards(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((self.dir / "cards.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_cards(self) -> None:
        """The latest card per chat survives a restart (its answer is a later number)."""
        try:
            wac.write_json(self.dir / "cards.json", dict(list(self.cards.items())[-200:]))
        except OSError as e:
            logger.warning("whatsapp cards not saved: {}", e)


def _bare(jid: str) -> str:
    """A JID without its device part (`15551234567:3@s.whatsapp.net` → `…@s.whatsapp.net`)."""
    user, at, server = (jid or "").partition("@")
    return user.split(":", 1)[0].split(".", 1)[0] + at + server if at else (jid or "")


def _chat_jid(platform_id: str) -> str:
    v = platform_id.removeprefix("whatsapp:")
    if "@" in v:
        return v
    if not v.isdigit():
        raise SendError(f"not a WhatsApp chat: {platform_id!r}", permanent=True)
    return f"{v}@s.whatsapp.net"
