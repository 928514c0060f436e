"""What the docker and bwrap runtimes share, so both sandboxes look the same from inside:
one mount layout (DESIGN §4), one environment, one unprivileged user, and the broker
reached through its unix socket instead of the network.

Inside every sandbox:

| path | what | mode |
|---|---|---|
| `/workspace` | the session folder (`inbound.db`, `outbound.db`, `.heartbeat`, …) | rw |
| `/workspace/agent` | the agent group's folder (the agent's cwd) | rw |
| `/workspace/global` | `groups/global` | ro |
| `/workspace/extra/<name>` | allow-listed extra mounts (`nanoclaw/mounts.py`) | per allowlist |
| `/app/agent_runner`, `/app/sandbox_entry.py` | the runner source, live from `container/` | ro |
| `/app/CLAUDE.md` | `container/CLAUDE.md`, the base prompt of every agent's memory | ro |
| `/app/skills` | `container/skills` (the runner links the enabled ones for the CLI) | ro |
| `/run/nanoclaw` | the broker's socket folder (network `none` only) | ro |

Nothing else of the host is visible, so nothing else can leak: no `.env`, no central
DB, no other session. When the host runs as root the agent runs as `agent_uid` and the
folders it writes are handed to that user; the files the host alone writes
(`inbound.db`, `container.json`) stay the host's, readable but not writable inside.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from nanoclaw.log import logger
from nanoclaw.runtime.base import Mount, SpawnSpec

SESSION = "/workspace"
GROUP = "/workspace/agent"
GLOBAL = "/workspace/global"
EXTRA = "/workspace/extra"
APP = "/app"
BROKER_DIR = "/run/nanoclaw"
HOST_OWNED = {"inbound.db", "inbound.db-journal", "container.json", "container.json.tmp",
              ".nudge-host.sock"}  # a link to the delivery worker's socket (nudge.py)
LABEL = "nanoclaw.install"


def name(install_id: str, session_id: str) -> str:
    """One name per install and session: the engine itself refuses a second container."""
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in session_id)
    return f"nanoclaw-{install_id}-{safe}"


def layout(spec: SpawnSpec, broker_dir: Path | None) -> list[Mount]:
    """Every bind mount of the sandbox, parents before children."""
    return session_mounts(spec) + shared_mounts(spec.runner_dir, broker_dir)


def session_mounts(spec: SpawnSpec) -> list[Mount]:
    """The session's own mounts: everything under `/workspace`, the session folder first."""
    spec.global_dir.mkdir(parents=True, exist_ok=True)
    return [
        Mount(spec.session_dir, SESSION, True),
        Mount(spec.group_dir, GROUP, True),
        Mount(spec.global_dir, GLOBAL, False),
        *spec.extra_mounts,
    ]


def shared_mounts(runner_dir: Path, broker_dir: Path | None) -> list[Mount]:
    """What every sandbox of this install mounts alike: the runner, the broker's socket."""
    mounts = [
        Mount(runner_dir / "agent_runner", f"{APP}/agent_runner", False),
        Mount(runner_dir / "sandbox_entry.py", f"{APP}/sandbox_entry.py", False),
    ]
    if (runner_dir / "CLAUDE.md").is_file():  # the base prompt every agent's memory starts with
        mounts.append(Mount(runner_dir / "CLAUDE.md", f"{APP}/CLAUDE.md", False))
    if (runner_dir / "skills").is_dir():
        mounts.append(Mount(runner_dir / "skills", f"{APP}/skills", False))
    if broker_dir is not None:
        broker_dir.mkdir(parents=True, exist_ok=True)  # the broker binds its socket here
        mounts.append(Mount(broker_dir, BROKER_DIR, False))
    return mounts


def base_environment(path: str, via_socket: bool) -> dict[str, str]:
    """What the sandbox's Python needs before any session is known (a warm start's too)."""
    env = {
        "PATH": path,
        "LANG": "C.UTF-8",
        "PYTHONPATH": APP,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if via_socket:  # sandbox_entry relays 127.0.0.1 inside to this socket
        env["NANOCLAW_BROKER_SOCKET"] = f"{BROKER_DIR}/broker.sock"
    return env


def environment(spec: SpawnSpec, path: str, via_socket: bool) -> dict[str, str]:
    return {
        **base_environment(path, via_socket),
        "HOME": SESSION,
        "NANOCLAW_SESSION_DIR": SESSION,
        "NANOCLAW_GROUP_DIR": GROUP,
        "NANOCLAW_GLOBAL_DIR": GLOBAL,
        **spec.env,
    }


def user(agent_uid: int) -> tuple[int, int]:
    """The sandbox's uid:gid: the host's own user, or `agent_uid` when the host is root."""
    if os.geteuid() == 0:
        return agent_uid, agent_uid
    return os.getuid(), os.getgid()


def clear_mount_points(spec: SpawnSpec) -> list[str]:
    """The session folder is the agent's to write, so what sits where the runtime mounts
    the group, global and extra folders may be anything (`agent -> /etc`, a file). Those
    are mount points holding nothing of value: remove what is not a plain folder."""
    removed = []
    for m in session_mounts(spec)[1:]:
        rel = m.target[len(SESSION) + 1:].split("/")
        for i in range(1, len(rel) + 1):
            p = spec.session_dir.joinpath(*rel[:i])
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                break
            if stat.S_ISDIR(st.st_mode):
                continue
            if i == len(rel) and not m.source.is_dir() and stat.S_ISREG(st.st_mode):
                continue  # a file mount's point is a file
            p.unlink()
            removed.append(str(p))
            break
    return removed


def prepare(spec: SpawnSpec, uid: int, gid: int) -> None:
    """Before a sandbox gets the session: sane mount points, folders the agent can write."""
    for path in clear_mount_points(spec):
        logger.warning("session {}: removed {} (not a folder; the runtime mounts there)",
                       spec.session_id, path)
    hand_over([spec.session_dir, spec.group_dir], uid, gid)


def hand_over(folders: list[Path], uid: int, gid: int) -> None:
    """Make the agent's folders writable by the sandbox user (host files stay the host's)."""
    if os.geteuid() != 0:
        return
    for top in folders:
        for root, dirs, files in os.walk(top):
            _chown(root, uid, gid)
            for n in dirs + files:
                if n in HOST_OWNED:
                    _chown(os.path.join(root, n), 0, 0)
                else:
                    _chown(os.path.join(root, n), uid, gid)


def _chown(path: str, uid: int, gid: int) -> None:
    try:
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(path, uid, gid)
    except FileNotFoundError:
        pass


def image_hash(container_dir: Path) -> str:
    """What the agent image is built from; a changed hash means `make image` again."""
    h = hashlib.sha256()
    for n in ("Dockerfile", "requirements.txt", "build.sh"):
        p = container_dir / n
        h.update(n.encode() + b"\0" + (p.read_bytes() if p.exists() else b"") + b"\0")
    return h.hexdigest()[:16]
