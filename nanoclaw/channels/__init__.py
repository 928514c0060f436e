"""Channel adapters, registered by name; the generic `channel:<name>` worker runs one."""

from __future__ import annotations

from nanoclaw.channels.base import (
    Channel,
    ChannelHost,
    OutboundMessage,
    Registry,
    RetryAfter,
    SendError,
    Unavailable,
)

REGISTRY = Registry()

# Adapters whose module (and client library) is imported only by the worker running it:
# name → ("module:Class", enabled(settings), supports_threads). The terminal's too: its
# module registering itself here imported this package back (a cycle, review §1.4).
LAZY = {
    "cli": ("nanoclaw.channels.cli:CliChannel", lambda s: s.cli_enabled, False),
    "telegram": ("nanoclaw.channels.telegram:TelegramChannel",
                 lambda s: bool(s.telegram_bot_token), True),
    "discord": ("nanoclaw.channels.discord_channel:DiscordChannel",
                lambda s: bool(s.discord_bot_token), True),
    "slack": ("nanoclaw.channels.slack:SlackChannel",
              lambda s: bool(s.slack_bot_token and s.slack_app_token), True),
    "whatsapp": ("nanoclaw.channels.whatsapp:WhatsAppChannel", lambda s: s.whatsapp_enabled, False),
    "web": ("nanoclaw.channels.web:WebChannel", lambda s: s.web_enabled, False),
    "whatsapp-cloud": ("nanoclaw.channels.whatsapp_cloud:WhatsAppCloudChannel",
                       lambda s: bool(s.whatsapp_access_token), False),
    "github": ("nanoclaw.channels.github:GitHubChannel", lambda s: bool(s.github_token), True),
    "linear": ("nanoclaw.channels.linear:LinearChannel", lambda s: bool(s.linear_api_key), True),
    "teams": ("nanoclaw.channels.teams:TeamsChannel",
              lambda s: bool(s.teams_app_id and s.teams_app_password), True),
    "googlechat": ("nanoclaw.channels.googlechat:GoogleChatChannel",
                   lambda s: bool(s.google_chat_service_account_file
                                  or s.google_chat_credentials), True),
    "webex": ("nanoclaw.channels.webex:WebexChannel", lambda s: bool(s.webex_bot_token), True),
    "email": ("nanoclaw.channels.email_channel:EmailChannel",
              lambda s: bool(s.email_imap_host and s.email_smtp_host) or bool(s.resend_api_key),
              True),
    "imessage": ("nanoclaw.channels.imessage:IMessageChannel",
                 lambda s: bool(s.bluebubbles_url and s.bluebubbles_password), False),
    "matrix": ("nanoclaw.channels.matrix:MatrixChannel",
               lambda s: bool(s.matrix_homeserver and (s.matrix_access_token or (
                   s.matrix_user_id and s.matrix_password))), True),
}


# The inbound side of the channels platforms call, served by the `webhooks` worker's door
# (`channels/webhook.py`) at /webhook/<name> while the channel is enabled.
WEBHOOKS: dict[str, str] = {
    "whatsapp-cloud": "nanoclaw.channels.whatsapp_cloud_webhook:CloudWebhook",
    "github": "nanoclaw.channels.github_webhook:GitHubWebhook",
    "linear": "nanoclaw.channels.linear_webhook:LinearWebhook",
    "teams": "nanoclaw.channels.teams_webhook:TeamsWebhook",
    "googlechat": "nanoclaw.channels.googlechat_webhook:ChatWebhook",
    "webex": "nanoclaw.channels.webex_webhook:WebexWebhook",
    "resend": "nanoclaw.channels.resend_webhook:ResendWebhook",  # the `email` channel's
    "imessage": "nanoclaw.channels.imessage_webhook:IMessageWebhook",
}
# What a channel's webhook needs besides the channel being on (github without a secret
# only polls: no door, no public URL).
WEBHOOK_NEEDS = {"github": lambda s: bool(s.github_webhook_secret),
                 "webex": lambda s: s.webex_mode == "webhook",
                 "resend": lambda s: bool(s.resend_api_key and s.resend_webhook_secret),
                 "imessage": lambda s: bool(s.bluebubbles_webhook_secret)}


def webhook_names(settings) -> list[str]:
    """The enabled channels whose platform calls us: the door serves these."""
    reg = load_builtin()
    return sorted(n for n in WEBHOOKS if (c := WEBHOOK_CHANNEL.get(n, n)) in reg.names()
                  and reg.get(c).enabled(settings) and WEBHOOK_NEEDS.get(n, bool)(settings))


# A webhook named for the platform that calls it, not for its channel: the door serves
# /webhook/resend, and what it stores is the `email` channel's (resend_webhook.py).
WEBHOOK_CHANNEL = {"resend": "email"}


def load_builtin() -> Registry:
    """Register the built-in adapters (once each; none is imported until it runs)."""
    for name, (target, enabled, threads) in LAZY.items():
        if name not in REGISTRY.names():
            REGISTRY.register_lazy(name, target, enabled, supports_threads=threads)

    return REGISTRY


__all__ = ["Channel", "ChannelHost", "OutboundMessage", "REGISTRY", "Registry", "RetryAfter",
           "SendError", "Unavailable", "WEBHOOKS", "load_builtin", "webhook_names"]
