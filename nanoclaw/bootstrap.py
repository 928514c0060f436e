"""A fresh `data/` gets a default agent wired to the terminal, owned by the local user,
so `make run` then `nanoclaw send hi` works with no set-up step."""

from __future__ import annotations

import getpass

from nanoclaw.config import Settings
from nanoclaw.log import logger
from nanoclaw.store import Store

CLI_LOCAL = "local"
GLOBAL_CLAUDE_MD = """# Shared memory

Facts and preferences every agent of this host should know. Agents can read this file
but not change it; edit it on the host.
"""
GROUP_CLAUDE_MD = """# {name}

This folder is the agent's own workspace and memory. Notes written here persist across
conversations of this agent.
"""


def local_user_id() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "owner"
    return f"cli:{name}"


def ensure_group_folder(settings: Settings, folder: str, name: str) -> None:
    settings.groups_dir.joinpath("global").mkdir(parents=True, exist_ok=True)
    glob = settings.groups_dir / "global" / "CLAUDE.md"
    if not glob.exists():
        glob.write_text(GLOBAL_CLAUDE_MD)
    d = settings.group_dir(folder)
    d.mkdir(parents=True, exist_ok=True)
    md = d / "CLAUDE.md"
    if not md.exists():
        md.write_text(GROUP_CLAUDE_MD.format(name=name))


def ensure_defaults(store: Store, settings: Settings) -> None:
    settings.sessions_dir.mkdir(parents=True, exist_ok=True)
    if store.q1("SELECT id FROM agent_groups LIMIT 1"):
        return
    ag = store.create_agent_group("main", "main", settings.provider, settings.model,
                                  settings.assistant_name)
    ensure_group_folder(settings, "main", settings.assistant_name)
    owner = local_user_id()
    store.ensure_user(owner, "cli", owner.split(":", 1)[1])
    store.grant_role(owner, "owner")
    mg = store.create_messaging_group("cli", CLI_LOCAL, "terminal", is_group=False)
    store.wire(mg, ag, destination="terminal")
    logger.info("fresh data: created agent group 'main' wired to the terminal, owner {}", owner)
