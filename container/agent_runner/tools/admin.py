"""Self-modification tools: create_agent, install_packages, add_mcp_server.

All three are requests to the host, which checks who asked, may ask an admin for
approval, and reports the outcome back to the agent. The checks here are the same ones
the host makes (names, package-name patterns, at most 20 packages), so a bad request is
refused at once with a reason instead of after a round trip.
"""

from __future__ import annotations

import re
from typing import Any

from agent_runner.tools.base import Tool, ToolContext, ToolError, obj, string

MAX_PACKAGES = 20
APT_NAME = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,62}\Z")  # the host's patterns exactly
NPM_NAME = re.compile(r"^(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]{0,213}\Z")
SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")


def normalise_name(name: str) -> str:
    """The host's rule: lowercase, runs of other characters become '-'."""
    return re.sub(r"[^a-z0-9_-]+", "-", name.strip().lower()).strip("-")[:63]


def _create_agent(ctx: ToolContext, args: dict[str, Any]) -> str:
    name = normalise_name(args["name"])
    if not name:
        raise ToolError(f"{args['name']!r} has no letters or digits to make a name from")
    if ctx.batch.destination(name) is not None:
        raise ToolError(f"you already have a destination named {name!r}")
    rid = ctx.system_action("create_agent", {"name": args["name"].strip(),
                                             "instructions": args.get("instructions")})
    return (f"Creation of agent {name!r} requested (request {rid}). When the host confirms,"
            f" reach it with to=\"{name}\".")


def _install_packages(ctx: ToolContext, args: dict[str, Any]) -> str:
    apt, npm = list(args.get("apt") or []), list(args.get("npm") or [])
    if not apt and not npm:
        raise ToolError("name at least one package in `apt` or `npm`")
    if len(apt) + len(npm) > MAX_PACKAGES:
        raise ToolError(f"at most {MAX_PACKAGES} packages per request")
    for kind, names, pattern in (("apt", apt, APT_NAME), ("npm", npm, NPM_NAME)):
        for n in names:
            if not pattern.match(n):
                raise ToolError(f"{n!r} is not a valid {kind} package name")
    rid = ctx.system_action("install_packages", {"apt": apt, "npm": npm,
                                                 "reason": args.get("reason") or ""})
    return (f"Installation requested (request {rid}). An admin may need to approve it; the"
            " agent is restarted with the packages once the image is rebuilt.")


def _add_mcp_server(ctx: ToolContext, args: dict[str, Any]) -> str:
    name = args["name"]
    if not SERVER_NAME.match(name) or name == "nanoclaw":
        raise ToolError("`name` must be letters, digits, '-' or '_' (at most 64) and not"
                        " 'nanoclaw'")
    if name in ctx.config.mcp_servers:
        raise ToolError(f"an MCP server named {name!r} is already configured")
    env = args.get("env") or {}
    for key in env:
        if not ENV_NAME.match(key):
            raise ToolError(f"`env`: {key!r} is not a valid variable name")
    rid = ctx.system_action("add_mcp_server", {"name": name, "command": args["command"],
                                               "args": list(args.get("args") or []),
                                               "env": dict(env)})
    return (f"MCP server {name!r} requested (request {rid}); the agent restarts with it once"
            " the host has added it.")


TOOLS = [
    Tool("create_agent", "Create a new agent (its own workspace and memory) that you can"
         " message as a destination; it knows you as 'parent'.",
         obj({"name": string("the new agent's name", minLength=1, maxLength=64),
              "instructions": string("its standing instructions (its CLAUDE.md)")},
             ("name",)), _create_agent),
    Tool("install_packages", f"Ask for system (apt) or npm packages to be installed in your"
         f" sandbox (at most {MAX_PACKAGES}); needs approval, then a restart.",
         obj({"apt": {"type": "array", "items": {"type": "string"}},
              "npm": {"type": "array", "items": {"type": "string"}},
              "reason": string("why you need them (shown to the approver)")}),
         _install_packages),
    Tool("add_mcp_server", "Ask for an MCP server to be added to your tools (started with"
         " `command` and `args`); the agent restarts with it.",
         obj({"name": string(minLength=1), "command": string(minLength=1),
              "args": {"type": "array", "items": {"type": "string"}},
              "env": {"type": "object", "additionalProperties": {"type": "string"}}},
             ("name", "command")), _add_mcp_server),
]
