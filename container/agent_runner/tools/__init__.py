"""The agent's tools, one implementation for both providers.

The `anthropic` provider offers every tool below in its own loop; the `claude` provider
serves the non-local ones as the in-process MCP server `nanoclaw` (the CLI has its own
shell and file tools). `Toolbox.run` checks the input against the tool's schema, runs
it, and turns any refusal into a clear tool error, never an exception.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from agent_runner.batch import Batch
from agent_runner.config import Config
from agent_runner.db import Inbound, Outbound
from agent_runner.providers import ToolOutcome
from agent_runner.tools import admin, local, messaging, ncl, tasks
from agent_runner.tools.base import Tool, ToolContext, ToolError, validate

log = logging.getLogger("agent_runner")

MCP_PREFIX = "mcp__nanoclaw__"
INSTRUCTIONS = os.path.join(os.path.dirname(__file__), "instructions.md")


class Registry:
    """Tool name → Tool; duplicate names are refused."""

    def __init__(self, tools: list[Tool]) -> None:
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ValueError(f"tool {tool.name!r} registered twice")
            self.tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self.tools.get(name[len(MCP_PREFIX):] if name.startswith(MCP_PREFIX) else name)


# The installed tools, in the order the model sees them.
REGISTRY = Registry(messaging.TOOLS + tasks.TOOLS + admin.TOOLS + ncl.TOOLS
                    + local.TOOLS)


class Toolbox:
    def __init__(self, config: Config, inbound: Inbound, outbound: Outbound,
                 should_stop: Callable[[], bool] = lambda: False,
                 heartbeat: Callable[[], None] = lambda: None,
                 registry: Registry = REGISTRY) -> None:
        self.registry = registry
        self.hidden = hidden(config)
        self.ctx = ToolContext(config, inbound, outbound, should_stop, heartbeat)

    # -- the batch being answered
    def begin(self, batch: Batch) -> None:
        self.ctx.batch, self.ctx.sent = batch, 0

    def extend(self, batch: Batch) -> None:
        self.ctx.batch = batch

    @property
    def sent(self) -> int:
        """Messages tools put in front of a person during this batch."""
        return self.ctx.sent

    # -- what providers call
    def tools(self, local: bool = True) -> list[Tool]:
        return [t for t in self.registry.tools.values()
                if (local or not t.local) and t.name not in self.hidden]

    def specs(self, local: bool = True) -> list[dict[str, Any]]:
        return [t.spec() for t in self.tools(local)]

    def timeout_ms(self, name: str, args: dict[str, Any]) -> int | None:
        tool = self.registry.get(name)
        if tool is None or tool.timeout_s is None:
            return None
        try:
            seconds = tool.timeout_s(args)
        except (TypeError, ValueError, OverflowError):  # the model's raw arguments
            return None
        return None if seconds is None else int(seconds) * 1000

    def run(self, name: str, args: Any) -> ToolOutcome:
        tool = self.registry.get(name)
        if tool is None or tool.name in self.hidden:
            return ToolOutcome(f"Error: there is no tool called {name!r}", True)
        try:
            text = tool.run(self.ctx, validate(tool.schema, args))
        except ToolError as exc:
            log.info("tool refused name=%s error=%s", tool.name, exc)
            return ToolOutcome(f"Error: {exc}", True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("tool failed name=%s error=%s: %s", tool.name, type(exc).__name__, exc)
            return ToolOutcome(f"Error: {type(exc).__name__}: {exc}", True)
        log.info("tool done name=%s", tool.name)
        return ToolOutcome(text)


def hidden(config: Config) -> set[str]:
    """Tools this agent is not offered: `ncl` when its group's cli_scope is disabled."""
    return {"ncl"} if config.cli_scope == "disabled" else set()


def instructions(config: Config | None = None) -> str:
    """The tools' instructions; a bullet about a hidden tool is left out."""
    with open(INSTRUCTIONS, encoding="utf-8") as fh:
        text = fh.read().strip()
    gone = hidden(config) if config is not None else set()
    if not gone:
        return text
    out, skipping = [], False
    for line in text.splitlines():
        if line.startswith("- "):
            skipping = any(line.startswith(f"- `{name}`") for name in gone)
        elif not line.startswith("  "):
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)


__all__ = ["MCP_PREFIX", "REGISTRY", "Tool", "ToolError", "Toolbox", "instructions"]
