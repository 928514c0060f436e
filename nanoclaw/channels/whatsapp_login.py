"""Linking WhatsApp Web: what `nanoclaw channels login whatsapp` runs.

Without WHATSAPP_PHONE_NUMBER it prints a QR code in the terminal (WhatsApp on the
phone → Settings → Linked devices → Link a device) and prints the next one each time
WhatsApp replaces it (the first lives about 60 s, the next about 20 s each). With it,
it prints an 8-character pairing code instead (Linked devices → Link with phone number).
The current QR text also goes to `data/channels/whatsapp/status.json` (0600) for a page
that wants to draw it. Returns 0 once WhatsApp confirms the link; the keys stay in
`data/channels/whatsapp/` (0700), which no sandbox ever mounts.
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import TextIO

from nanoclaw.channels import whatsapp_client as wac
from nanoclaw.channels.whatsapp_client import WAClient, WAEvent
from nanoclaw.config import Settings

LOGIN_TIMEOUT = 300.0   # whatsmeow gives up on QR codes after about 3 minutes anyway
CONNECT_AFTER_PAIR = 30.0


def render_qr(code: str) -> str:
    """The QR code as terminal text (two modules per character, black on white)."""
    import io

    import segno

    buf = io.StringIO()
    segno.make_qr(code, error="l").terminal(out=buf, compact=True)
    return buf.getvalue()


def phone_digits(number: str) -> str:
    """`+1 (555) 123-4567` → `15551234567`; raises ValueError for anything else."""
    digits = re.sub(r"[\s()+.-]", "", number)
    if not digits.isdigit() or not 7 <= len(digits) <= 15:
        raise ValueError(f"WHATSAPP_PHONE_NUMBER {number!r} is not a phone number with"
                         " its country code (e.g. 15551234567)")
    return digits


async def login(settings: Settings, out: TextIO | None = None, client: WAClient | None = None,
                timeout: float = LOGIN_TIMEOUT) -> int:
    """Link this host as a WhatsApp device; 0 when linked, 1 when it did not happen."""
    out = out or sys.stdout
    say = lambda *lines: (print(*lines, sep="\n", file=out), out.flush())  # noqa: E731
    d = wac.store_dir(settings)
    try:
        phone = phone_digits(settings.whatsapp_phone_number) \
            if settings.whatsapp_phone_number else ""
    except ValueError as e:
        say(str(e))
        return 1
    client = client or wac.new_client(settings)
    if await client.is_paired():
        say(f"WhatsApp is already linked (keys in {d}). To link another account, remove that"
            " folder first.")
        return 0
    paired, connected, failed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    state = {"qrs": 0, "asked": False, "error": ""}
    clear = "\x1b[2J\x1b[H" if getattr(out, "isatty", lambda: False)() else ""

    async def on_event(ev: WAEvent) -> None:
        if ev.kind == "qr" and phone:
            if not state["asked"]:  # whatsmeow takes the number once the socket is up
                state["asked"] = True
                try:
                    code = await client.pair_phone(phone)
                except Exception as e:
                    state["error"] = f"WhatsApp refused a pairing code for {phone}: {e}"
                    failed.set()
                    return
                say(f"Pairing code for +{phone}:  {code}", "",
                    "On the phone: WhatsApp → Settings → Linked devices → Link a device →"
                    " Link with phone number instead, then type the code.")
        elif ev.kind == "qr":
            state["qrs"] += 1
            wac.write_status(d, "qr", qr=ev.code)
            head = "Scan this QR code with WhatsApp (Settings → Linked devices → Link a device)"
            if state["qrs"] > 1:
                head = f"The last code expired; here is a new one ({state['qrs']})"
            say(clear + head + ":", "", render_qr(ev.code))
        elif ev.kind == "pair_success":
            wac.write_status(d, "linked", jid=ev.jid)
            say(f"Linked as {ev.jid or 'this account'}. Finishing the first connection…")
            paired.set()
        elif ev.kind == "connected" and paired.is_set():
            connected.set()
        elif ev.kind in ("pair_error", "logged_out", "conflict", "temp_ban", "outdated",
                         "stopped"):
            state["error"] = f"linking failed: {ev.kind.replace('_', ' ')} {ev.reason}".strip()
            failed.set()

    client.handler = on_event
    try:
        await client.connect()
        ends = [asyncio.ensure_future(e.wait()) for e in (paired, failed)]
        await asyncio.wait(ends, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for t in ends:
            t.cancel()
        if not paired.is_set():
            say(state["error"] or f"No link within {timeout:.0f}s (the codes expired)."
                " Run the command again.")
            wac.write_status(d, "unlinked", reason=state["error"] or "timed out")
            return 1
        try:  # the keys are stored; the first real connection follows a stream restart
            await asyncio.wait_for(connected.wait(), CONNECT_AFTER_PAIR)
        except asyncio.TimeoutError:
            say("(WhatsApp has not reconnected yet; the channel will, when it starts.)")
        say("Done. Enable the channel with NANOCLAW_WHATSAPP_ENABLED=1 (or restart it:"
            " nanoclaw workers restart channel:whatsapp).")
        return 0
    finally:
        await client.disconnect()


def run(settings: Settings, out: TextIO | None = None) -> int:
    """For a synchronous caller (the CLI verb)."""
    return asyncio.run(login(settings, out))
