"""Agents write Markdown; each platform wants its own markup. This renders Markdown
(parsed by markdown-it-py, CommonMark plus tables and ~~strike~~) to Telegram HTML and
Slack mrkdwn, and splits the result at a platform's length limit *after* rendering,
so a cut never falls inside a tag or an entity: formatting open at a cut is closed at
the end of one chunk and reopened at the start of the next (a code block stays a code
block on both sides). Discord speaks Markdown natively: its text passes through, split
the same way around fenced code blocks.

The split prefers what `text.split_text` prefers (paragraph, line, space, hard cut), and
each Telegram chunk carries a plain-text twin to send when Telegram refuses the HTML.
Pure functions, no I/O.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Callable

from markdown_it import MarkdownIt

_MD = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
LINKABLE = ("http://", "https://", "mailto:", "tg://")


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


@dataclass(frozen=True)
class Dialect:
    bold: Wrap
    italic: Wrap
    strike: Wrap
    code: Wrap
    pre: Callable[[str], Wrap]          # language → wrapper
    link: Callable[[str, bool], Wrap]   # (url, is the text the url itself) → wrapper
    quote: Wrap | None                  # None: quote with a "> " line prefix
    escape: Callable[[str], str]
    keep: re.Pattern[str] | None = None  # platform syntax passed through (Slack <@U1>)


def _esc(s: str) -> str:
    return html.escape(s, quote=False)


def _tg_link(url: str, auto: bool) -> Wrap:
    note = "" if auto else f" ({url})"
    if url.startswith(LINKABLE):
        return Wrap(f'<a href="{html.escape(url)}">', "</a>", note)
    return Wrap("", _esc(note), note)


def _tg_pre(lang: str) -> Wrap:
    if re.fullmatch(r"[\w#+.-]{1,32}", lang):
        return Wrap(f'<pre><code class="language-{lang}">', "</code></pre>")
    return Wrap("<pre>", "</pre>")


def _slack_link(url: str, auto: bool) -> Wrap:
    note = "" if auto else f" ({url})"
    if url.startswith(LINKABLE[:3]):
        return Wrap(f"<{_esc(url).replace('|', '%7C')}|", ">", note)
    return Wrap("", _esc(note), note)


TELEGRAM = Dialect(Wrap("<b>", "</b>"), Wrap("<i>", "</i>"), Wrap("<s>", "</s>"),
                   Wrap("<code>", "</code>"), _tg_pre, _tg_link,
                   Wrap("<blockquote>", "</blockquote>"), _esc)
SLACK = Dialect(Wrap("*", "*"), Wrap("_", "_"), Wrap("~", "~"), Wrap("`", "`"),
                lambda lang: Wrap("```\n", "\n```"), _slack_link, None, _esc,
                re.compile(r"<[@#!][^<>\s]*>"))


def telegram_html(text: str, limit: int) -> list[Chunk]:
    """Telegram HTML (parse_mode HTML), each chunk at most `limit` UTF-16 units of markup
    (Telegram counts in UTF-16: an emoji outside the BMP is two)."""
    return _pack(_Walker(TELEGRAM).render(text), TELEGRAM.escape, limit, utf16=True)


def slack_mrkdwn(text: str, limit: int) -> list[str]:
    """Slack mrkdwn, each chunk at most `limit` characters."""
    return [c.markup for c in _pack(_Walker(SLACK).render(text), SLACK.escape, limit)]


WHATSAPP = Dialect(Wrap("*", "*"), Wrap("_", "_"), Wrap("~", "~"), Wrap("`", "`"),
                   lambda lang: Wrap("```\n", "\n```"),
                   lambda url, auto: Wrap("", "" if auto else f" ({url})",
                                          "" if auto else f" ({url})"),
                   None, lambda s: s)


def whatsapp_text(text: str, limit: int) -> list[str]:
    """WhatsApp formatting (*bold*, _italic_, ~strike~, ```code```; a link as its text
    and the URL), for WhatsApp Web and the Cloud API alike; blank chunks dropped."""
    return [c.markup for c in _pack(_Walker(WHATSAPP).render(text), WHATSAPP.escape, limit)
            if c.markup.strip()]


def discord_markdown(text: str, limit: int) -> list[str]:
    """The text as written, split so that a fenced code block cut in two is closed and
    reopened (with its language) instead of running into the next message."""
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    pieces: list[Piece] = []
    at = 0
    for t in _MD.parse(text):
        if t.type != "fence" or not t.map or t.map[1] - t.map[0] < 2:
            continue
        first, end = t.map
        opening = lines[first]
        closed = lines[end - 1].strip().lstrip(">").strip().startswith(t.markup)
        body_end = end - 1 if closed else end
        if body_end <= first + 1:
            continue  # an empty block: nothing to cut, keep it as written
        fence = opening[:max(opening.find(t.markup), 0)] + t.markup
        closing = lines[end - 1] if closed else fence
        pieces.append(Piece(text[at:starts[first]], ()))
        pieces.append(Piece(text[starts[first + 1]:starts[body_end] - 1],
                            (Wrap(opening + "\n", "\n" + closing),)))
        at = min(starts[end] - 1, len(text))  # the newline after the block stays outside
    pieces.append(Piece(text[at:], ()))
    return [c.markup for c in _pack(pieces, lambda s: s, limit)]


# ---- Markdown → pieces --------------------------------------------------------------
class _Walker:
    def __init__(self, d: Dialect):
        self.d = d
        self.pieces: list[Piece] = []
        self.wraps: list[Wrap | None] = []   # None: a repeat of an open wrapper (no-op)
        self.stack: tuple[Wrap, ...] = ()
        self.lines: list[list[str | None]] = []  # line prefixes: [continuation, first]
        self.lists: list[bool] = []          # open lists: ordered?
        self.table: list[list[str]] | None = None
        self.owe = 0                          # newlines owed before the next block
        self.bol = True                       # at the beginning of a line

    def render(self, text: str) -> list[Piece]:
        for t in _MD.parse(text):
            self.block(t)
        return self.pieces

    def block(self, t) -> None:  # noqa: C901 (one branch per token type)
        ty = t.type
        if ty == "inline":
            if self.table is not None:
                self.table[-1].append(_plain(t.children or []))
            else:
                self.inline(t.children or [])
        elif ty == "paragraph_open":
            self.flush()
        elif ty == "paragraph_close":
            self.owe = 1 if t.hidden else 2
        elif ty == "heading_open":
            self.flush()
            self.push(self.d.bold)
        elif ty == "heading_close":
            self.pop()
            self.owe = 2
        elif ty in ("bullet_list_open", "ordered_list_open"):
            self.flush()
            self.lists.append(ty == "ordered_list_open")
        elif ty in ("bullet_list_close", "ordered_list_close"):
            self.lists.pop()
            self.owe = 1 if self.lists else 2
        elif ty == "list_item_open":
            self.flush()
            ordered = self.lists[-1] if self.lists else False
            marker = f"{t.info}{t.markup} " if ordered else (
                "• " if len(self.lists) < 2 else "◦ ")
            self.lines.append([" " * len(marker), marker])
        elif ty == "list_item_close":
            self.lines.pop()
            self.owe = max(self.owe, 1)
        elif ty == "blockquote_open":
            self.flush()
            if self.d.quote is None:
                self.lines.append(["> ", None])
            else:
                self.push(self.d.quote)
        elif ty == "blockquote_close":
            if self.d.quote is None:
                self.lines.pop()
            else:
                self.pop()
            self.owe = 2
        elif ty in ("fence", "code_block"):
            self.flush()
            self.push(self.d.pre(t.info.strip().split(" ")[0] if ty == "fence" else ""))
            self.text(t.content.rstrip("\n"))
            self.pop()
            self.owe = 2
        elif ty == "hr":
            self.flush()
            self.text("──────────")
            self.owe = 2
        elif ty == "table_open":
            self.flush()
            self.table = []
        elif ty == "tr_open" and self.table is not None:
            self.table.append([])
        elif ty == "table_close" and self.table is not None:
            rows, self.table = self.table, None
            self.push(self.d.pre(""))
            self.text(_grid(rows))
            self.pop()
            self.owe = 2

    def inline(self, children: list) -> None:
        skip = False
        for i, c in enumerate(children):
            ty = c.type
            if skip:  # the text of a link already written
                skip = False
                continue
            if ty == "text":
                self.text(c.content, keep=self.d.keep)
            elif ty in ("softbreak", "hardbreak"):
                self.newline()
            elif ty in ("strong_open", "em_open", "s_open"):
                self.push({"strong_open": self.d.bold, "em_open": self.d.italic,
                           "s_open": self.d.strike}[ty])
            elif ty in ("strong_close", "em_close", "s_close", "link_close"):
                self.pop()
            elif ty == "code_inline":
                self.push(self.d.code)
                self.text(c.content)
                self.pop()
            elif ty == "link_open":
                href, auto = str(c.attrs.get("href") or ""), c.markup == "autolink"
                nxt = children[i + 1] if i + 1 < len(children) else None
                if auto and nxt is not None and nxt.type == "text" and "|" in nxt.content:
                    href, label = nxt.content.split("|", 1)  # Slack's own <url|label>
                    self.push(self.d.link(href, False))
                    self.text(label)
                    skip = True
                else:
                    self.push(self.d.link(href, auto))
            elif ty == "image":
                self.push(self.d.link(str(c.attrs.get("src") or ""), False))
                self.text(c.content or "image")
                self.pop()

    # ---- emitting -------------------------------------------------------------------
    def push(self, w: Wrap) -> None:
        self.wraps.append(None if w in self.stack else w)
        self.stack = tuple(x for x in self.wraps if x is not None)

    def pop(self) -> None:
        if self.wraps:
            self.wraps.pop()
            self.stack = tuple(x for x in self.wraps if x is not None)

    def flush(self) -> None:
        if self.pieces:
            for _ in range(self.owe):
                self.newline()
        self.owe = 0

    def newline(self) -> None:
        if self.bol:  # a blank line: only the visible part of the prefixes (Slack's ">")
            bar = "".join(str(e[0]) for e in self.lines).rstrip()
            if bar:
                self.pieces.append(Piece(bar, self.stack, True))
        self.pieces.append(Piece("\n", self.stack))
        self.bol = True

    def text(self, s: str, keep: re.Pattern[str] | None = None) -> None:
        for n, line in enumerate(s.split("\n")):
            if n:
                self.newline()
            if not line:
                continue
            if self.bol:
                prefix = "".join(str(e[1] if e[1] is not None else e[0]) for e in self.lines)
                for e in self.lines:
                    e[1] = None
                if prefix:
                    self.pieces.append(Piece(prefix, self.stack, True))
                self.bol = False
            at = 0
            for m in keep.finditer(line) if keep else ():
                self.pieces.append(Piece(line[at:m.start()], self.stack))
                self.pieces.append(Piece(m.group(), self.stack, True))
                at = m.end()
            self.pieces.append(Piece(line[at:], self.stack))


def _plain(children: list) -> str:
    out = []
    for c in children:
        if c.type in ("text", "code_inline"):
            out.append(c.content)
        elif c.type in ("softbreak", "hardbreak"):
            out.append(" ")
        elif c.type == "image":
            out.append(c.content)
    return "".join(out)


def _grid(rows: list[list[str]]) -> str:
    """A table as aligned monospace text (neither platform has tables)."""
    width = max((len(r) for r in rows), default=0)
    rows = [r + [""] * (width - len(r)) for r in rows]
    cols = [max(len(r[i]) for r in rows) for i in range(width)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, cols)).rstrip() for r in rows]
    if len(lines) > 1:
        lines.insert(1, "-+-".join("-" * w for w in cols))
    return "\n".join(lines)


# ---- pieces → chunks ----------------------------------------------------------------
def _pack(pieces: list[Piece], escape: Callable[[str], str], limit: int,
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
