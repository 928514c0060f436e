"""Turn a batch of inbound rows into the prompt, and the session into a system prompt.

The model sees messages as XML (`<message id from sender time>`), so every attribute
and text is escaped; `from` names a destination the model can answer with
`<message to="…">`, or `unknown:<channel>:<id>` when the host has given no name.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent_runner.db import Destination, InboundRow


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


def _attachments(content: dict) -> str:
    lines = []
    for att in content.get("attachments") or []:
        if isinstance(att, dict):
            name = att.get("name") or att.get("filename") or "file"
            where = att.get("localPath") or att.get("local_path")
            kind = att.get("type") or "file"
            lines.append(f"[{kind}: {name}" + (f" — saved to {where}]" if where else "]"))
    return ("\n" + "\n".join(escape(x) for x in lines)) if lines else ""


def format_row(row: InboundRow, destinations: list[Destination], tz: ZoneInfo) -> str:
    when = local_time(row.timestamp, tz)
    c = row.content
    if row.kind == "task":
        body = str(c.get("prompt") or "")
        if c.get("scriptOutput") is not None:
            body = f"Script output: {json.dumps(c['scriptOutput'])}\n\n{body}"
        return f"<task{_attrs(id=row.seq, time=when)}>{escape(body)}</task>"
    if row.kind == "webhook":
        body = c.get("text") or json.dumps(c.get("payload", c))
        return (f"<webhook{_attrs(id=row.seq, source=c.get('source'), event=c.get('event'))}>"
                f"{escape(str(body))}</webhook>")
    sender = c.get("senderName") or c.get("sender") or c.get("senderId")
    attrs = _attrs(id=row.seq, **{"from": source_name(row, destinations)}, sender=sender,
                   time=when, reply_to=c.get("replyTo") if isinstance(c.get("replyTo"), str)
                   else None)
    return f"<message{attrs}>{escape(row.text)}{_attachments(c)}</message>"


def format_batch(rows: list[InboundRow], destinations: list[Destination], tz_name: str) -> str:
    tz = zone(tz_name)
    parts = [format_row(r, destinations, tz) for r in rows]
    body = parts[0] if len(parts) == 1 else "<messages>\n" + "\n".join(parts) + "\n</messages>"
    return f"<context timezone={quoteattr(tz_name)}/>\n{body}"


def _read_md(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def system_prompt(assistant_name: str, destinations: list[Destination], group_dir: str,
                  global_dir: str) -> str:
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
        "The send_message tool sends a message at once (e.g. a progress update during long"
        " work).",
        f"Your working directory is {group_dir}; files you keep there persist.",
    ]
    for title, path in (("Shared memory", os.path.join(global_dir, "CLAUDE.md")),
                        ("Memory (CLAUDE.md)", os.path.join(group_dir, "CLAUDE.md"))):
        text = _read_md(path)
        if text:
            lines += ["", f"## {title}", text]
    return "\n".join(lines)
