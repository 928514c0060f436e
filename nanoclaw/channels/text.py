"""What every adapter does the same way with outbound content: split long text at the
platform's limit, encode question-card buttons to fit Telegram's 64-byte callback data,
render cards as plain text where a platform has no native form, and read attached files.

Pure functions, no I/O except `load_files` (reads the files a message names).
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from typing import Any

from nanoclaw.channels.base import SendError

# An edited message reaches the agent as a new one, its text prefixed with this (payload
# `edited`); routing matches engage patterns on the text after it.
EDITED = "[edited] "

CALLBACK_PREFIX = "ncq"
CALLBACK_LIMIT = 64  # bytes (Telegram's callback_data limit)
MAX_FILE = 50 << 20


def retry_after_header(headers: Any) -> float | None:
    """A `Retry-After` in seconds (0 to an hour), or None for none or nonsense."""
    try:
        v = float(headers.get("Retry-After", ""))
        return v if 0 <= v <= 3600 else None
    except (TypeError, ValueError):
        return None


def split_text(text: str, limit: int) -> list[str]:
    """Split `text` into chunks of at most `limit` characters: at the last paragraph break
    in the second half of the window, else the last line break there, else the last
    space, else a hard cut. The separator cut at is dropped; nothing else is lost."""
    if limit < 1:
        raise ValueError("limit must be positive")
    out: list[str] = []
    rest = text
    while len(rest) > limit:
        cut, skip = _cut(rest, limit)
        out.append(rest[:cut])
        rest = rest[cut + skip:]
    out.append(rest)
    return [c for c in out if c] or [""]


def split_bytes(text: str, max_bytes: int, limit: int | None = None) -> list[str]:
    """`split_text` at `limit` characters (default `max_bytes`), each chunk re-split until
    its UTF-8 fits `max_bytes` (platforms that count bytes: Teams, Google Chat, Webex)."""
    out: list[str] = []
    for chunk in split_text(text, limit or max_bytes):
        size = len(chunk.encode())
        if size <= max_bytes:
            out.append(chunk)
        else:
            out.extend(split_bytes(chunk, max_bytes,
                                   max(1, len(chunk) * max_bytes // size * 9 // 10)))
    return out


def _cut(rest: str, limit: int) -> tuple[int, int]:
    for sep in ("\n\n", "\n", " "):
        i = rest.rfind(sep, 0, limit + len(sep))
        if i > 0 and (sep == " " or i >= limit // 2):
            return i, len(sep)
    return limit, 0


def encode_choice(question_id: str, index: int) -> str:
    """Button data `ncq:<qid>:<index>`; raises ValueError if it would not fit 64 bytes."""
    data = f"{CALLBACK_PREFIX}:{question_id}:{index}"
    if len(data.encode()) > CALLBACK_LIMIT:
        raise ValueError(f"question id too long for a button: {question_id!r}")
    return data


def decode_choice(data: Any) -> tuple[str, int] | None:
    """(question id, option index) from button data, or None if it is not ours."""
    if not isinstance(data, str) or not data.startswith(CALLBACK_PREFIX + ":"):
        return None
    body = data[len(CALLBACK_PREFIX) + 1:]
    qid, sep, idx = body.rpartition(":")
    if not sep or not qid or not idx.isdigit() or len(idx) > 4:
        return None
    return qid, int(idx)


@dataclass
class Question:
    question_id: str
    title: str
    question: str
    options: list[dict[str, str]]  # {label, selectedLabel, value}

    def value(self, index: int) -> str | None:
        if 0 <= index < len(self.options):
            return self.options[index]["value"]
        return None

    def selected_label(self, index: int) -> str:
        if 0 <= index < len(self.options):
            o = self.options[index]
            return o.get("selectedLabel") or o["label"]
        return "?"

    def text(self) -> str:
        head = f"{self.title}\n\n" if self.title else ""
        return head + self.question


def parse_question(content: dict[str, Any]) -> Question | None:
    """A question card (`type: ask_question`) with its options normalised, or None."""
    if content.get("type") != "ask_question":
        return None
    qid = str(content.get("questionId") or "")
    opts = []
    for o in content.get("options") or []:
        if isinstance(o, str):
            o = {"label": o, "value": o}
        if not isinstance(o, dict):
            continue
        label = str(o.get("label") or o.get("value") or "")
        if label:
            opts.append({"label": label, "selectedLabel": str(o.get("selectedLabel") or label),
                         "value": str(o.get("value") if o.get("value") is not None else label)})
    if not qid or not opts:
        return None
    return Question(qid, str(content.get("title") or ""), str(content.get("question") or ""),
                    opts)


def card_text(content: dict[str, Any]) -> str:
    """A display card (`type: card`) as plain text: title, description, links."""
    if content.get("fallbackText"):
        return str(content["fallbackText"])
    card = content.get("card") if isinstance(content.get("card"), dict) else {}
    parts = [str(card.get(k)) for k in ("title", "description") if card.get(k)]
    for child in card.get("children") or []:
        if isinstance(child, dict) and child.get("text"):
            parts.append(str(child["text"]))
        elif isinstance(child, str):
            parts.append(child)
    for a in card.get("actions") or []:
        if isinstance(a, dict) and a.get("url"):
            parts.append(f"{a.get('label') or a['url']}: {a['url']}")
    return "\n\n".join(parts)


def card_links(content: dict[str, Any]) -> list[tuple[str, str]]:
    card = content.get("card") if isinstance(content.get("card"), dict) else {}
    return [(str(a.get("label") or a["url"]), str(a["url"])) for a in card.get("actions") or []
            if isinstance(a, dict) and isinstance(a.get("url"), str)
            and a["url"].startswith(("http://", "https://"))]


def plain_text(content: dict[str, Any]) -> str:
    """The text of an ordinary message (text, markdown or a card's fallback)."""
    if content.get("type") == "card":
        return card_text(content)
    q = parse_question(content)
    if q:
        return q.text()
    return str(content.get("text") or content.get("markdown") or "")


@dataclass
class OutFile:
    name: str
    data: bytes


SAFE_FILE = re.compile(r"[^A-Za-z0-9._-]+")


def load_files(content: dict[str, Any]) -> list[OutFile]:
    """The files of a message: `files: [{name, data (base64)} | {name?, path}]`.
    Raises a permanent SendError for a missing, oversized or unreadable file."""
    out = []
    for f in content.get("files") or []:
        if isinstance(f, str):
            f = {"path": f}
        if not isinstance(f, dict):
            raise SendError("a file must be an object", permanent=True)
        name = SAFE_FILE.sub("_", str(f.get("name") or os.path.basename(str(f.get("path"))) or
                                      "file"))[:128] or "file"
        if f.get("data") is not None:
            try:
                data = base64.b64decode(str(f["data"]), validate=True)
            except ValueError:
                raise SendError(f"file {name}: data is not base64", permanent=True) from None
        elif f.get("path"):
            try:
                if os.path.getsize(f["path"]) > MAX_FILE:
                    raise SendError(f"file {name} is larger than 50 MiB", permanent=True)
                with open(f["path"], "rb") as fh:
                    data = fh.read()
            except OSError as e:
                raise SendError(f"file {name}: {e.strerror}", permanent=True) from None
        else:
            raise SendError(f"file {name} has neither data nor path", permanent=True)
        out.append(OutFile(name, data))
    return out


def attachment(name: str, mime: str | None, data: bytes | None = None,
               url: str | None = None) -> dict[str, Any]:
    """An inbound attachment in the router's payload shape."""
    a: dict[str, Any] = {"name": name, "type": mime or "application/octet-stream"}
    if data is not None:
        a["data"] = base64.b64encode(data).decode()
    if url:
        a["url"] = url
    return a


def reply_target(in_reply_to: str | None) -> str | None:
    """The platform message id an outbound reply answers (`<platform id>:<agent group>`)."""
    if not in_reply_to:
        return None
    return in_reply_to.rsplit(":", 1)[0] if ":" in in_reply_to else in_reply_to
