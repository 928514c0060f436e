"""Turn a batch of inbound rows into the prompt, and the session into a system prompt.

The model sees messages as XML (`<message id from sender time>`), so every attribute
and text is escaped; `from` names a destination the model can answer with
`<message to="…">`, or `unknown:<channel>:<id>` when the host has given no name. Times
are the user's local time (en-US, 12-hour), under a `<context timezone/>` header.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent_runner.db import Destination, InboundRow

HOST_NOTE = ("agent", "system")


def zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_time(stamp: str, tz: ZoneInfo) -> str:
    """`Jan 5, 2025, 3:04 PM` in the user's zone (en-US, 12-hour)."""
    try:
        t = stamp.strip().replace(" ", "T").replace("Z", "+00:00")
        dt = datetime.fromisoformat(t)
    except ValueError:
        return stamp
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    dt = dt.astimezone(tz)
    hour = dt.hour % 12 or 12
    return f"{dt:%b} {dt.day}, {dt.year}, {hour}:{dt:%M} {'AM' if dt.hour < 12 else 'PM'}"


def source_name(row: InboundRow, destinations: list[Destination]) -> str:
    for dest in destinations:
        if row.channel_type and dest.channel == row.channel:
            return dest.name
    return f"unknown:{row.channel_type}:{row.platform_id}"


def quoteattr(value: str) -> str:
    return '"' + escape(value, {'"': "&quot;"}) + '"'


def _attrs(**pairs: object) -> str:
    return "".join(f" {k}={quoteattr(str(v))}" for k, v in pairs.items() if v not in (None, ""))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else json.dumps(value)


def attachment_lines(content: dict[str, Any]) -> list[str]:
    lines = []
    for att in content.get("attachments") or []:
        if not isinstance(att, dict):
            continue
        name = att.get("name") or att.get("filename") or "file"
        kind = att.get("type") or att.get("kind") or "file"
        where = att.get("localPath") or att.get("local_path")
        if where:
            lines.append(f"[{kind}: {name} — saved to {where}]")
        elif att.get("url"):
            lines.append(f"[{kind}: {name} — {att['url']}]")
        else:
            lines.append(f"[{kind}: {name} — not available]")
    return lines


def _quoted(reply: Any) -> tuple[str | None, str]:
    """(the id a message replies to, a nested <quoted_message> if the host gave its text)."""
    if isinstance(reply, (str, int)):
        return str(reply), ""
    if not isinstance(reply, dict):
        return None, ""
    rid = reply.get("id") or reply.get("messageId") or reply.get("message_id")
    author = reply.get("author") if isinstance(reply.get("author"), dict) else {}
    sender = (reply.get("senderName") or reply.get("sender") or author.get("fullName")
              or author.get("userName"))
    text = _text(reply.get("text"))
    if not text:
        return (str(rid) if rid else None), ""
    return (str(rid) if rid else None), (
        f"\n<quoted_message{_attrs(sender=sender)}>{escape(text)}</quoted_message>")


def format_row(row: InboundRow, destinations: list[Destination], tz: ZoneInfo) -> str:
    when = local_time(row.timestamp, tz)
    c = row.content
    frm = source_name(row, destinations) if row.channel_type else None
    if row.kind == "task":
        body = _text(c.get("prompt"))
        if c.get("scriptOutput") is not None:
            body = f"Script output: {json.dumps(c['scriptOutput'])}\n\n{body}"
        return f"<task{_attrs(id=row.seq, **{'from': frm}, time=when)}>{escape(body)}</task>"
    if row.kind == "webhook":
        body = c.get("text") or json.dumps(c.get("payload", c))
        attrs = _attrs(id=row.seq, **{"from": frm}, source=c.get("source"),
                       event=c.get("event"), time=when)
        return f"<webhook{attrs}>{escape(_text(body))}</webhook>"
    if row.kind == "system" or (row.channel == HOST_NOTE and c.get("action")):
        body = c.get("text") or c.get("result") or c.get("error") or ""
        attrs = _attrs(action=c.get("action"), status=c.get("status"), time=when)
        return f"<system_response{attrs}>{escape(_text(body))}</system_response>"
    if row.channel == HOST_NOTE:
        return f"<system{_attrs(id=row.seq, time=when)}>{escape(row.text)}</system>"
    sender = c.get("senderName") or c.get("sender") or c.get("senderId")
    reply_to, quoted = _quoted(c.get("replyTo"))
    attrs = _attrs(id=row.seq, **{"from": frm}, sender=sender, time=when, reply_to=reply_to)
    extra = "".join("\n" + escape(line) for line in attachment_lines(c))
    return f"<message{attrs}>{quoted}{escape(_text(c.get('text')))}{extra}</message>"


def format_batch(rows: list[InboundRow], destinations: list[Destination], tz_name: str,
                 header: bool = True) -> str:
    tz = zone(tz_name)
    parts = [format_row(r, destinations, tz) for r in rows]
    body = parts[0] if len(parts) == 1 else "<messages>\n" + "\n".join(parts) + "\n</messages>"
    return f"<context timezone={quoteattr(tz_name)}/>\n{body}" if header else body


def system_prompt(assistant_name: str, destinations: list[Destination], group_dir: str,
                  memory: str = "") -> str:
    """Who the agent is, where it can send, and how replies work (plus, for providers
    that do not read CLAUDE.md themselves, the agent's memory)."""
    lines = [f"You are {assistant_name}, a personal assistant reached through chat.", "",
             "## Destinations", "You can send messages to these destinations:"]
    for d in destinations:
        label = f" ({d.display_name})" if d.display_name and d.display_name != d.name else ""
        lines.append(f'- "{d.name}"{label}: {d.type}')
    if not destinations:
        lines.append("- (none)")
    lines += [
        "", "## How to reply",
        'Incoming messages look like <message id="…" from="NAME" sender="…" time="…">text'
        "</message>.",
        'Wrap every reply in <message to="NAME">your reply</message>, where NAME is one of'
        " the destinations above. Reply to the sender (the message's `from`) unless asked"
        " otherwise; use several blocks to reach several destinations.",
        "Text inside <internal>…</internal> is never sent, and neither is text outside a"
        " <message> block: use them for your own notes.",
        "<system> blocks are notes from the host, not from a person.",
        f"Your working directory is {group_dir}; files you keep there persist. Its CLAUDE.md"
        " is your memory: keep what you learn there.",
    ]
    if memory:
        lines += ["", memory]
    return "\n".join(lines)
