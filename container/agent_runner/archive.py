"""Before the CLI compacts a conversation, keep it readable: the transcript (JSON lines)
becomes `<group>/conversations/<date>-<session>.md`, each message capped at 2,000
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
    return "\n".join(p for p in parts if p.strip())


def render(lines: list[str], session_id: str) -> str:
    out = [f"# Conversation {session_id}", "",
           f"Archived before compaction, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
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
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{time.strftime('%Y-%m-%d-%H%M%S')}-{session_id[:8]}.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render(lines, session_id))
    return path
