"""Container runtimes behind one interface, chosen by name (`NANOCLAW_RUNTIME`)."""

from __future__ import annotations

from nanoclaw.log import logger
from nanoclaw.runtime.base import Runtime, SpawnSpec
from nanoclaw.runtime.process import ProcessRuntime

RUNTIMES: dict[str, type] = {"process": ProcessRuntime}


def select(name: str) -> Runtime:
    """`auto` takes the best runtime that works here; an explicit name must exist."""
    if name == "auto":
        for candidate in ("docker", "bwrap"):
            cls = RUNTIMES.get(candidate)
            if cls is not None and cls.available():
                return cls()
        logger.warning("RUNTIME process: agents run as plain host processes WITHOUT isolation"
                       " (no docker image or bubblewrap available); for development only")
        return ProcessRuntime()
    cls = RUNTIMES.get(name)
    if cls is None:
        raise ValueError(f"runtime {name!r} is not available in this build")
    if name == "process":
        logger.warning("RUNTIME process: agents run WITHOUT isolation; for development only")
    return cls()


__all__ = ["Runtime", "SpawnSpec", "select", "RUNTIMES"]
