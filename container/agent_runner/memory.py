"""Group memory: what the agent is told before any message (reference §7 step 5).

At every start the runner composes `<group>/.claude/CLAUDE.md` from the shared base
prompt (`container/CLAUDE.md`), the host-wide memory (`groups/global/CLAUDE.md`,
read-only), each enabled skill's `instructions.md`, the nanoclaw tool instructions and
each extra MCP server's `instructions`, and links the enabled skills where the CLI finds
them (`skills.sync`). The Claude Code CLI loads that file, the group's own `CLAUDE.md`
(the agent's memory, which it edits) and the skills by itself; the `anthropic` provider
gets the same text in its system prompt from `memory()`, with the list of skills.

The `welcome` skill's instructions are composed only while the group folder holds the
marker the host leaves in a new agent's folder (`WELCOME_MARKER`): the first answer that
goes out removes it (`welcomed`), so an agent introduces itself once, in its first
conversation, and agents made before the marker existed never do.
"""

from __future__ import annotations

import logging
import os

from agent_runner import skills, tools
from agent_runner.config import Config

log = logging.getLogger("agent_runner")

WELCOME_MARKER = ".nanoclaw-welcome"  # the host's: agents/groups.py ensure_group_folder
HEADER = ("<!-- Composed by the agent runner at every start; edits here are lost. The agent's"
          " own memory is the CLAUDE.md of its working directory. -->")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _skills(config: Config) -> list[tuple[str, str]]:
    found = []
    for skill in skills.enabled(config):
        if skill.name == "welcome" and not welcome_due(config):
            continue
        text = _read(os.path.join(skill.path, "instructions.md"))
        if text:
            found.append((skill.name, text))
    return found


def welcome_due(config: Config) -> bool:
    return os.path.lexists(os.path.join(config.group_dir, WELCOME_MARKER))


def welcomed(config: Config) -> bool:
    """After an answer went out: the agent has introduced itself (True when this removed
    the marker, so the composed memory is to be written again without the welcome)."""
    try:
        os.unlink(os.path.join(config.group_dir, WELCOME_MARKER))
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:  # the agent's own folder: it may have made the name a folder
        log.warning("cannot remove the welcome marker error=%s", exc)
        return False


def compose_text(config: Config) -> str:
    parts = [HEADER]
    base = _read(os.path.join(config.runner_root, "CLAUDE.md"))
    if base:
        parts.append(base)
    shared = _read(os.path.join(config.global_dir, "CLAUDE.md"))
    if shared:
        parts.append("## Shared memory (read-only; the same for every agent)\n\n" + shared)
    for name, text in _skills(config):
        parts.append(f"## Skill: {name}\n\n{text}")
    parts.append(tools.instructions(config))
    for name, spec in config.mcp_servers.items():
        if isinstance(spec.get("instructions"), str) and spec["instructions"].strip():
            parts.append(f"## MCP server: {name}\n\n{spec['instructions'].strip()}")
    return "\n\n".join(parts) + "\n"


def compose(config: Config) -> str:
    """Link the skills and write the composed file (only when it changed); returns its
    text."""
    skills.sync(config)
    text = compose_text(config)
    path = os.path.join(config.group_dir, ".claude", "CLAUDE.md")
    if _read(path) + "\n" == text:
        return text
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write composed memory path=%s error=%s", path, exc)
    return text


def memory(config: Config, composed: str) -> str:
    """Everything the CLI would load: the composed file, the skills, then the agent's own
    memory."""
    own = _read(os.path.join(config.group_dir, "CLAUDE.md"))
    listing = skills.listing(config)
    return (composed.strip() + (f"\n\n{listing}" if listing else "")
            + (f"\n\n## Your memory (CLAUDE.md)\n\n{own}" if own else ""))
