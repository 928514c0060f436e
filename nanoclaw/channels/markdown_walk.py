"""The first half of `markdown.py`: Markdown (parsed by markdown-it-py, CommonMark plus
tables and ~~strike~~) walked into pieces, runs of text under the stack of a dialect's
wrappers (bold, a link, a code block), with our own markup (a bullet, a quote bar) kept
apart so it is never escaped or cut. A `Dialect` says what each wrapper is on one
platform; `markdown_pack.pack` cuts the pieces into chunks. Pure, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from markdown_it import MarkdownIt

from nanoclaw.channels.markdown_pack import Piece, Wrap

MD = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


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


# ---- Markdown → pieces --------------------------------------------------------------
class Walker:
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
        for t in MD.parse(text):
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

