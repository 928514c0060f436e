"""Container runtimes behind one interface, chosen by name (`NANOCLAW_RUNTIME`)."""

from __future__ import annotations

from nanoclaw.config import Settings
from nanoclaw.log import logger
from nanoclaw.runtime.base import Mount, Runtime, SpawnSpec
from nanoclaw.runtime.bwrap import BwrapRuntime
from nanoclaw.runtime.docker import DockerRuntime
from nanoclaw.runtime.process import ProcessRuntime

RUNTIMES: dict[str, type] = {"docker": DockerRuntime, "bwrap": BwrapRuntime,
                             "process": ProcessRuntime}
AUTO_ORDER = ("docker", "bwrap")  # what `auto` tries, best first; else `process`
WHY_NOT = {
    "docker": "no Docker engine answers (DOCKER_HOST) or the agent image {image} is missing"
              " (build it: nanoclaw image build)",
    "bwrap": "bubblewrap is not installed or cannot create a sandbox here"
             " (apt-get install bubblewrap; user namespaces must be allowed)",
}


def select(name: str, settings: Settings | None = None) -> Runtime:
    """`auto` takes the best runtime that works here; an explicit name must work."""
    if settings is None:
        from nanoclaw import config

        settings = config.get()
    if name == "auto":
        for candidate in AUTO_ORDER:
            if RUNTIMES[candidate].available(settings):
                logger.info("runtime {} selected", candidate)
                return RUNTIMES[candidate](settings)
        logger.warning("RUNTIME process: agents run as plain host processes WITHOUT isolation"
                       " (no docker image or bubblewrap available); for development only")
        return ProcessRuntime(settings)
    cls = RUNTIMES.get(name)
    if cls is None:
        raise ValueError(f"runtime {name!r} is not available in this build")
    if name == "process":
        logger.warning("RUNTIME process: agents run WITHOUT isolation; for development only")
        return cls(settings)
    if not cls.available(settings):
        raise ValueError(f"runtime {name!r} cannot run here: "
                         + WHY_NOT[name].format(image=settings.image))
    return cls(settings)


__all__ = ["AUTO_ORDER", "Mount", "Runtime", "SpawnSpec", "select", "RUNTIMES"]
