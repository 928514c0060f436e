"""A fresh `data/` gets a default agent wired to the terminal, owned by the local user,
so `make run` then `nanoclaw send hi` works with no set-up step."""

from __future__ import annotations

import os
import re

from nanoclaw import hostile
from nanoclaw.config import Settings
from nanoclaw.db.session import create as create_session_folder
from nanoclaw.db.store import Store
from nanoclaw.log import logger
from nanoclaw.util import local_user_id

CLI_LOCAL = "local"
GLOBAL_CLAUDE_MD = """# Shared memory

Facts and preferences every agent of this host should know. Agents can read this file
but not change it; edit it on the host.
"""
WELCOME_MARKER = ".nanoclaw-welcome"  # read and removed by the runner (agent_runner/memory.py)
GROUP_CLAUDE_MD = """# {name}

This folder is the agent's own workspace and memory. Notes written here persist across
conversations of this agent.
"""


def normalise_name(name: str) -> str:
    """An agent group's folder name from what someone called it."""
    n = re.sub(r"[^a-z0-9_-]+", "-", name.strip().lower()).strip("-")
    return n[:63] or "agent"


def ensure_group_folder(settings: Settings, folder: str, name: str,
                        memory: str | None = None) -> None:
    """`groups/global` (the host's, readable by every sandbox user) and the group's own
    folder, made for the sandbox user, with a first CLAUDE.md (`memory`, or the
    default) and, when new, the marker that has its first answer introduce it. The
    group folder is the agent's: written through `hostile.py`."""
    glob = settings.groups_dir / "global"
    glob.mkdir(parents=True, exist_ok=True)
    os.chmod(glob, 0o755)  # the sandbox user reads global/ through its read-only mount
    md = glob / "CLAUDE.md"
    if not md.exists():
        md.write_text(GLOBAL_CLAUDE_MD)
        os.chmod(md, 0o644)
    owner = settings.agent_owner()
    with hostile.Folder.open(settings.group_dir(folder), create=True, owner=owner) as g:
        new = g.stat("CLAUDE.md") is None
        if memory is not None or new:
            text = memory if memory is not None else GROUP_CLAUDE_MD.format(name=name)
            g.write("CLAUDE.md", text.encode(), owner=owner)
        if new:  # a new agent: its first answer introduces it (container/skills/welcome)
            g.write(WELCOME_MARKER, b"", owner=owner)


def migrate_sessions(settings: Settings) -> int:
    """Session folders of the older flat layout are moved into the current one at
    start (`db.session.create`), so the sweep sees their due rows."""
    n = 0
    owner = settings.agent_owner()
    if not settings.sessions_dir.is_dir():
        return 0
    for group in os.scandir(settings.sessions_dir):
        if not group.is_dir(follow_symlinks=False):
            continue
        for sess in os.scandir(group.path):
            db = os.path.join(sess.path, "db")
            if sess.is_dir(follow_symlinks=False) and not sess.name.endswith(".flat") \
                    and (os.path.islink(db) or not os.path.isdir(db)):
                create_session_folder(sess.path, owner)
                n += 1
    if n:
        logger.info("moved {} session folder(s) to the current layout", n)
    return n


def ensure_defaults(store: Store, settings: Settings) -> None:
    settings.sessions_dir.mkdir(parents=True, exist_ok=True)
    migrate_sessions(settings)
    if store.agent_groups():
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
