"""An agent's reply as a mail: the Markdown it wrote as the text/plain part and rendered to
HTML (markdown-it-py, raw HTML off) as its text/html twin (multipart/alternative), files
attached, and the headers that make it thread in the user's mail program: `In-Reply-To`
the message answered, `References` the chain's root and that message, `Re:` before the
subject. Every mail we send carries `Auto-Submitted: auto-replied`, so well-behaved
auto-responders (and another of these bots) never answer it, and a `Message-ID` made
from the send's part key, so a retried send is the same message. Pure, no I/O.
"""

from __future__ import annotations

import mimetypes
import re
import time
from email import policy
from email.message import EmailMessage
from email.utils import formataddr, formatdate

from nanoclaw.channels.markdown_walk import MD
from nanoclaw.channels.numbered import card_body
from nanoclaw.channels.text import OutFile, parse_question, plain_text

LIMIT = 50_000  # characters of text in one mail; a longer reply goes as several

PAGE = ('<!doctype html><html><head><meta charset="utf-8"></head>'
        '<body style="font-family: sans-serif; line-height: 1.4">{}</body></html>')


def text_of(content: dict) -> str:
    """The Markdown a send carries (a question card as a numbered list)."""
    q = parse_question(content)
    return card_body(q) if q is not None else plain_text(content)


def to_html(markdown: str) -> str:
    return PAGE.format(MD.render(markdown))


def reply_subject(subject: str) -> str:
    subject = re.sub(r"\s+", " ", subject or "").strip()
    if not subject:
        return "Re: your message"
    return subject if re.match(r"(?i)^re\s*:", subject) else f"Re: {subject}"


def first_line_subject(text: str) -> str:
    line = next((ln.strip(" #*_>`") for ln in text.splitlines() if ln.strip()), "")
    return (line[:70] + "…") if len(line) > 70 else (line or "Message")


def domain_of(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"


def compose(*, sender: str, sender_name: str, to: str, subject: str, text: str,
            message_id: str, in_reply_to: str | None = None,
            references: list[str] | None = None, files: list[OutFile] | None = None,
            when: float | None = None) -> EmailMessage:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = formataddr((sender_name, sender)) if sender_name else sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(when if when is not None else time.time(), usegmt=True)
    msg["Message-ID"] = f"<{message_id}>"
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to}>"
    refs = [r for i, r in enumerate(references or []) if r and r not in (references or [])[:i]]
    if refs:
        msg["References"] = " ".join(f"<{r}>" for r in refs[-20:])
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(text or " ")
    msg.add_alternative(to_html(text or ""), subtype="html")
    for f in files or []:
        mime = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        maintype, _, subtype = mime.partition("/")
        msg.add_attachment(f.data, maintype=maintype, subtype=subtype, filename=f.name)
    return msg
