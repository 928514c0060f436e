"""Discord's outbound half (`DiscordOutbound`, a mixin of `DiscordChannel`): a message
(with buttons, links and files on its last part), an edit, a reaction, a typing
indicator or a DM, with discord.py's errors sorted into the worker's vocabulary.

Discord renders Markdown itself: agent text passes through, split at 2000 characters
without leaving a fenced code block open across messages (`markdown.discord_markdown`).
A split half sent when the send failed is resumed, not repeated (`message.parts`, kept
by the worker), and every part carries an enforced nonce (`part_key`): a part whose post
landed but whose answer was lost (a crash, a timeout) is answered by Discord with the
message it already made when it is sent again, so it shows once.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import discord

from nanoclaw.channels.base import OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.markdown import discord_markdown
from nanoclaw.channels.text import (
    card_links,
    encode_choice,
    load_files,
    parse_question,
    plain_text,
    reply_target,
)

LIMIT = 2000


class DiscordOutbound:
    """The sends; the connection they use (client, ready, parts) is the channel's."""

    client: discord.Client
    ready: asyncio.Event

    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        if not self.ready.is_set():
            raise Unavailable("not connected to Discord yet")
        try:
            return await self._deliver(_snowflake(thread_id) if thread_id else
                                       _snowflake(platform_id), message)
        except discord.RateLimited as e:
            raise RetryAfter(e.retry_after, str(e)) from None
        except (discord.Forbidden, discord.NotFound) as e:
            raise SendError(f"discord refused: {e}", permanent=True) from None
        except discord.HTTPException as e:
            if e.status == 429:
                raise RetryAfter(float(getattr(e, "retry_after", 5) or 5), str(e)) from None
            raise SendError(f"discord: {e}", permanent=400 <= e.status < 500) from None
        except (OSError, asyncio.TimeoutError) as e:
            raise SendError(f"discord: {type(e).__name__}: {e}") from None

    async def _deliver(self, channel_id: int, message: OutboundMessage) -> str | None:
        c = message.content
        ch = self.client.get_partial_messageable(channel_id)
        op = c.get("operation")
        if op in ("edit", "reaction"):
            msg = ch.get_partial_message(_snowflake(c.get("messageId")))
            if op == "edit":
                await msg.edit(content=_first(str(c.get("text") or "")))
            else:
                await msg.add_reaction(str(c.get("emoji") or "👍"))
            return str(msg.id)
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        view = None
        q = parse_question(c)
        if q:
            view = discord.ui.View(timeout=None)
            try:
                for i, o in enumerate(q.options):
                    view.add_item(discord.ui.Button(label=o["label"][:80],
                                                    custom_id=encode_choice(q.question_id, i),
                                                    style=discord.ButtonStyle.primary))
            except ValueError as e:
                raise SendError(str(e), permanent=True) from None
        elif c.get("type") == "card" and card_links(c):
            view = discord.ui.View(timeout=None)
            for label, url in card_links(c)[:5]:
                view.add_item(discord.ui.Button(label=label[:80], url=url))
        files = load_files(c)  # a bad file is a permanent SendError
        chunks = discord_markdown(plain_text(c), LIMIT)
        if not chunks and not files:
            raise SendError("empty message", permanent=True)
        steps: list[tuple[str | None, bool]] = [(t, False) for t in chunks] or [(None, True)]
        steps[-1] = (steps[-1][0], True)  # the last message carries buttons and files
        done = message.parts
        target = reply_target(message.in_reply_to)  # an edit (`edit<n>:<id>`) answers <id>
        target = target.rsplit(":", 1)[-1] if target else None
        for i, (text, last) in enumerate(steps):
            if i < len(done):
                continue
            kwargs: dict[str, Any] = {}
            if last and view is not None:
                kwargs["view"] = view
            if last and files:
                kwargs["files"] = [discord.File(io.BytesIO(f.data), filename=f.name) for f in files]
            if i == 0 and target and target.isdigit():
                kwargs["reference"] = discord.MessageReference(
                    message_id=int(target), channel_id=channel_id, fail_if_not_exists=False)
            # the part's nonce, enforced: Discord answers a repeat of it (an attempt cut
            # off after the post landed) with the message it already made
            sent = await ch.send(content=text, nonce=message.part_key(i), **kwargs)
            message.sent(sent.id)
        return str(done[0])

    async def set_typing(self, platform_id: str, thread_id: str | None) -> None:
        await self.client.http.send_typing(_snowflake(thread_id or platform_id))

    async def open_dm(self, handle: str) -> str:
        uid = _snowflake(handle)
        user = await self.client.fetch_user(uid)
        dm = await user.create_dm()
        return f"discord:{dm.id}"


def _first(text: str) -> str:
    return (discord_markdown(text, LIMIT) or ["…"])[0]


def _snowflake(v: Any) -> int:
    s = str(v or "")
    s = s.rsplit(":", 1)[-1]
    if not s.isdigit():
        raise SendError(f"not a Discord id: {v!r}", permanent=True)
    return int(s)
