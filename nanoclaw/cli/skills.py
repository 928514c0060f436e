"""The agent skills on offer: the folders of container/skills, each with the description
its SKILL.md gives, and a group's stored choice of them (`container_configs.skills`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nanoclaw.util import RUNNER_DIR

# what the runner mounts at /app/skills; the same name rule as container/agent_runner/skills.py
SKILLS_DIR = RUNNER_DIR / "skills"
SKILL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


def available() -> dict[str, str]:
    """Every skill folder in container/skills, with its SKILL.md description."""
    try:
        names = sorted(p.name for p in SKILLS_DIR.iterdir()
                       if SKILL_NAME.match(p.name) and p.is_dir())
    except OSError:
        return {}
    return {n: description(SKILLS_DIR / n / "SKILL.md") for n in names}


def description(path: Path) -> str:
    """The `description:` line of a SKILL.md's front matter, or ''."""
    try:
        lines = path.read_text(encoding="utf-8")[:16_384].splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    if not lines or lines[0].strip() != "---":
        return ""
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("description:"):
            return line.partition(":")[2].strip().strip("'\"")
    return ""


def enabled(raw: Any) -> list[str] | None:
    """A group's stored `skills` as a list of names; None means all."""
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return None
    if value == "none":
        return []
    return [str(v) for v in value] if isinstance(value, list) else None
