"""The platform-fake interface the channel contract suite (tests/test_channel_contract.py)
runs against: what a chat platform looks like from the outside, whatever its protocol.
`FakeTelegram`, `FakeDiscord` and `FakeSlack` implement it over their own test-side
helpers, so one test reads the same for every platform.

Chats, threads, users and message ids are the platform's own strings (`chat(n)` makes
a fresh chat for test `n`; `platform_id(chat)` is how the host names it). What the bot
sent is read back as `Sent`, as the platform would show it now (edits applied)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fakes.base import Call, Rule


@dataclass
class Sent:
    """A message the bot sent, as the platform shows it."""

    id: str
    text: str
    thread: str | None = None          # the thread it was posted in
    reply_to: str | None = None        # the message it answers, where the platform shows it
    buttons: list[tuple[str, str]] = field(default_factory=list)  # (label, click data)
    files: list[tuple[str, bytes]] = field(default_factory=list)  # (name, data)
    reactions: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


class PlatformFake:
    """What the contract suite needs of a platform fake (besides FakeServer's start,
    stop, inject, release and calls_of)."""

    channel = ""               # the channel type (its adapter's `name`)
    limit = 0                  # the longest text one message may carry
    typing = False             # whether the platform shows a typing indicator to bots
    reply_refs = False         # whether a reply visibly answers the user's message
    user = ""                  # a user's platform handle, as an action event names it
    threads = True             # users can post in threads of a chat
    edit_events = True         # the platform tells bots when a user edits a message
    bot_edits = True           # a bot can edit its own message (a card shows the choice)
    bot_reactions = True       # a bot can react to a message (not Teams: no such API)
    top_level = True           # users can post in a chat outside any thread (not GitHub)
    # whether a send whose answer was lost can be told from one that never landed (an
    # enforced nonce, a marker in the history); where not, it is sent again (at least once)
    idempotent_sends = False

    def clicker(self, chat: str) -> str:
        """Who a click in `chat` comes from, as the action event names them."""
        return self.user

    # ---- set-up -----------------------------------------------------------------------
    def host_env(self) -> dict[str, str]:
        """Settings that point a host's channel worker at this fake."""
        raise NotImplementedError

    def connected(self, host: Any) -> bool:
        """The host's worker is connected and will see what users say now."""
        raise NotImplementedError

    def chat(self, n: int) -> str:
        """A chat of its own for test `n` (a DM where the platform has them)."""
        raise NotImplementedError

    def platform_id(self, chat: str) -> str:
        return f"{self.channel}:{chat}"

    def new_thread(self, chat: str) -> str:
        """A thread in `chat` that users can post in."""
        raise NotImplementedError

    # ---- users ------------------------------------------------------------------------
    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        """A user posts in a chat (or a thread of it); the message id the host stores."""
        raise NotImplementedError

    def user_edits(self, chat: str, message_id: str, text: str) -> str:
        """The author edits their message; the id the host stores the edit under."""
        raise NotImplementedError

    def redeliver_last(self) -> None:
        """Send the last user event again, as an at-least-once platform may."""
        raise NotImplementedError

    def press(self, chat: str, card: Sent, index: int) -> None:
        """`self.user` presses button `index` of a card the bot sent."""
        raise NotImplementedError

    # ---- what the bot did -------------------------------------------------------------
    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        """Messages the bot sent to a chat (or only to one of its threads), in order."""
        raise NotImplementedError

    def send_calls(self, chat: str) -> list[Call]:
        """Every attempt to post a message to `chat`, whatever its outcome."""
        raise NotImplementedError

    def typing_calls(self, chat: str) -> list[Call]:
        raise NotImplementedError

    # ---- misbehaviour -----------------------------------------------------------------
    def rate_limit(self, chat: str, seconds: float) -> Rule:
        """The next post to `chat` answers 429 with retry-after `seconds`."""
        raise NotImplementedError

    def fail_sends(self, chat: str, count: int) -> Rule:
        """The next `count` posts to `chat` fail in a way worth retrying (5xx)."""
        raise NotImplementedError

    def refuse_sends(self, chat: str) -> Rule:
        """The next post to `chat` is refused for good (no access, no such chat)."""
        raise NotImplementedError

    def land_then_stall(self, chat: str) -> Rule:
        """The next post to `chat` is made (users see it), but its answer never comes."""
        raise NotImplementedError
