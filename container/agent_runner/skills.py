"""Skills: folders `<runner_root>/skills/<name>/` (in a sandbox `/app/skills`, read-only).

A skill holds `SKILL.md` in Claude Code's format (frontmatter `name` and `description`,
then what the model reads when the skill fits the task) and, optionally, a short
`instructions.md` that `memory.py` composes into every conversation. The group's
`skills` setting (container.json: `"all"` or a list of names) picks the enabled ones; a
name that is unsafe or names no skill is a warning (once), never a crash.

`sync()` runs at every start. The Claude Code CLI finds user skills in
`$CLAUDE_CONFIG_DIR/skills/` (here `<session>/.claude/skills/`), so each enabled skill
with a `SKILL.md` gets a symlink there to its folder, and the links made for skills no
longer enabled (or gone) are removed. Only our own links are ever touched: a link is
ours when it points at this runner's folder for that skill or is recorded in
`$CLAUDE_CONFIG_DIR/.nanoclaw-skills.json` (a runtime switch moves the runner root); a
folder, file or foreign link the agent made there stays, and is never followed. The
`anthropic` provider has no CLI: `listing()` tells it where each SKILL.md is instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from typing import Mapping

from agent_runner.config import Config

log = logging.getLogger("agent_runner")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
MANIFEST = ".nanoclaw-skills.json"
_warned: set[tuple[str, str]] = set()
_listings: dict[tuple, str] = {}


@dataclass(frozen=True)
class Skill:
    name: str
    path: str          # the skill's folder under the runner root
    description: str   # from SKILL.md's frontmatter ("" without one)

    @property
    def skill_md(self) -> str:
        return os.path.join(self.path, "SKILL.md")

    @property
    def for_cli(self) -> bool:
        return os.path.isfile(self.skill_md)


def _warn_once(name: str, why: str) -> None:
    if (name, why) not in _warned:
        _warned.add((name, why))
        log.warning("skill %r ignored: %s", name, why)


def frontmatter(text: str) -> dict[str, str]:
    """The `key: value` lines between the leading `---` lines (no YAML library here)."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out: dict[str, str] = {}
    for line in lines[1:]:
        if line.strip() == "---":
            return out
        key, sep, value = line.partition(":")
        if sep and key.strip() and not line[:1].isspace():
            out[key.strip()] = value.strip().strip("'\"")
    return {}


def describe(path: str) -> str:
    try:
        with open(os.path.join(path, "SKILL.md"), encoding="utf-8") as fh:
            return frontmatter(fh.read(16_384)).get("description", "")
    except (OSError, UnicodeDecodeError):
        return ""


def root(config: Config) -> str:
    return os.path.join(config.runner_root, "skills")


def available(config: Config) -> dict[str, Skill]:
    """Every skill folder of the runner, by name."""
    base = root(config)
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return {}
    return {n: Skill(n, os.path.join(base, n), describe(os.path.join(base, n)))
            for n in names if NAME.match(n) and os.path.isdir(os.path.join(base, n))}


def enabled(config: Config) -> list[Skill]:
    """The skills the group's `skills` setting turns on, in name order."""
    found = available(config)
    if config.skills == "all":
        return list(found.values())
    wanted: set[str] = set()
    for name in config.skills:
        if not NAME.match(name):
            _warn_once(name, "not a skill name (letters, digits, - and _ only)")
        elif name not in found:
            _warn_once(name, f"no such skill in {root(config)}")
        else:
            wanted.add(name)
    return [found[n] for n in sorted(wanted)]


def config_dir(config: Config, env: Mapping[str, str] = os.environ) -> str:
    """Where the Claude Code CLI keeps its settings (the claude provider sets the same)."""
    return env.get("CLAUDE_CONFIG_DIR") or os.path.join(config.session_dir, ".claude")


def _manifest(home: str) -> dict[str, str]:
    try:
        with open(os.path.join(home, MANIFEST), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, str)}


def _save_manifest(home: str, links: dict[str, str]) -> None:
    path = os.path.join(home, MANIFEST)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(links, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def sync(config: Config, env: Mapping[str, str] = os.environ) -> list[str]:
    """Make `$CLAUDE_CONFIG_DIR/skills/` hold a link per enabled skill and no stale link
    of ours. Returns the names linked; problems are logged, never raised."""
    want = {s.name: s.path for s in enabled(config) if s.for_cli}
    home = config_dir(config, env)
    folder = os.path.join(home, "skills")
    try:
        return _sync(home, folder, want, root(config))
    except OSError as exc:
        log.warning("skills not synced folder=%s error=%s", folder, exc)
        return []


def _sync(home: str, folder: str, want: dict[str, str], ours_root: str) -> list[str]:
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        if not want:
            return []
        os.makedirs(folder)
        st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):  # e.g. a link the agent made: never followed
        log.warning("skills not synced: %s is not a folder", folder)
        return []
    recorded = _manifest(home)
    links: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.islink(path):
            continue  # a folder or file of the agent's own
        target = os.readlink(path)
        if target != recorded.get(name) and target != os.path.join(ours_root, name):
            continue  # somebody else's link
        if want.get(name) == target:
            links[name] = target
        else:
            os.unlink(path)
            log.info("skill link removed name=%s", name)
    for name, target in want.items():
        if name in links:
            continue
        path = os.path.join(folder, name)
        if os.path.lexists(path):
            _warn_once(name, f"{path} exists and is not ours; left alone")
            continue
        os.symlink(target, path)
        links[name] = target
    if links != recorded:
        _save_manifest(home, links)
    return sorted(links)


def listing(config: Config) -> str:
    """For a provider without the CLI: the enabled skills and where to read them. Read
    once per process (it is part of every turn's system prompt, which must not change)."""
    key = (config.runner_root,
           config.skills if isinstance(config.skills, str) else tuple(config.skills))
    if key not in _listings:
        lines = [f"- {s.name}: {s.description or '(no description)'} ({s.skill_md})"
                 for s in enabled(config) if s.for_cli]
        _listings[key] = ("## Skills\n\nWhen a task matches one of these, first read its"
                          " SKILL.md with `read` and follow it:\n" + "\n".join(lines)
                          ) if lines else ""
    return _listings[key]
