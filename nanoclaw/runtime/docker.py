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

Warm pool (root only, `NANOCLAW_WARM_POOL`): a cold start is a container create and
start (~0.2 s) and, inside, the interpreter, runner and SDK imports (~0.6 s and more).
A spare container is created ahead with exactly a cold container's restrictions and
shared mounts, `/workspace` bound (propagation `rslave`) from an empty shared staging
folder, and stdin open: `sandbox_entry` imports everything and waits for its session
(`warm.py`). A wake takes it: renames it to the session's name (the engine still
refuses a second container per session), mounts the session's tree there as bwrap does
(`mountns.py`: the kernel copies it into the container), checks through the
container's `/proc/<pid>/root` that it arrived, and sends the session's environment
down its stdin. Labels are fixed at creation, so a spare carries `nanoclaw.warm` (its
staging folder) instead of the session's labels; after the hand-over that folder
holds `session.json` (session and log path), which a restarted worker reads when the
container ends. A spare is of this install: the next worker's orphan cleanup stops it
like any agent no session names. Whatever goes wrong with a spare, the wake starts cold.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from nanoclaw.config import Settings
from nanoclaw.log import logger
from nanoclaw.runtime import mountns, sandbox, warm
from nanoclaw.runtime.base import SpawnSpec
from nanoclaw.runtime.process import _starttime

PATH = "/opt/venv/bin:/opt/agent-browser/bin:/usr/local/bin:/usr/bin:/bin"  # the image's
ENDED = ("exited", "dead", "created", "removing")
RECHECK_S = 10.0  # ask the engine at least this often even while the pid looks alive
WARM_LABEL = "nanoclaw.warm"  # a spare's: its staging folder (session.json once handed)
SPARE_START_S = 60.0  # the longest a wake waits for a spare still being started


def spare_prefix(install_id: str) -> str:
    """How a waiting spare's container name starts; the hand-over renames it to its
    session's (`sandbox.name`)."""
    return f"nanoclaw-{install_id}-warm-"


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


class NotPropagated(RuntimeError):
    """A mount on the host did not reach the container (an engine in another mount
    namespace, a rootless one): no spare of this engine can be handed a session."""


