"""Self-modification: an agent asks for packages in its image (`install_packages`) or
an MCP server in its sandbox (`add_mcp_server`). Nothing changes until an admin approves
the card: the request is checked here (names, sizes, a card that shows it whole), queued
as an approval, and only the approval handlers registered below (`approvals.on_approve`,
at import) write the configuration and restart the agent. `actions.py` imports this
module, so whoever loads the action registry gets both halves registered.
"""

from __future__ import annotations

import json
import re
from typing import Any

from nanoclaw.config import Settings
from nanoclaw.db.session import SessionInbound, of
from nanoclaw.db.store import Store
from nanoclaw.delivery.card_text import card_problem, code, shown, shown_line
from nanoclaw.delivery.registry import ActionError, Ctx, action
from nanoclaw.errors import Refused

# fullmatch, never `^…$`: `$` also matches before a trailing newline ("x\n").
APT_NAME = re.compile(r"[a-z0-9][a-z0-9.+-]{0,62}")
NPM_NAME = re.compile(r"(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]{0,213}")
MCP_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_PACKAGES = 20


def _list_arg(ctx: Ctx, key: str, what: str = "package names") -> list[str]:
    v = ctx.content.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ActionError(f"{key} must be a list of {what}")
    return v


@action("install_packages")
def _install_packages(ctx: Ctx) -> str | None:
    apt, npm = _list_arg(ctx, "apt"), _list_arg(ctx, "npm")
    if not apt and not npm:
        raise ActionError("name at least one package")
    if len(apt) + len(npm) > MAX_PACKAGES:
        raise ActionError(f"at most {MAX_PACKAGES} packages per request")
    bad = [p for p in apt if not APT_NAME.fullmatch(p)] + [
        p for p in npm if not NPM_NAME.fullmatch(p)]
    if bad:
        raise ActionError(f"invalid package names: {', '.join(bad)}")
    reason = str(ctx.content.get("reason") or "")[:500]
    return _ask(ctx, "install_packages", {"apt": apt, "npm": npm, "reason": reason},
                "Install packages",
                "The agent asks to install these packages:\n"
                + code(f"apt: {shown_line(apt) or '-'}\nnpm: {shown_line(npm) or '-'}")
                + f"\nIts reason: {shown(reason) if reason else '(none given)'}")


@action("add_mcp_server")
def _add_mcp_server(ctx: Ctx) -> str | None:
    name = ctx.str_arg("name") or ""
    if not MCP_NAME.fullmatch(name):
        raise ActionError("name must be 1-64 letters, digits, '-' or '_'")
    if name == "nanoclaw":
        raise ActionError("name 'nanoclaw' is the host's own server; choose another")
    command = ctx.str_arg("command") or ""
    args = _list_arg(ctx, "args", "strings")
    env = ctx.content.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ActionError("env must map names to strings")
    bad = [k for k in env if not ENV_NAME.fullmatch(k)]
    if bad:
        raise ActionError(f"env has invalid variable names: {shown_line(bad)}")
    env_line = " ".join(f"{k}={shown(v)}" for k, v in env.items())
    return _ask(ctx, "add_mcp_server", {"name": name, "command": command, "args": args,
                                        "env": env}, "Add an MCP server",
                f"The agent asks to add MCP server {name}, which runs in its sandbox as:\n"
                + code(f"command: {shown(command)}\nargs: {shown_line(args) or '(none)'}"
                       f"\nenv: {env_line or '(none)'}"))


def _ask(ctx: Ctx, action_name: str, payload: dict[str, Any], title: str,
         question: str) -> str:
    """Queue the approval card, unless it could not be shown whole (then nothing is asked)."""
    from nanoclaw.approvals import requests as approvals

    problem = card_problem(title, question)
    if problem:
        raise ActionError(f"{action_name} refused: {problem}; nothing was asked")
    payload["requestId"] = ctx.row["id"]
    try:
        aid = approvals.request(ctx.store, ctx.settings, ctx.session, action_name, payload,
                                title, question)
    except Refused as e:
        raise ActionError(str(e)) from None
    return f"Asked an admin to approve {action_name} (request {aid}); you will be told."


def _respawn_with_note(store: Store, settings: Settings, session_id: str, note: str) -> None:
    """Stop the agent and leave a note only a fresh agent's first poll reads."""
    s = store.session(session_id)
    if s is None:
        return
    SessionInbound(of(settings, s)).note(note, on_wake=True)
    store.request_container(session_id, "kill", "configuration changed")
    store.request_container(session_id, "wake", "configuration changed")


def _approved_packages(store: Store, settings: Settings, row: dict[str, Any],
                       payload: dict[str, Any]) -> str:
    ag = row["agent_group_id"]
    cfg = store.container_config(ag)
    apt = sorted(set(json.loads(cfg.get("packages_apt") or "[]")) | set(payload["apt"]))
    npm = sorted(set(json.loads(cfg.get("packages_npm") or "[]")) | set(payload["npm"]))
    if settings.runtime == "process":
        raise RuntimeError("the process runtime cannot install packages (no image to rebuild)")
    store.set_packages(ag, apt, npm)
    _respawn_with_note(store, settings, row["session_id"],
                       "Packages were approved and the image is being rebuilt:"
                       f" {', '.join(payload['apt'] + payload['npm'])}. Verify they work and"
                       " report to the user.")
    return "Packages approved; your container restarts with them."


def _approved_mcp(store: Store, settings: Settings, row: dict[str, Any],
                  payload: dict[str, Any]) -> str:
    ag = row["agent_group_id"]
    servers = json.loads(store.container_config(ag).get("mcp_servers") or "{}")
    servers[payload["name"]] = {"command": payload["command"], "args": payload["args"],
                                "env": payload["env"]}
    store.set_mcp_servers(ag, servers)
    _respawn_with_note(store, settings, row["session_id"],
                       f"MCP server {payload['name']!r} was added. Check that its tools work"
                       " and tell the user.")
    return f"MCP server {payload['name']!r} approved; your container restarts with it."


def _register_approval_handlers() -> None:
    from nanoclaw.approvals import requests as approvals

    approvals.on_approve("install_packages", _approved_packages)
    approvals.on_approve("add_mcp_server", _approved_mcp)


_register_approval_handlers()
