"""The `bwrap` runtime: each agent in a bubblewrap sandbox. No daemon, no image.

The sandbox root is an empty read-only tmpfs holding only what the runner needs: the
host's `/usr` (and the merged-usr links), a few harmless `/etc` files, the Python
installation running NanoClaw (read-only, at the same path), and the mount layout every
runtime shares (`sandbox.py`). New pid, ipc, uts and — with the default network `none` —
net namespaces; the broker is then reached through its unix socket. As root, bwrap sets
the sandbox up and `setpriv` drops to `agent_uid` with no capabilities before the runner
starts; as any other user bwrap runs unprivileged in a user namespace.

`--die-with-parent`: a sandbox dies with the containers worker that started it, and so
with the whole host (the workers die with the orchestrator). After a restart of that
worker, re-attaching simply finds the agent gone; its claimed rows are reset and retried
like after any crash. (A worker killed within bwrap's first milliseconds can leave a
sandbox behind; it carries the install's mark, so the next worker's orphan cleanup stops
it, and waits for it to be gone, before any agent starts.) Ids are `pid:<pid>:<starttime>`
of the bwrap process, so everything else is the process runtime's, the orphan cleanup
too: the outer bwrap is the marked process whose parent is not (bwrap's own pid-1 child
carries the same mark and goes with it).

Warm pool (root only): spares are started with `/workspace` bound from an empty shared
staging folder; a wake hands one the session by mounting its tree there
(`mountns.py`) and sending its environment down the spare's stdin (`warm.py`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanoclaw.config import Settings
from nanoclaw.log import logger
from nanoclaw.runtime import agent_browser, mountns, procfs, sandbox, warm
from nanoclaw.runtime.base import Mount, SpawnSpec
from nanoclaw.runtime.process import MARK, ProcessRuntime, _ours, _parse, _starttime
from nanoclaw.runtime.procfs import children as _children

ETC = ("nsswitch.conf", "hosts", "localtime", "timezone", "ld.so.cache",
       "ld.so.conf", "ld.so.conf.d", "ssl", "ca-certificates", "ca-certificates.conf",
       "alternatives", "mime.types", "os-release", "debian_version")
SETPRIV = "/usr/bin/setpriv"


def _python_roots() -> list[str]:
    """The Python installation outside /usr: the venv and the interpreter it points at."""
    roots: list[str] = []
    for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}:
        p = os.path.realpath(p)
        if p != "/usr" and not p.startswith("/usr/") and p not in roots:
            roots.append(p)
    return sorted(roots)


def _parents(targets: list[str]) -> list[str]:
    """`--dir` with mode 0755 for every folder bwrap would otherwise make 0700 on the
    way to a mount point (the sandbox user could not pass through), except inside mounts."""
    out: list[str] = []
    made: set[str] = set()
    for t in targets:
        parts = t.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if d in made or any(d == m or d.startswith(m + "/") for m in targets if m != t):
                continue
            made.add(d)
            out += ["--perms", "0755", "--dir", d]
    return out


class BwrapRuntime(ProcessRuntime):
    name = "bwrap"
    forks = False  # a child of one zygote would share its pid and mount namespaces
    _works: bool | None = None

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.settings = settings
        self.stage_root: Path | None = None
        self.stages: dict[str, Path] = {}  # container id → staging folder of a warm start

    @classmethod
    def available(cls, settings: Settings | None = None) -> bool:
        """bwrap is installed and can make a sandbox here (user namespaces allowed)."""
        if cls._works is None:
            exe = shutil.which("bwrap")
            try:
                cls._works = bool(exe) and subprocess.run(
                    [exe, "--unshare-pid", "--die-with-parent", "--ro-bind", "/", "/",  # type: ignore[list-item]
                     "--proc", "/proc", "--dev", "/dev", "true"],
                    capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                cls._works = False
        return cls._works

    def argv(self, spec: SpawnSpec, via_socket: bool, uid: int, gid: int) -> list[str]:
        broker = self.settings.broker_socket.parent if via_socket else None
        etc = sandbox.etc_dir(self.settings.data_dir, uid, gid)
        return self._argv(sandbox.layout(spec, broker, etc), sandbox.GROUP, via_socket, uid, gid,
                          spec.command or [sys.executable, "-m", "sandbox_entry"])

    def _argv(self, mounts: list[Mount], chdir: str, via_socket: bool, uid: int, gid: int,
              command: list[str]) -> list[str]:
        a = ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session"]
        if via_socket:
            a.append("--unshare-net")
        binds: list[tuple[str, str, str]] = [("--ro-bind", "/usr", "/usr")]
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = f"/{top}"
            if os.path.islink(path):
                binds.append(("--symlink", os.readlink(path), path))
            elif os.path.isdir(path):
                binds.append(("--ro-bind", path, path))
        etc = ETC if via_socket else (*ETC, "resolv.conf")
        binds += [("--ro-bind-try", f"/etc/{n}", f"/etc/{n}") for n in etc]
        binds += [("--ro-bind", root, root) for root in _python_roots()]
        from nanoclaw.runtime import opencode  # here: `python -m nanoclaw.runtime.opencode`

        oc = opencode.binary()  # the host's pinned OpenCode CLI, where the image has its own
        if oc is not None:
            binds.append(("--ro-bind", str(oc), opencode.IN_SANDBOX))
        ab = agent_browser.binary()  # the host's pinned agent-browser, driving its Chromium
        if ab is not None:
            binds.append(("--ro-bind", str(ab), agent_browser.IN_SANDBOX))
        binds += [("--bind" if m.writable else "--ro-bind", str(m.source), m.target)
                  for m in mounts]
        # /tmp first: mounted after the binds it would hide any of them under /tmp (a
        # checkout or venv there, as in CI)
        a += ["--perms", "1777", "--tmpfs", "/tmp"]
        a += _parents([dest for _, _, dest in binds])
        for op, src, dest in binds:
            a += [op, src, dest]
        a += ["--proc", "/proc", "--dev", "/dev"]
        a += ["--remount-ro", "/", "--chdir", chdir, "--unsetenv", MARK]
        if os.geteuid() == 0:  # bwrap keeps root's powers inside; drop them for good
            a += [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                  "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
        return a + command

    def _path(self) -> str:
        return ":".join(dict.fromkeys([os.path.dirname(sys.executable),
                                       agent_browser.IN_SANDBOX_DIR, "/usr/local/bin",
                                       "/usr/bin", "/bin"]))

    def _spawn_cold(self, spec: SpawnSpec) -> str:
        uid, gid = sandbox.user(self.settings.agent_uid)
        sandbox.prepare(spec, uid, gid)
        via_socket = self.settings.container_network == "none"
        env = sandbox.environment(spec, self._path(), via_socket, self.settings.egress_enabled)
        env[MARK] = spec.install_id  # bwrap's own; --unsetenv keeps it out of the sandbox
        argv = self.argv(spec, via_socket, uid, gid)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as log:
            p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 close_fds=True)
        cid = f"pid:{p.pid}:{_starttime(p.pid)}"
        self.children[cid] = p
        return cid

    # ---- the warm pool: sandboxes waiting for a session (mountns.py) ----------------------
    def prewarm(self, spec: warm.WarmSpec) -> None:
        if not warm.can_hand_over(self.warm_size, "bwrap", "sandbox"):
            return
        root = (self.settings.data_dir / "run" / "warm").resolve()
        try:
            n = mountns.detach_all(root)  # left by a worker that died mid-handover
            if n:
                logger.warning("warm pool: detached {} stale staging mount(s)", n)
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            root.chmod(0o700)
            # a private mount of its own: nothing staged below it shows anywhere else
            mountns.bind_self(str(root), mountns.MS_PRIVATE)
        except (OSError, ValueError) as e:  # e.g. root without the power to mount here
            logger.warning("warm pool off for bwrap: cannot stage mounts in {}: {}", root, e)
            return
        self.stage_root = root
        super().prewarm(spec)

    def close(self) -> None:
        super().close()
        if self.stage_root is not None and not self.stages:  # else: the next worker's job
            mountns.detach_all(self.stage_root)
            shutil.rmtree(self.stage_root, ignore_errors=True)

    def _start_warm(self) -> warm.Warm:
        ws = self.warm_spec
        assert ws is not None
        stage = Path(tempfile.mkdtemp(dir=self.stage_root))
        s = stage / "s"
        s.mkdir(mode=0o755)
        w, fd = None, None
        try:
            mountns.bind_self(str(s), mountns.MS_SHARED)  # what is bound here shows inside
            fd = os.open(s, os.O_PATH | os.O_DIRECTORY)
            uid, gid = sandbox.user(self.settings.agent_uid)
            via_socket = self.settings.container_network == "none"
            broker = self.settings.broker_socket.parent if via_socket else None
            etc = sandbox.etc_dir(self.settings.data_dir, uid, gid)
            mounts = [*sandbox.shared_mounts(ws.runner_dir, broker, etc),
                      Mount(s, sandbox.SESSION, True)]
            env = {**sandbox.base_environment(self._path(), via_socket,
                                              self.settings.egress_enabled),
                   "NANOCLAW_WARM": "1",
                   "NANOCLAW_WARM_PRELOAD": ",".join(ws.preload), MARK: ws.install_id}
            argv = self._argv(mounts, "/", via_socket, uid, gid,
                              [sys.executable, "-m", "sandbox_entry"])
            log = warm.warm_log(ws.logs_dir)
            with open(log, "ab") as out:
                p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     close_fds=True)
            w = warm.Warm(p, f"pid:{p.pid}:{_starttime(p.pid)}", log, stage, fd)
            return w
        finally:
            if w is None:
                if fd is not None:
                    os.close(fd)
                mountns.detach_all(stage)
                shutil.rmtree(stage, ignore_errors=True)

    def _use_warm(self, w: warm.Warm, spec: SpawnSpec) -> str:
        uid, gid = sandbox.user(self.settings.agent_uid)
        sandbox.prepare(spec, uid, gid)
        via_socket = self.settings.container_network == "none"
        env = sandbox.environment(spec, self._path(), via_socket)
        env.pop("NANOCLAW_BROKER_SOCKET", None)  # the sandbox relays it since it started
        warm.mount_session(w, sandbox.session_mounts(spec), sandbox.SESSION)
        warm.hand_over(w, env, sandbox.GROUP, spec.log_path)
        self.stages[w.cid] = w.stage  # kept while the agent lives (see warm.unstage)
        return w.cid

    def _discard_warm(self, w: warm.Warm) -> None:
        super()._discard_warm(w)
        warm.unstage(w)
        if w.stage is not None:
            shutil.rmtree(w.stage, ignore_errors=True)

    def _ended(self, container_id: str) -> None:
        stage = self.stages.pop(container_id, None)
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)

    def exit_code(self, container_id: str) -> int | None:
        code = super().exit_code(container_id)
        if code is not None:
            self._ended(container_id)
        return code

    def stop(self, container_id: str, grace: float = 1.0) -> None:
        """TERM the runner inside (bwrap does not forward signals), then the process
        runtime's escalation on the bwrap process group."""
        pid, start = _parse(container_id)
        if pid is None or _starttime(pid) != start or (container_id not in self.children
                                                       and not _ours(pid)):
            self._ended(container_id)
            return
        for child in _children(pid):
            try:
                os.kill(child, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        while time.time() < deadline and not self._gone(container_id, pid):
            time.sleep(0.01)
        super().stop(container_id, grace=0.05)
        self._ended(container_id)


_ppid = procfs.ppid  # where tests and tools have always read it
