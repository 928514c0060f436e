"""The runtime contract: start one agent for a session, tell whether it still runs,
stop it. Container ids are strings the runtime understands and can re-attach to after
the containers worker (or the whole host) restarts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from nanoclaw.runtime.warm import WarmSpec


@dataclass
class SpawnSpec:
    session_id: str
    agent_group_id: str
    session_dir: Path
    group_dir: Path
    global_dir: Path
    runner_dir: Path          # container/ (holds the agent_runner package)
    log_path: Path
    install_id: str
    env: dict[str, str] = field(default_factory=dict)
    image: str | None = None  # docker: this group's image (container_configs.image_tag)
    extra_mounts: list[Mount] = field(default_factory=list)  # already allow-listed
    command: list[str] | None = None  # instead of the runner (probes in tests)


@dataclass(frozen=True)
class Mount:
    """One bind mount of a sandbox: host `source` at `target` inside."""

    source: Path
    target: str
    writable: bool = False


class Runtime(Protocol):
    name: str

    @classmethod
    def available(cls) -> bool: ...

    def spawn(self, spec: SpawnSpec) -> str: ...

    def exit_code(self, container_id: str) -> int | None:
        """None while running; the exit code (or -signal) once it has ended."""

    def stop(self, container_id: str, grace: float = 1.0) -> None: ...

    def cleanup_orphans(self, install_id: str, keep: set[str]) -> int:
        """Stop this install's agents that no session claims; returns how many."""

    def prewarm(self, spec: WarmSpec) -> None:
        """Keep agents started ahead of need (a no-op where the runtime has no pool)."""

    def maintain(self) -> bool:
        """Called on every pass of the containers worker: refill the pool."""

    def close(self) -> None:
        """Stop what the runtime keeps besides agents (the pool)."""
