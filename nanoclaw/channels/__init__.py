"""Channel adapters, registered by name; the generic `channel:<name>` worker runs one."""

from __future__ import annotations

from nanoclaw.channels.base import (Channel, ChannelHost, OutboundMessage, Registry,
                                    RetryAfter, SendError, Unavailable)

REGISTRY = Registry()


def load_builtin() -> Registry:
    """Import the built-in adapters (each registers itself once)."""
    from nanoclaw.channels import cli  # noqa: F401

    return REGISTRY


__all__ = ["Channel", "ChannelHost", "OutboundMessage", "REGISTRY", "Registry", "RetryAfter",
           "SendError", "Unavailable", "load_builtin"]
