"""What the approver sees: a request an agent makes is shown on its approval card
whole, exactly as it will run, on every platform (`shown`, `code`), and a request whose
card could not be shown whole is refused before anything is asked (`card_problem`).
Used by the self-modification actions (`selfmod.py`) and the agent's `ncl` (`cli/agent`).
"""

from __future__ import annotations

import re

# An approval card must show the whole request, exactly as it will run, on every platform:
# nothing cut, nothing hidden by whitespace or formatting. The card (title, a blank line,
# the question) has to fit in one piece of the tightest place that shows it: a Discord
# message (channels/discord_channel.LIMIT, 2000 characters), a Slack section block
# (channels/slack.BLOCK_LIMIT, 3000 characters of mrkdwn; Slack cuts the rest), a
# Telegram message (channels/telegram.LIMIT, 4096 UTF-16 units of HTML). CARD_ROOM is
# kept free for the "✓ Approved" line a click adds. A request that does not fit is
# refused up front, so nothing is queued that an admin could not read whole.
CARD_LIMITS = {"discord": 2000, "slack": 3000, "telegram": 4096}
CARD_ROOM = 64
CARD_CHARS = CARD_LIMITS["discord"] - CARD_ROOM  # the plain-text bound told to the agent
BARE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
SPACES = re.compile(r" {2,}")
MARK_OPEN, MARK_CLOSE = "⟨", "⟩"  # only ever our own run-of-spaces marker on a card
# printable by Python's rules, yet drawn as nothing (fillers, blank braille, joiners)
BLANK = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")


def shown(value: str) -> str:
    """One value as an approver sees it: bare when it is plainly safe, else quoted with
    every control, invisible or unusual whitespace character escaped (\\n, \\t,
    \\u200b, …) and runs of spaces counted (⟨560 spaces⟩). The result is one line with no
    backquote, so a `\\n\\n` cannot make a card look like prose, padding cannot push the
    rest out of sight and nothing can close the code block it is shown in; and it is
    unambiguous: the value can be read back from it exactly."""
    if BARE.fullmatch(value):
        return value
    out = []
    for ch in value:
        if ch in "\\'":
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif ch == " " or (ch.isprintable() and ch not in BLANK
                           and ch not in "`" + MARK_OPEN + MARK_CLOSE):
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000
                       else f"\\U{o:08x}")
    text = SPACES.sub(lambda m: f"{MARK_OPEN}{len(m.group())} spaces{MARK_CLOSE}", "".join(out))
    return f"'{text}'"


def shown_line(words: list[str]) -> str:
    return " ".join(shown(w) for w in words)


def code(text: str) -> str:
    """A fenced block: shown literally by every channel (no emphasis, links or quotes).
    Its lines come from `shown`, which never contains a newline or a backquote."""
    return f"```\n{text}\n```"


def card_problem(title: str, question: str) -> str | None:
    """Why this card cannot be shown whole on every platform (one line), or None."""
    from nanoclaw.channels.markdown import discord_markdown, slack_mrkdwn, telegram_html

    text = f"{title}\n\n{question}" if title else question
    size = len(text)
    if size > CARD_CHARS:
        return (f"it is too long to show whole on an approval card ({size} characters as"
                f" shown, at most {CARD_CHARS})")
    fits = (len(discord_markdown(text, CARD_LIMITS["discord"] - CARD_ROOM)) == 1
            and len(slack_mrkdwn(text, CARD_LIMITS["slack"] - CARD_ROOM)) == 1
            and len(telegram_html(text, CARD_LIMITS["telegram"] - CARD_ROOM)) == 1)
    if not fits:
        return (f"it is too long to show whole on an approval card once formatted for chat"
                f" ({size} characters as shown)")
    return None
