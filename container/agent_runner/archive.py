"""Before older context goes, keep it readable: the CLI's transcript (JSON lines) before
it compacts, or the messages the `anthropic` provider sets aside when the context is
full, become `<group>/conversations/<date>-<session>.md`, each message capped at 2,000
characters, so what was said survives the summary."""

from __future__ import annotations

import json
import os
import time
from typing import Any

CAP = 2000


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            parts.append(f"[tool {block.get('name')}: {json.dumps(block.get('input'))[:300]}]")
        elif block.get("type") == "tool_result":
            parts.append(f"[tool result: {_text(block.get('content'))[:300]}]")
    return "\n".join(p for p in parts if p.strip())


def render(lines: list[str], session_id: str, why: str = "before compaction") -> str:
    out = [f"# Conversation {session_id}", "",
           f"Archived {why}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("type") not in ("user", "assistant"):
            continue
        message = entry.get("message") or {}
        text = _text(message.get("content")).strip()
        if not text:
            continue
        if len(text) > CAP:
            text = text[:CAP] + f" … [{len(text) - CAP} characters cut]"
        who = "User" if entry["type"] == "user" else "Assistant"
        out += [f"## {who} ({entry.get('timestamp', '')})", "", text, ""]
    return "\n".join(out)


def archive(transcript_path: str, folder: str, session_id: str) -> str | None:
    """Write the archive; returns its path (None when there is no transcript)."""
    try:
        with open(transcript_path, encoding="utf-8") as fh:
            lines = fh.readlines()
    except OSError:
        return None
    return _write(folder, session_id, render(lines, session_id))


def archive_messages(messages: list[dict[str, Any]], folder: str, session_id: str,
                     why: str) -> str:
    """Write Messages API turns (`{"role", "content"}`) the same way; returns the path."""
    lines = [json.dumps({"type": m.get("role"), "message": m}) for m in messages]
    return _write(folder, session_id, render(lines, session_id, why))


def _write(folder: str, session_id: str, text: str) -> str:
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{time.strftime('%Y-%m-%d-%H%M%S')}-{session_id[:8]}")
    path, n = f"{stem}.md", 1
    while os.path.exists(path):  # two in one second: never overwrite an archive
        n += 1
        path = f"{stem}-{n}.md"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path
