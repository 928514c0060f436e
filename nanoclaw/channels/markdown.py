"""Agents write Markdown; each platform wants its own markup. This renders Markdown
(parsed by markdown-it-py, CommonMark plus tables and ~~strike~~) to Telegram HTML and
Slack mrkdwn, and splits the result at a platform's length limit *after* rendering,
so a cut never falls inside a tag or an entity: formatting open at a cut is closed at
the end of one chunk and reopened at the start of the next (a code block stays a code
block on both sides). Discord speaks Markdown natively: its text passes through, split
the same way around fenced code blocks.

The split prefers what `text.split_text` prefers (paragraph, line, space, hard cut), and
each Telegram chunk carries a plain-text twin to send when Telegram refuses the HTML.
Pure functions, no I/O. The per-platform dialects are here; the walk from Markdown to
pieces is `markdown_walk.py`, the cut into chunks `markdown_pack.py`.
"""

from __future__ import annotations

import html
import re

from nanoclaw.channels.markdown_pack import Chunk, Piece, Wrap, pack
from nanoclaw.channels.markdown_walk import MD, Dialect, Walker

LINKABLE = ("http://", "https://", "mailto:", "tg://")


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
    return pack(Walker(TELEGRAM).render(text), TELEGRAM.escape, limit, utf16=True)


def slack_mrkdwn(text: str, limit: int) -> list[str]:
    """Slack mrkdwn, each chunk at most `limit` characters."""
    return [c.markup for c in pack(Walker(SLACK).render(text), SLACK.escape, limit)]


WHATSAPP = Dialect(Wrap("*", "*"), Wrap("_", "_"), Wrap("~", "~"), Wrap("`", "`"),
                   lambda lang: Wrap("```\n", "\n```"),
                   lambda url, auto: Wrap("", "" if auto else f" ({url})",
                                          "" if auto else f" ({url})"),
                   None, lambda s: s)


def whatsapp_text(text: str, limit: int) -> list[str]:
    """WhatsApp formatting (*bold*, _italic_, ~strike~, ```code```; a link as its text
    and the URL), for WhatsApp Web and the Cloud API alike; blank chunks dropped."""
    return [c.markup for c in pack(Walker(WHATSAPP).render(text), WHATSAPP.escape, limit)
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
    for t in MD.parse(text):
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
    return [c.markup for c in pack(pieces, lambda s: s, limit)]
