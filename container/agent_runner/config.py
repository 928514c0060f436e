"""Where everything is and who the agent is: environment plus the session's container.json.

All paths come from the environment so one runner works in docker, bwrap and the plain
process runtime (container/README.md): `NANOCLAW_SESSION_DIR` is the agent's own folder
(home, inbox, outbox), `NANOCLAW_DB_DIR` the host's read-only folder with `inbound.db`,
`outbound.db` and `container.json` (the same folder when unset). The host rewrites
`container.json` at each spawn; a missing or broken file falls back to defaults with a
warning rather than a crash, so the user still gets an answer (or a visible error)
instead of silence.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

log = logging.getLogger("agent_runner")

DEFAULT_PROVIDER = "claude"
DEFAULT_MODEL = "claude-sonnet-4-5"
CLI_SCOPES = ("disabled", "group", "global")
EFFORTS = ("low", "medium", "high", "xhigh", "max")
# container/ (in docker /app): the shared base prompt CLAUDE.md and skills/ live here
RUNNER_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How long a model call waits for an unreachable broker when container.json has no
# `broker_wait_s` (the host writes the bound for its broker's restart schedule,
# nanoclaw/lifecycle/containers.py `broker_wait_s`): the longest step of the slowest
# breaker schedule (nanoclaw/breaker.py SCHEDULE, 900 s) + 30 s for the broker to start.
# tests/test_broker_outage.py checks both sides.
DEFAULT_BROKER_WAIT_S = 930.0
# How long a model call may go silent (no byte of its answer) before it is given up and
# retried (container.json `model_stall_s`, the host's NANOCLAW_MODEL_STALL_TIMEOUT).
DEFAULT_MODEL_STALL_S = 120.0
# How long the `claude` provider keeps its CLI after a query (container.json
# `claude_idle_s`, the host's NANOCLAW_CLAUDE_IDLE_S; 0 = keep it): then it exits, and the
# next query starts it again with `--resume`.
DEFAULT_CLAUDE_IDLE_S = 300.0
SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


@dataclass(frozen=True)
class Config:
    session_dir: str
    group_dir: str
    global_dir: str
    tz: str
    provider: str = DEFAULT_PROVIDER
    model: str = DEFAULT_MODEL
    fallback_model: str | None = None  # while `model` stays overloaded (429/529/5xx)
    # the broker's upstream for this group's calls (<broker>/up/NAME) and its API
    # ("anthropic" or "openai"); its fallback's (another upstream, maybe the other API)
    upstream: str | None = None
    upstream_api: str | None = None
    fallback_upstream: str | None = None
    fallback_upstream_api: str | None = None
    opencode_bin: str | None = None  # the pinned OpenCode binary (as this sandbox sees it)
    assistant_name: str = "Andy"
    agent_group_id: str = ""
    max_messages_per_prompt: int = 10
    effort: str | None = None
    mcp_servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skills: list[str] | str = "all"
    cli_scope: str = "group"  # `disabled`: the agent is not offered `ncl`
    runner_root: str = RUNNER_ROOT
    db_dir: str = ""  # where the two databases are (the session folder when empty)
    # how long a model call waits for an unreachable broker (agent_runner/broker.py);
    # the host writes it from its breaker's longest step
    broker_wait_s: float = DEFAULT_BROKER_WAIT_S
    model_stall_s: float = DEFAULT_MODEL_STALL_S
    claude_idle_s: float = DEFAULT_CLAUDE_IDLE_S

    @property
    def inbound(self) -> str:
        return os.path.join(self.db_dir or self.session_dir, "inbound.db")

    @property
    def outbound(self) -> str:
        return os.path.join(self.db_dir or self.session_dir, "outbound.db")

    @property
    def heartbeat(self) -> str:
        return os.path.join(self.session_dir, ".heartbeat")

    @property
    def extra_dirs(self) -> list[str]:
        """Allow-listed extra mounts (`<session>/extra/<name>`), offered to the agent."""
        root = os.path.join(self.session_dir, "extra")
        try:
            return sorted(os.path.join(root, n) for n in os.listdir(root)
                          if os.path.isdir(os.path.join(root, n)))
        except OSError:
            return []

    @property
    def provider_dir(self) -> str:
        """Provider-private state (conversation files); never read by the host."""
        return os.path.join(self.session_dir, ".provider")


def _read_container_json(db_dir: str) -> dict[str, Any]:
    path = os.path.join(db_dir, "container.json")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        log.warning("container.json missing path=%s; using defaults", path)
        return {}
    except (OSError, ValueError) as exc:
        log.error("container.json unreadable path=%s error=%s; using defaults", path, exc)
        return {}
    if not isinstance(data, dict):
        log.error("container.json is not an object path=%s; using defaults", path)
        return {}
    return data


def load(env: Mapping[str, str] = os.environ) -> Config:
    session_dir = env.get("NANOCLAW_SESSION_DIR") or "/workspace"
    group_dir = env.get("NANOCLAW_GROUP_DIR") or "/workspace/agent"
    db_dir = env.get("NANOCLAW_DB_DIR") or session_dir
    data = _read_container_json(db_dir)
    try:
        limit = max(1, int(data.get("max_messages_per_prompt") or 10))
    except (TypeError, ValueError):
        limit = 10
    try:
        broker_wait = float(data.get("broker_wait_s") or DEFAULT_BROKER_WAIT_S)
        broker_wait = min(max(broker_wait, 1.0), 86400.0)
    except (TypeError, ValueError):
        broker_wait = DEFAULT_BROKER_WAIT_S
    try:
        stall = float(data.get("model_stall_s") or DEFAULT_MODEL_STALL_S)
        stall = min(max(stall, 0.5), 3600.0)
    except (TypeError, ValueError):
        stall = DEFAULT_MODEL_STALL_S
    try:
        idle = data.get("claude_idle_s")
        idle = DEFAULT_CLAUDE_IDLE_S if idle is None else min(max(float(idle), 0.0), 86400.0)
    except (TypeError, ValueError):
        idle = DEFAULT_CLAUDE_IDLE_S
    return Config(
        session_dir=session_dir,
        group_dir=group_dir,
        global_dir=env.get("NANOCLAW_GLOBAL_DIR") or "/workspace/global",
        tz=env.get("TZ") or "UTC",
        provider=str(data.get("provider") or DEFAULT_PROVIDER),
        model=str(data.get("model") or DEFAULT_MODEL),
        fallback_model=str(data["fallback_model"]) if data.get("fallback_model") else None,
        upstream=_name(data.get("upstream")),
        upstream_api=_api(data.get("upstream_api")),
        fallback_upstream=_name(data.get("fallback_upstream")),
        fallback_upstream_api=_api(data.get("fallback_upstream_api")),
        opencode_bin=str(data["opencode_bin"]) if data.get("opencode_bin") else None,
        assistant_name=str(data.get("assistant_name") or "Andy"),
        agent_group_id=str(data.get("agent_group_id") or ""),
        max_messages_per_prompt=limit,
        effort=data.get("effort") if data.get("effort") in EFFORTS else None,
        mcp_servers=_mcp_servers(data.get("mcp_servers")),
        skills=_skills(data.get("skills")),
        cli_scope=data.get("cli_scope") if data.get("cli_scope") in CLI_SCOPES else "group",
        runner_root=env.get("NANOCLAW_RUNNER_ROOT") or RUNNER_ROOT,
        db_dir=db_dir,
        broker_wait_s=broker_wait,
        model_stall_s=stall,
        claude_idle_s=idle,
    )


UPSTREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")


def _name(value: Any) -> str | None:
    """An upstream's name (it becomes part of a URL path): anything else is dropped."""
    return value if isinstance(value, str) and UPSTREAM_NAME.match(value) else None


def _api(value: Any) -> str | None:
    return value if value in ("anthropic", "openai") else None


def _mcp_servers(value: Any) -> dict[str, dict[str, Any]]:
    """Extra MCP servers `{name: {command, args?, env?, instructions?}}`; bad entries are
    dropped with a warning (a typo must not stop the agent from answering)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict):
        return {}
    servers = {}
    for name, spec in value.items():
        if (SERVER_NAME.match(str(name)) and name != "nanoclaw" and isinstance(spec, dict)
                and isinstance(spec.get("command"), str) and spec["command"].strip()):
            servers[str(name)] = spec
        else:
            log.warning("mcp server ignored name=%s: needs a safe name and a command", name)
    return servers


def _skills(value: Any) -> list[str] | str:
    """`"all"` (the default) or a list of skill names; `"none"` is the empty list.
    `skills.py` checks the names."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if value == "none":
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return "all"
