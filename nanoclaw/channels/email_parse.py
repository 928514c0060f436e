"""A received mail, as the agent should see it: parsed with the stdlib `email` package
(policy=default), the text part preferred over HTML (HTML reduced to text), quoted text
("On … wrote:", `>` lines, an "Original Message" block) and the signature (after `-- `)
trimmed, attachments kept (bounded), and the thread it belongs to: the first Message-ID
of `References` (the root of the reply chain), else `In-Reply-To`, else its own.

Also what must never reach an agent: auto-replies and bounces (`Auto-Submitted` other
than `no`, `Precedence: bulk|junk|list`, `X-Autoreply`, `X-Autorespond`, a
`MAILER-DAEMON`/`postmaster` sender, an empty Return-Path `<>`), so two bots never
answer each other. Pure functions: any input gives a `Mail` or raises `BadMail`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses, parseaddr
from html.parser import HTMLParser
from typing import Any

from nanoclaw.channels.text import SAFE_FILE, attachment

MAX_TEXT = 100_000
MAX_FILES, MAX_FILE, MAX_FILES_TOTAL = 10, 10 << 20, 25 << 20
MSGID = re.compile(r"<([^<>\s]{1,500})>")
ADDR = re.compile(r"[^@\s<>\"(),;:]{1,200}@[A-Za-z0-9.-]{1,253}")
BOUNCERS = ("mailer-daemon", "postmaster", "noreply-bounce")


class BadMail(ValueError):
    """Not a mail we can read (no From address, unparseable)."""


@dataclass
class Mail:
    message_id: str              # without the angle brackets
    from_addr: str               # lower case
    from_name: str
    subject: str
    text: str                    # trimmed, as the agent sees it
    in_reply_to: str | None
    references: list[str]
    auth_headers: list[str]      # Authentication-Results, topmost first
    auto: str | None             # why it is an automatic mail, or None
    attachments: list[dict[str, Any]] = field(default_factory=list)
    to: list[str] = field(default_factory=list)

    @property
    def thread(self) -> str:
        """The root of the reply chain this mail is in (its own id if it starts one)."""
        if self.references:
            return self.references[0]
        return self.in_reply_to or self.message_id


def msgids(value: str | None) -> list[str]:
    return MSGID.findall(value or "")[:100]


def _header(msg: EmailMessage, name: str) -> str:
    try:
        v = msg.get(name)
    except Exception:  # a header policy=default cannot parse: read it raw
        v = next((raw for k, raw in msg.raw_items() if k.lower() == name.lower()), None)
    return str(v or "")[:4000]


def _all(msg: EmailMessage, name: str) -> list[str]:
    out = []
    for k, raw in msg.raw_items():
        if k.lower() == name.lower():
            out.append(re.sub(r"\r?\n[ \t]+", " ", str(raw)).strip()[:16_384])
    return out[:50]


def auto_reason(msg: EmailMessage, from_addr: str) -> str | None:
    """Why this mail was written by a machine (an auto-reply, a bounce, a list), or None."""
    auto = _header(msg, "Auto-Submitted").strip().lower()
    if auto and not auto.startswith("no"):
        return f"Auto-Submitted: {auto[:40]}"
    prec = _header(msg, "Precedence").strip().lower()
    if prec in ("bulk", "junk", "list", "auto_reply"):
        return f"Precedence: {prec}"
    for h in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress-Me"):
        if _header(msg, h):
            return h
    if any(k.lower() == "return-path" for k in msg.keys()) and \
            _header(msg, "Return-Path").strip() in ("<>", ""):
        return "empty Return-Path"
    local = from_addr.partition("@")[0]
    if local in BOUNCERS:
        return f"sender {local}"
    if msg.get_content_type() == "multipart/report":
        return "a delivery report"
    return None


# ---- text --------------------------------------------------------------------------------
class _Text(HTMLParser):
    BLOCK = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
             "table", "ul", "ol", "hr", "section", "article", "header", "footer"}
    SKIP = {"script", "style", "head", "title", "blockquote"}
    VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base",
            "source"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.href: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if self.skip or tag in self.SKIP or "gmail_quote" in (a.get("class") or ""):
            if tag not in self.VOID:  # inside something dropped: count to its end
                self.skip += 1
            return
        if tag in self.BLOCK:
            self.out.append("\n")
        if tag == "li":
            self.out.append("- ")
        if tag == "a":
            self.href.append(a.get("href"))

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if tag not in self.VOID:
                self.skip -= 1
            return
        if tag == "a" and self.href:
            href = self.href.pop()
            if href and href.startswith(("http://", "https://")) and \
                    href not in "".join(self.out[-3:]):
                self.out.append(f" ({href})")
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    p = _Text()
    try:
        p.feed(html[:2 * MAX_TEXT])
        p.close()
    except Exception:  # html.parser is lenient; anything it still refuses is dropped
        pass
    lines = [line.strip() for line in "".join(p.out).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


WROTE = re.compile(r"^\s*(On\s.{0,400}\swrote:|Am\s.{0,400}\sschrieb\s?.{0,100}:|Le\s.{0,400}"
                   r"\sa écrit\s?:)\s*$", re.I)
ORIGINAL = re.compile(r"^\s*(-{2,}\s*(Original Message|Forwarded message)\s*-{2,}|_{20,})\s*$",
                      re.I)


def trim_quotes(text: str) -> str:
    """What the writer wrote, without the quoted mail below (or between) it and without
    their signature."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        if line in ("-- ", "--"):
            break  # the signature separator
        if ORIGINAL.match(line):
            break
        if WROTE.match(line) or (i + 1 < len(lines) and line.strip().startswith("On ")
                                 and WROTE.match(f"{line} {lines[i + 1]}")):
            break  # "On …, Ann <a@b> wrote:" (mail programs wrap it over two lines too)
        if line.lstrip().startswith(">"):
            continue
        out.append(line)
    return "\n".join(out).strip()


