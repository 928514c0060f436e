"""The `claude` provider (claude-agent-sdk driving the bundled Claude Code CLI): not built yet.

Registered now so a group configured for it gets a clear, visible error on every batch
instead of a crash loop or silence.
"""

from __future__ import annotations

from agent_runner.providers import ProviderUnavailable


class ClaudeProvider:
    name = "claude"

    def __init__(self, *_: object, **__: object) -> None:
        raise ProviderUnavailable(
            "the 'claude' provider is not available yet; set \"provider\": \"anthropic\"",
            classification="config")
