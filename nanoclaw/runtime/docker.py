"""The `docker` runtime: one container per session, through the `docker` Python package.

A container is named `nanoclaw-<install>-<session>`, so the engine itself refuses a
second one for a session (a spawn that meets a running namesake adopts it). It is
labelled with the install id (at start-up, orphans of this install are stopped before
any agent starts, other installs are left alone), runs the image's unprivileged user
with a read-only root, no capabilities, memory/pid/CPU limits and, by default, no
network at all: the broker is reached through its unix socket (`sandbox_entry` relays
127.0.0.1 inside to it). `NANOCLAW_CONTAINER_NETWORK=host` shares the host's network
instead — needed for an agent that must reach the internet, at the price of seeing
every port the host listens on.

A container outlives its host (a `kill -9` of the orchestrator): the next containers
worker re-attaches to the one its session names, and stops any other of this install.

Containers are not `--rm`: when one ends its output is written to
`logs/containers/<session>/<spawn>.log` (path kept in a label, so a restarted worker can
still do it), and only then is it removed. The container id is all a later process
needs to re-attach.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from nanoclaw.config import Settings
from nanoclaw.log import logger
from nanoclaw.runtime import sandbox
from nanoclaw.runtime.base import SpawnSpec
from nanoclaw.runtime.process import _starttime

PATH = "/opt/venv/bin:/opt/agent-browser/bin:/usr/local/bin:/usr/bin:/bin"  # the image's
ENDED = ("exited", "dead", "created", "removing")
RECHECK_S = 10.0  # ask the engine at least this often even while the pid looks alive


def client(timeout: float = 30.0) -> Any:
    import docker

    return docker.from_env(timeout=timeout, max_pool_size=64)


def image_exists(image: str, timeout: float = 3.0) -> bool:
    """True when an engine answers and holds `image` (False on any failure)."""
    try:
        c = client(timeout)
    except Exception as e:  # no package or no engine
        logger.debug("docker not usable: {}", e)
        return False
    try:
        c.images.get(image)
        return True
    except Exception as e:  # no image, or the engine went away
        logger.debug("docker image {} not usable: {}", image, e)
        return False
    finally:
        c.close()


class DockerRuntime:
    name = "docker"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = client()
        self.followers: dict[str, threading.Thread] = {}
        self.pids: dict[str, tuple[int, str | None, float]] = {}  # id → pid, start, asked at
        self.engine_error: str | None = None

    @classmethod
    def available(cls, settings: Settings) -> bool:
        return image_exists(settings.image)

    # ---- spawn ------------------------------------------------------------------------
    def spawn(self, spec: SpawnSpec) -> str:
        import docker.errors
        from docker.types import LogConfig, Mount

        s = self.settings
        uid, gid = sandbox.user(s.agent_uid)
        sandbox.prepare(spec, uid, gid)
        via_socket = s.container_network == "none"
        etc = sandbox.etc_dir(s.data_dir, uid, gid)
        mounts = [Mount(m.target, str(m.source), type="bind", read_only=not m.writable)
                  for m in sandbox.layout(spec, s.broker_socket.parent if via_socket else None,
                                          etc)]
        name = sandbox.name(spec.install_id, spec.session_id)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = dict(
            name=name,
            labels={sandbox.LABEL: spec.install_id, "nanoclaw.session": spec.session_id,
                    "nanoclaw.log": str(spec.log_path)},
            environment=sandbox.environment(spec, PATH, via_socket, s.egress_enabled),
            user=f"{uid}:{gid}", working_dir=sandbox.GROUP, mounts=mounts,
            network_mode=s.container_network, read_only=True,
            tmpfs={"/tmp": "rw,nosuid,nodev,size=256m"}, cap_drop=["ALL"],
            security_opt=["no-new-privileges"], init=True, detach=True,
            log_config=LogConfig(type="json-file", config={"max-size": "20m"}),
        )
        if s.container_memory:
            kwargs.update(mem_limit=s.container_memory, memswap_limit=s.container_memory)
        if s.container_pids:
            kwargs["pids_limit"] = s.container_pids
        if s.container_cpus:
            kwargs["nano_cpus"] = int(s.container_cpus * 1e9)
        image = spec.image or s.image
        command = spec.command or ["python", "-m", "sandbox_entry"]
        for attempt in (1, 2):
            try:
                c = self.client.containers.create(image, command, **kwargs)
                break
            except docker.errors.ImageNotFound:
                raise RuntimeError(f"agent image {image} not found; build it with"
                                   " `nanoclaw image build` (or `make image`)") from None
            except docker.errors.APIError as e:
                if e.status_code != 409 or attempt == 2:
                    raise
                old = self.client.containers.get(name)  # a namesake: ours, for this session
                if old.status in ("running", "restarting", "paused"):
                    logger.warning("session {}: its container {} is already running; adopted",
                                   spec.session_id, old.short_id)
                    return old.id
                self._finish(old)
        try:
            c.start()
        except Exception:
            c.remove(force=True)
            raise
        t = threading.Thread(target=self._follow, args=(c, spec.log_path), daemon=True,
                             name=f"logs-{c.short_id}")
        t.start()
        self.followers[c.id] = t
        return c.id

    def _follow(self, c: Any, path: Path) -> None:
        """Copy the container's output to its log file as it comes (live `nanoclaw` view)."""
        try:
            with open(path, "ab") as f:
                for chunk in c.logs(stream=True, follow=True):
                    f.write(chunk)
                    f.flush()
        except Exception as e:
            logger.debug("log follower of {} ended: {}", c.short_id, e)

    # ---- watch and stop ---------------------------------------------------------------
    def exit_code(self, container_id: str) -> int | None:
        """Cheap while running: the container's init pid in /proc (a local engine) stands
        in for the engine, which is asked only when that pid goes or every RECHECK_S."""
        import docker.errors

        known = self.pids.get(container_id)
        if known and time.monotonic() - known[2] < RECHECK_S and known[1] is not None \
                and _starttime(known[0]) == known[1]:
            return None
        try:
            c = self.client.containers.get(container_id)
        except docker.errors.NotFound:
            return -1
        except docker.errors.DockerException as e:  # engine away: cannot tell; say so once
            if self.engine_error != str(e):
                self.engine_error = str(e)
                logger.error("docker engine not answering: {}", e)
            return None
        self.engine_error = None
        if c.status not in ENDED:
            pid = int(c.attrs.get("State", {}).get("Pid") or 0)
            self.pids[container_id] = (pid, _starttime(pid) if pid else None, time.monotonic())
            return None
        self.pids.pop(container_id, None)
        code = int(c.attrs.get("State", {}).get("ExitCode", -1)) if c.status != "created" else -1
        self._finish(c)
        return code

    def stop(self, container_id: str, grace: float = 1.0) -> None:
        import docker.errors

        self.pids.pop(container_id, None)
        try:
            c = self.client.containers.get(container_id)
            if c.status not in ENDED:
                c.stop(timeout=max(1, round(grace)))  # SIGTERM, then SIGKILL
                c.reload()
        except docker.errors.NotFound:
            return
        self._finish(c)

    def _finish(self, c: Any) -> None:
        """Keep the container's output, then remove it."""
        import docker.errors

        follower = self.followers.pop(c.id, None)
        if follower is not None:
            follower.join(timeout=5)
        path = c.labels.get("nanoclaw.log")
        if path and (follower is None or follower.is_alive()):
            try:  # no complete live copy: write the whole output now
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_bytes(c.logs(stdout=True, stderr=True))
            except (OSError, docker.errors.APIError) as e:
                logger.warning("could not save the output of container {}: {}", c.short_id, e)
        try:
            c.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: removal already in progress
                raise

    def cleanup_orphans(self, install_id: str, keep: set[str]) -> int:
        """Stop and remove this install's containers not in `keep` (one whose start its
        host did not live to record, or left when it ended), all at once; returns once
        none of them runs, and raises when one still does, so the caller starts
        nothing. Listed with the low-level call: `containers.list` inspects each one
        after listing and fails on one removed in between."""
        from concurrent.futures import ThreadPoolExecutor

        label = {"label": f"{sandbox.LABEL}={install_id}"}
        ids = [c["Id"] for c in self.client.api.containers(all=True, filters=label)
               if c["Id"] not in keep]
        if ids:
            with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
                list(pool.map(lambda cid: self.stop(cid, grace=1.0), ids))
        left = [c["Id"][:12] for c in self.client.api.containers(filters=label)
                if c["Id"] not in keep]
        if left:
            raise RuntimeError(f"orphaned containers of this install still run: {left}")
        return len(ids)

    # no warm pool: a container's mounts are fixed when it is created
    def prewarm(self, spec: Any) -> None:
        pass

    def maintain(self) -> bool:
        return False

    def close(self) -> None:
        pass