# ---- the message -------------------------------------------------------------------------
def _body(msg: EmailMessage) -> str:
    try:
        part = msg.get_body(preferencelist=("plain", "html"))
    except Exception:
        part = None
    if part is None:
        return ""
    try:
        content = part.get_content()
    except Exception:  # an unknown charset or a broken transfer encoding
        payload = part.get_payload(decode=True) or b""
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    if not isinstance(content, str):
        return ""
    content = content[:2 * MAX_TEXT]
    return html_to_text(content) if part.get_content_type() == "text/html" else content


def _files(msg: EmailMessage) -> list[dict[str, Any]]:
    out, total = [], 0
    try:
        parts = list(msg.iter_attachments()) if msg.is_multipart() else []
    except Exception:
        return []
    for part in parts[:MAX_FILES]:
        try:
            if part.is_multipart():
                continue
            name = SAFE_FILE.sub("_", str(part.get_filename() or "file"))[:128] or "file"
            data = part.get_payload(decode=True) or b""
            mime = part.get_content_type()
        except Exception:
            continue
        if not isinstance(data, bytes):
            continue
        if len(data) > MAX_FILE or total + len(data) > MAX_FILES_TOTAL:
            out.append(attachment(name, mime) | {"error": "too large"})
            continue
        total += len(data)
        out.append(attachment(name, mime, data))
    return out


def parse(raw: bytes) -> Mail:
    """A mail as the agent should see it. Raises BadMail for one without a sender."""
    if not isinstance(raw, (bytes, bytearray)):
        raise BadMail("not bytes")
    try:
        msg = BytesParser(policy=policy.default).parsebytes(bytes(raw))
    except Exception as e:  # the parser is lenient; this is a bug in it, not our input
        raise BadMail(f"unparseable: {type(e).__name__}") from None
    assert isinstance(msg, EmailMessage)
    name, addr = parseaddr(_header(msg, "From"))
    addr = addr.strip().lower()
    if not ADDR.fullmatch(addr):
        raise BadMail("no From address")
    mid = (msgids(_header(msg, "Message-ID")) or [None])[0]
    if mid is None:  # a stable id of our own, so a second copy is the same message
        mid = "sha256-" + hashlib.sha256(bytes(raw)).hexdigest()[:40] + "@nanoclaw.invalid"
    try:
        to = [a.lower() for _, a in getaddresses([_header(msg, "To"), _header(msg, "Cc")])
              if a][:50]
    except Exception:
        to = []
    irt = (msgids(_header(msg, "In-Reply-To")) or [None])[0]
    text = trim_quotes(_body(msg))[:MAX_TEXT]
    return Mail(message_id=mid, from_addr=addr, from_name=name.strip()[:100],
                subject=re.sub(r"\s+", " ", _header(msg, "Subject")).strip()[:500], text=text,
                in_reply_to=irt, references=msgids(_header(msg, "References")),
                auth_headers=_all(msg, "Authentication-Results"), auto=auto_reason(msg, addr),
                attachments=_files(msg), to=to)
