"""The second half of `markdown.py`: rendered pieces (text under a stack of wrappers)
cut into chunks at a platform's limit. A cut is made *after* rendering, so it never falls
inside a tag or an entity: the wrappers open at a cut are closed at the end of one chunk
and reopened at the start of the next, and their length counts against the limit. The
cut prefers a paragraph break, then a line break, then a space, then a hard cut, as
`text.split_text` does; each chunk carries its plain-text twin. Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Wrap:
    """Markup around a span: what opens and closes it, and what plain text adds."""
    open: str
    close: str
    plain_close: str = ""


@dataclass(frozen=True)
class Piece:
    text: str
    wraps: tuple[Wrap, ...]
    raw: bool = False  # our own markup (a bullet, a quote bar): never escaped or cut


@dataclass(frozen=True)
class Chunk:
    markup: str
    plain: str


# ---- pieces → chunks ----------------------------------------------------------------
def pack(pieces: list[Piece], escape: Callable[[str], str], limit: int,
         utf16: bool = False) -> list[Chunk]:
    """Cut the rendered pieces into chunks of at most `limit` characters of markup,
    counting the tags that close a chunk and reopen in the next."""
    if limit < 1:
        raise ValueError("limit must be positive")
    atoms: list[tuple[str, tuple[Wrap, ...], int, bool]] = []  # (text, wraps, cost, raw)
    for p in pieces:
        if p.raw:
            atoms.append((p.text, p.wraps, len(p.text), True))
        else:
            atoms.extend((ch, p.wraps, len(escape(ch)) + (utf16 and ord(ch) > 0xFFFF), False)
                         for ch in p.text)
    chunks: list[Chunk] = []
    i = 0
    while i < len(atoms):
        cut, skip = _cut(atoms, i, limit)
        part = atoms[i:cut]
        if any(not raw and not ch.isspace() for ch, _, _, raw in part):
            chunks.append(_render(part, escape))
        i = cut + skip
    return chunks


def _cut(atoms: list, start: int, limit: int) -> tuple[int, int]:
    """(end, separator length) of the chunk starting at `start`."""
    stack: tuple[Wrap, ...] = ()
    length = 0
    best: dict[str, tuple[int, int]] = {}  # kind → last (index, skip) that fits
    for j in range(start, len(atoms)):
        ch, wraps, cost, raw = atoms[j]
        if j > start and not raw and ch in ("\n", " "):
            at = length + _closing(stack)
            if ch == " ":
                best["space"] = (j, 1)
            elif at >= limit // 2:
                double = j + 1 < len(atoms) and atoms[j + 1][0] == "\n" and not atoms[j + 1][3]
                best["para" if double else "line"] = (j, 2 if double else 1)
        step = cost + _switch(stack, wraps)
        if j > start and length + step + _closing(wraps) > limit:
            for kind in ("para", "line", "space"):
                if kind in best:
                    return best[kind]
            return j, 0
        length += step
        stack = wraps
    return len(atoms), 0


def _common(a: tuple[Wrap, ...], b: tuple[Wrap, ...]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def _switch(a: tuple[Wrap, ...], b: tuple[Wrap, ...]) -> int:
    if a is b:
        return 0
    k = _common(a, b)
    return sum(len(w.close) for w in a[k:]) + sum(len(w.open) for w in b[k:])


def _closing(stack: tuple[Wrap, ...]) -> int:
    return sum(len(w.close) for w in stack)


def _render(atoms: list, escape: Callable[[str], str]) -> Chunk:
    markup: list[str] = []
    plain: list[str] = []
    stack: tuple[Wrap, ...] = ()
    for ch, wraps, _, raw in atoms + [("", (), 0, True)]:
        if wraps is not stack and wraps != stack:
            k = _common(stack, wraps)
            for w in reversed(stack[k:]):
                markup.append(w.close)
                plain.append(w.plain_close)
            markup.extend(w.open for w in wraps[k:])
            stack = wraps
        markup.append(ch if raw else escape(ch))
        plain.append(ch)
    return Chunk("".join(markup), "".join(plain))
