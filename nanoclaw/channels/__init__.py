"""Channel adapters, registered by name; the generic `channel:<name>` worker runs one."""

from __future__ import annotations

from nanoclaw.channels.base import (Channel, ChannelHost, OutboundMessage, Registry,
                                    RetryAfter, SendError, Unavailable)

REGISTRY = Registry()

# Adapters whose module (and client library) is imported only by the worker running it:
# name → ("module:Class", enabled(settings), supports_threads).
LAZY = {
    "telegram": ("nanoclaw.channels.telegram:TelegramChannel",
                 lambda s: bool(s.telegram_bot_token), True),
    "discord": ("nanoclaw.channels.discord_channel:DiscordChannel",
                lambda s: bool(s.discord_bot_token), True),
    "slack": ("nanoclaw.channels.slack:SlackChannel",
              lambda s: bool(s.slack_bot_token and s.slack_app_token), True),
    "web": ("nanoclaw.channels.web:WebChannel", lambda s: s.web_enabled, False),
}


def load_builtin() -> Registry:
    """Import the built-in adapters (each registers itself once)."""
    from nanoclaw.channels import cli  # noqa: F401
    for name, (target, enabled, threads) in LAZY.items():
        if name not in REGISTRY.names():
            REGISTRY.register_lazy(name, target, enabled, supports_threads=threads)

    return REGISTRY


__all__ = ["Channel", "ChannelHost", "OutboundMessage", "REGISTRY", "Registry", "RetryAfter",
           "SendError", "Unavailable", "load_builtin"]