class _Spare:
    """A spare container as the warm pool sees a process (`poll`, `returncode`). It is
    created and started on a thread of its own: a refill never holds up the containers
    worker's pass for the engine (~0.2 s, far more on a busy machine)."""

    stdin = None

    def __init__(self, rt: DockerRuntime, make: Any, log_path: Path):
        self.rt, self.log_path = rt, log_path
        self.returncode: int | None = None
        self.container: Any = None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, args=(make,), daemon=True,
                                       name="warm-docker")
        self.thread.start()

    def _run(self, make: Any) -> None:
        try:
            self.container = make()
        except Exception as e:
            self.error = str(e)

    def ready(self, timeout: float = SPARE_START_S) -> Any:
        """The started container, once it is; raises when it could not be started."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("the spare container is still being started")
        if self.container is None:
            raise RuntimeError(f"the spare container did not start: {self.error}")
        return self.container

    def poll(self) -> int | None:
        if self.returncode is not None or self.thread.is_alive():
            return self.returncode
        if self.container is None:
            self._ended(-1, f"could not start: {self.error}".encode())
            return self.returncode
        code, c = self.rt._probe(self.container.id)
        if code is not None:
            out = b""
            if c is not None:
                try:
                    out = c.logs(stdout=True, stderr=True)
                except Exception as e:  # the engine went away: say so instead
                    out = str(e).encode()
            self._ended(code, out)
        return self.returncode

    def _ended(self, code: int, out: bytes) -> None:
        try:  # for the pool's warning (the end of the spare's output)
            self.log_path.write_bytes(out)
        except OSError:
            pass
        self.returncode = code


class DockerRuntime:
    name = "docker"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = client()
        self.followers: dict[str, threading.Thread] = {}
        self.pids: dict[str, tuple[int, str | None, float]] = {}  # id → pid, start, asked at
        self.engine_error: str | None = None
        self.warm_size = settings.warm_pool
        self.warm_spec: warm.WarmSpec | None = None
        self.pool: warm.WarmPool | None = None
        self.stage_root = (settings.data_dir / "run" / "docker-warm").resolve()

    @classmethod
    def available(cls, settings: Settings) -> bool:
        return image_exists(settings.image)

    # ---- spawn ------------------------------------------------------------------------
    def _kwargs(self, name: str, labels: dict[str, str], env: dict[str, str],
                mounts: list[Any], working_dir: str) -> dict[str, Any]:
        """A container's settings: one place, so a spare has exactly a cold one's
        restrictions (user, read-only root, no capabilities, limits, network)."""
        from docker.types import LogConfig

        s = self.settings
        uid, gid = sandbox.user(s.agent_uid)
        kwargs: dict[str, Any] = dict(
            name=name, labels=labels,
            environment=env, user=f"{uid}:{gid}", working_dir=working_dir, mounts=mounts,
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
        return kwargs

    def spawn(self, spec: SpawnSpec) -> str:
        """A spare of the warm pool, when one is ready (and the spawn is the runner in
        the install's image), else a cold container."""
        if spec.command is None and self.pool is not None and \
                (spec.image or self.settings.image) == self.settings.image:
            w = self.pool.take()
            if w is not None:
                try:
                    cid = self._use_warm(w, spec)
                    if cid is not None:
                        return cid
                    self.pool.ready.insert(0, w)  # untouched: a namesake exists (below)
                except Exception as e:
                    logger.warning("session {}: warm container not usable ({}); starting"
                                   " cold", spec.session_id, e)
                    self._discard_warm(w)
                    if isinstance(e, NotPropagated):  # every spare would fail alike
                        logger.error("warm pool off for docker: {}", e)
                        self.pool.close()
                        self.pool = None
        return self._spawn_cold(spec)

    def _spawn_cold(self, spec: SpawnSpec) -> str:
        import docker.errors
        from docker.types import Mount as DMount

        s = self.settings
        uid, gid = sandbox.user(s.agent_uid)
        sandbox.prepare(spec, uid, gid)
        via_socket = s.container_network == "none"
        etc = sandbox.etc_dir(s.data_dir, uid, gid)
        mounts = [DMount(m.target, str(m.source), type="bind", read_only=not m.writable)
                  for m in sandbox.layout(spec, s.broker_socket.parent if via_socket else None,
                                          etc)]
        name = sandbox.name(spec.install_id, spec.session_id)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = self._kwargs(
            name, {sandbox.LABEL: spec.install_id, "nanoclaw.session": spec.session_id,
                   "nanoclaw.log": str(spec.log_path)},
            sandbox.environment(spec, PATH, via_socket, s.egress_enabled), mounts, sandbox.GROUP)
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
        self._start_following(c, spec.log_path)
        return c.id

    def _start_following(self, c: Any, path: Path) -> None:
        t = threading.Thread(target=self._follow, args=(c, path), daemon=True,
                             name=f"logs-{c.short_id}")
        t.start()
        self.followers[c.id] = t

    def _follow(self, c: Any, path: Path) -> None:
        """Copy the container's output to its log file as it comes (live `nanoclaw` view)."""
        try:
            with open(path, "ab") as f:
                for chunk in c.logs(stream=True, follow=True):
                    f.write(chunk)
                    f.flush()
        except Exception as e:
            logger.debug("log follower of {} ended: {}", c.short_id, e)

    # ---- the warm pool: containers waiting for a session (mountns.py) -----------------
    def prewarm(self, spec: warm.WarmSpec) -> None:
        """Start keeping spares (after orphan cleanup: a previous worker's spares are
        gone, and the containers left are the sessions' it re-attached to)."""
        if not warm.can_hand_over(self.warm_size, "docker", "container"):
            return
        root = self.stage_root
        try:
            # left by a worker that died mid-handover (the root's own bind is not news)
            stale = [p for p in mountns.mounted_under(root) if p != str(root)]
            mountns.detach_all(root)
            if stale:
                logger.warning("warm pool: detached {} stale staging mount(s)", len(stale))
            root.mkdir(parents=True, exist_ok=True)
            root.chmod(0o700)
            live = self._live_stages(spec.install_id)
            for d in root.iterdir():  # a live container's stays: its /workspace sits on it
                if d not in live:
                    self._remove_stage(d)
            # a private mount of its own: nothing staged below it shows anywhere else
            mountns.bind_self(str(root), mountns.MS_PRIVATE)
        except Exception as e:  # e.g. root without the power to mount here, engine away
            logger.warning("warm pool off for docker: cannot stage mounts in {}: {}", root, e)
            return
        for old in (spec.logs_dir / "containers" / ".warm").glob("*.log"):
            old.unlink(missing_ok=True)  # a previous worker's spares, gone with it
        self.warm_spec = spec
        self.pool = warm.WarmPool(self.warm_size, self._start_warm, self._discard_warm)
        self.pool.maintain()

    def maintain(self) -> bool:
        return self.pool.maintain() if self.pool is not None else False

    def close(self) -> None:
        """Remove the spares (containers outlive the worker: left, the next worker's
        orphan cleanup would); the staging root goes once no container sits on it."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.warm_spec is not None:
            try:
                if not any(self.stage_root.iterdir()):
                    mountns.detach_all(self.stage_root)
                    self.stage_root.rmdir()
            except OSError as e:
                logger.debug("warm pool: staging root {} left: {}", self.stage_root, e)

    def _live_stages(self, install_id: str) -> set[Path]:
        label = {"label": f"{sandbox.LABEL}={install_id}"}
        return {Path(c["Labels"][WARM_LABEL])
                for c in self.client.api.containers(all=True, filters=label)
                if (c.get("Labels") or {}).get(WARM_LABEL)}

    def _stage_of(self, c: Any) -> Path | None:
        """A spare's staging folder, from its label (only ever one directly below ours)."""
        p = (c.labels or {}).get(WARM_LABEL)
        if not p or Path(p).parent != self.stage_root:
            return None
        return Path(p)

    def _remove_stage(self, stage: Path) -> None:
        """Detach whatever is mounted there first: removing files through a mount left
        by a worker that died mid-handover would remove the session's own."""
        mountns.detach_all(stage)
        if mountns.mounted_under(stage):
            logger.error("warm pool: {} still has mounts; left in place", stage)
            return
        shutil.rmtree(stage, ignore_errors=True)

    def _start_warm(self) -> warm.Warm:
        ws = self.warm_spec
        assert ws is not None
        stage = self.stage_root / secrets.token_hex(6)
        stage.mkdir(mode=0o700)
        s = stage / "s"
        s.mkdir(mode=0o755)
        name = spare_prefix(ws.install_id) + stage.name
        log = warm.warm_log(ws.logs_dir)
        w = warm.Warm(None, name, log, stage)  # type: ignore[arg-type]

        def make() -> Any:
            c = None
            try:
                mountns.bind_self(str(s), mountns.MS_SHARED)  # what is bound here shows inside
                w.stage_fd = os.open(s, os.O_PATH | os.O_DIRECTORY)
                c = self._create_spare(ws, name, stage)
                c.start()
                c.reload()  # its pid, for the hand-over's check
                return c
            except BaseException:
                if c is not None:
                    c.remove(force=True)
                warm.unstage(w)
                self._remove_stage(stage)
                raise

        w.proc = _Spare(self, make, log)  # type: ignore[assignment]
        return w

    def _create_spare(self, ws: warm.WarmSpec, name: str, stage: Path) -> Any:
        from docker.types import Mount as DMount

        st = self.settings
        uid, gid = sandbox.user(st.agent_uid)
        via_socket = st.container_network == "none"
        broker = st.broker_socket.parent if via_socket else None
        etc = sandbox.etc_dir(st.data_dir, uid, gid)
        mounts = [DMount(m.target, str(m.source), type="bind", read_only=not m.writable)
                  for m in sandbox.shared_mounts(ws.runner_dir, broker, etc)]
        # the only difference in mounts: the session's tree arrives here at the hand-over
        mounts.insert(0, DMount(sandbox.SESSION, str(stage / "s"), type="bind",
                                propagation="rslave"))
        env = {**sandbox.base_environment(PATH, via_socket, st.egress_enabled),
               "NANOCLAW_WARM": "1", "NANOCLAW_WARM_PRELOAD": ",".join(ws.preload)}
        kwargs = self._kwargs(name, {sandbox.LABEL: ws.install_id, WARM_LABEL: str(stage)},
                              env, mounts, "/")
        # stdin open, and closed by the engine once the hand-over's attach ends (the
        # `docker` package sets StdinOnce only for a container created not detached;
        # that changes nothing else of how it runs)
        kwargs.update(stdin_open=True, detach=False)
        return self.client.containers.create(st.image, ["python", "-m", "sandbox_entry"],
                                             **kwargs)

    def _use_warm(self, w: warm.Warm, spec: SpawnSpec) -> str | None:
        """Hand the session to a spare; None (spare untouched) when the session already
        has a container, which the cold path then adopts or replaces."""
        import docker.errors

        spare: _Spare = w.proc  # type: ignore[assignment]
        c = spare.ready()
        uid, gid = sandbox.user(self.settings.agent_uid)
        sandbox.prepare(spec, uid, gid)
        name = sandbox.name(spec.install_id, spec.session_id)
        try:
            c.rename(name)  # first: the engine's one container per session holds from here
        except docker.errors.APIError as e:
            if e.status_code == 409:
                return None
            raise
        via_socket = self.settings.container_network == "none"
        env = sandbox.environment(spec, PATH, via_socket)
        env.pop("NANOCLAW_BROKER_SOCKET", None)  # the container relays it since it started
        assert w.stage is not None
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        (w.stage / "session.json").write_text(json.dumps(
            {"session": spec.session_id, "log": str(spec.log_path)}))
        warm.mount_session(w, sandbox.session_mounts(spec), sandbox.SESSION)
        self._check_arrived(c, spec)
        self._send(c, (json.dumps({"env": env, "cwd": sandbox.GROUP}) + "\n").encode())
        self._start_following(c, spec.log_path)
        w.log_path.unlink(missing_ok=True)
        return c.id

    @staticmethod
    def _check_arrived(c: Any, spec: SpawnSpec) -> None:
        """The session's folders show at their places inside (seen through the
        container's root in /proc): else propagation does not reach this engine's
        containers (an engine in another mount namespace) and the pool is no use."""
        pid = int(c.attrs.get("State", {}).get("Pid") or 0)
        for host, inside in ((spec.session_dir / "work", sandbox.SESSION),
                             (spec.group_dir, sandbox.GROUP)):
            a, b = os.stat(host), os.stat(f"/proc/{pid}/root{inside}")
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                raise NotPropagated(f"the session's {inside} did not reach the container"
                                    " (mount propagation: is the engine in another mount"
                                    " namespace?)")

    def _send(self, c: Any, line: bytes) -> None:
        """Write the hand-over line to the container's stdin, then close it."""
        sock = c.attach_socket(params={"stdin": 1, "stream": 1})
        raw = getattr(sock, "_sock", sock)  # the socket under the package's SocketIO
        try:
            raw.sendall(line)
            raw.shutdown(socket.SHUT_WR)
        finally:
            sock.close()

    def _discard_warm(self, w: warm.Warm) -> None:
        spare: _Spare = w.proc  # type: ignore[assignment]
        try:
            c = spare.ready(timeout=30.0)
        except RuntimeError:
            c = None  # never started (its own clean-up ran), or still starting: see below
        if c is not None:
            import docker.errors

            try:
                c.remove(force=True)  # nothing of it to keep: its output was its preload
            except docker.errors.NotFound:
                pass  # gone already (e.g. a newer worker's orphan cleanup)
            except Exception as e:
                logger.warning("warm pool: could not remove spare {}: {}", c.short_id, e)
        elif spare.thread.is_alive():
            return  # the next worker's orphan cleanup stops it
        warm.unstage(w)
        if w.stage is not None:
            self._remove_stage(w.stage)
        w.log_path.unlink(missing_ok=True)

    # ---- watch and stop ---------------------------------------------------------------
    def exit_code(self, container_id: str) -> int | None:
        """Cheap while running: the container's init pid in /proc (a local engine) stands
        in for the engine, which is asked only when that pid goes or every RECHECK_S."""
        code, c = self._probe(container_id)
        if c is not None:
            self._finish(c)
        return code

    def _probe(self, container_id: str) -> tuple[int | None, Any]:
        """(None, None) while running (or the engine does not answer); once it ended, its
        exit code and the container to finish (None when the engine no longer has it)."""
        import docker.errors

        known = self.pids.get(container_id)
        if known and time.monotonic() - known[2] < RECHECK_S and known[1] is not None \
                and _starttime(known[0]) == known[1]:
            return None, None
        try:
            c = self.client.containers.get(container_id)
        except docker.errors.NotFound:
            return -1, None
        except docker.errors.DockerException as e:  # engine away: cannot tell; say so once
            if self.engine_error != str(e):
                self.engine_error = str(e)
                logger.error("docker engine not answering: {}", e)
            return None, None
        self.engine_error = None
        if c.status not in ENDED:
            pid = int(c.attrs.get("State", {}).get("Pid") or 0)
            self.pids[container_id] = (pid, _starttime(pid) if pid else None, time.monotonic())
            return None, None
        self.pids.pop(container_id, None)
        code = int(c.attrs.get("State", {}).get("ExitCode", -1)) if c.status != "created" else -1
        return code, c

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
        """Keep the container's output, then remove it (and a former spare's staging
        folder, which its `/workspace` sat on)."""
        import docker.errors

        follower = self.followers.pop(c.id, None)
        if follower is not None:
            follower.join(timeout=5)
        stage = self._stage_of(c)
        path = c.labels.get("nanoclaw.log")
        if stage is not None and not path:
            try:  # a former spare: its session's log path, written at the hand-over
                path = json.loads((stage / "session.json").read_text()).get("log")
            except (OSError, ValueError):
                path = None  # a spare never handed a session: its output is its preload
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
        if stage is not None:
            self._remove_stage(stage)

    def cleanup_orphans(self, install_id: str, keep: set[str]) -> int:
        """Stop and remove this install's containers not in `keep` (one whose start its
        host did not live to record, a previous worker's spares, one left when it
        ended), all at once; returns once none of them runs, and raises when one still
        does, so the caller starts nothing. Listed with the low-level call:
        `containers.list` inspects each one after listing and fails on one removed in
        between."""
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
