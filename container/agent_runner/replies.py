"""Read the model's final text: which `<message to="…">` blocks to send, and what is left.

Pure functions, so the delivery rules (unknown names go back to the agent, bare text
gets one nudge) are decided in the poll loop and tested without a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INTERNAL = re.compile(r"<internal>.*?(?:</internal>|\Z)", re.S)
BLOCK = re.compile(r"""<message\s+to\s*=\s*(?:"([^"]*)"|'([^']*)')\s*>(.*?)</message>""", re.S)

NUDGE = (  # no complete example block here: an echoed nudge must not parse as a reply
    "Nothing you wrote was delivered: only text inside a <message to=\"…\"> block (closed "
    "by the message end tag) is sent. Send your reply again, wrapped in a block addressed "
    "to the sender (the `from` of their message)."
)


@dataclass(frozen=True)
class ParsedReply:
    blocks: list[tuple[str, str]]  # (destination name, text), in order
    bare: str  # text outside any block, <internal> removed, trimmed


def parse_reply(text: str) -> ParsedReply:
    text = INTERNAL.sub("", text or "")
    blocks = []
    for m in BLOCK.finditer(text):
        body = m.group(3).strip()
        if body:
            blocks.append(((m.group(1) if m.group(1) is not None else m.group(2)).strip(), body))
    return ParsedReply(blocks, BLOCK.sub("", text).strip())


def correction(unknown: list[str], known: list[str]) -> str:
    names = ", ".join(f'"{n}"' for n in known) or "(none)"
    bad = ", ".join(f'"{n}"' for n in unknown)
    return (f"These messages were not sent: no destination is called {bad}. "
            f"Known destinations: {names}. Resend them with a known name.")
