"""What the docker and bwrap runtimes share, so both sandboxes look the same from inside:
one mount layout (DESIGN §4), one environment, one unprivileged user, and the broker
reached through its unix socket instead of the network.

Inside every sandbox:

| path | what | mode |
|---|---|---|
| `/workspace` | the session's `work/` (the agent's home: `inbox/`, `outbox/`, `.heartbeat`) | rw |
| `/workspace/.session` | the session's `db/`: `inbound.db`, `container.json` | ro |
| `/workspace/.session/outbound.db` (and its `-journal`) | the agent's output | rw, file mounts |
| `/workspace/agent` | the agent group's folder (the agent's cwd) | rw |
| `/workspace/global` | `groups/global` | ro |
| `/workspace/extra/<name>` | allow-listed extra mounts (`nanoclaw/agents/mounts.py`) | per allowlist |
| `/app/agent_runner`, `/app/sandbox_entry.py` | the runner source, live from `container/` | ro |
| `/app/CLAUDE.md` | `container/CLAUDE.md`, the base prompt of every agent's memory | ro |
| `/app/skills` | `container/skills` (the runner links the enabled ones for the CLI) | ro |
| `/etc/passwd`, `/etc/group` | two lines: root and `agent` (the sandbox user) | ro |
| `/run/nanoclaw` | the broker's and the egress door's socket folder (network `none` only) | ro |
| `/opt/opencode/bin/opencode` | the pinned OpenCode CLI: the image's, or the host's (bwrap) | ro |
| `/opt/agent-browser/bin/agent-browser` | the pinned browser CLI: the image's, or the host's (bwrap) | ro |

Nothing else of the host is visible, so nothing else can leak: no `.env`, no central
DB, no other session, not even the host's account names. The agent can write its output
but cannot replace or re-create any file the host reads by name: `db/` is mounted
read-only and `outbound.db` is a mount point (a rename or unlink of it fails). When the
host runs as root the agent runs as `agent_uid`, a uid no local account has; its folders
are made for that user when they are created, so nothing is chowned at a start.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nanoclaw import hostile
from nanoclaw.log import logger
from nanoclaw.runtime import agent_browser
from nanoclaw.runtime.base import Mount, SpawnSpec

SESSION = "/workspace"
DB = "/workspace/.session"
GROUP = "/workspace/agent"
GLOBAL = "/workspace/global"
EXTRA = "/workspace/extra"
APP = "/app"
BROKER_DIR = "/run/nanoclaw"
LABEL = "nanoclaw.install"


def name(install_id: str, session_id: str) -> str:
    """One name per install and session: the engine itself refuses a second container."""
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in session_id)
    return f"nanoclaw-{install_id}-{safe}"


def layout(spec: SpawnSpec, broker_dir: Path | None, etc_dir: Path | None = None) -> list[Mount]:
    """Every bind mount of the sandbox, parents before children."""
    return session_mounts(spec) + shared_mounts(spec.runner_dir, broker_dir, etc_dir)


def session_mounts(spec: SpawnSpec) -> list[Mount]:
    """The session's own mounts: everything under `/workspace`, the agent's `work/` first."""
    spec.global_dir.mkdir(parents=True, exist_ok=True)
    db = spec.session_dir / "db"
    return [
        Mount(spec.session_dir / "work", SESSION, True),
        Mount(db, DB, False),
        Mount(db / "outbound.db", f"{DB}/outbound.db", True),
        Mount(db / "outbound.db-journal", f"{DB}/outbound.db-journal", True),
        Mount(spec.group_dir, GROUP, True),
        Mount(spec.global_dir, GLOBAL, False),
        *spec.extra_mounts,
    ]


def shared_mounts(runner_dir: Path, broker_dir: Path | None,
                  etc_dir: Path | None = None) -> list[Mount]:
    """What every sandbox of this install mounts alike: the runner, the broker's socket,
    the sandbox's own passwd and group files."""
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
    if etc_dir is not None:
        mounts += [Mount(etc_dir / "passwd", "/etc/passwd", False),
                   Mount(etc_dir / "group", "/etc/group", False)]
    return mounts


def etc_dir(data_dir: Path, uid: int, gid: int) -> Path:
    """`data/run/sandbox-etc/` with the passwd and group files every sandbox sees: root
    and `agent` (uid:gid), home `/workspace`. Tools that look the user up (`whoami`,
    Node's `os.userInfo()`) work, and no host account name shows inside."""
    d = data_dir / "run" / "sandbox-etc"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    files = {
        "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                  f"agent:x:{uid}:{gid}:agent:/workspace:/bin/sh\n"
                  f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": f"root:x:0:\nagent:x:{gid}:\nnogroup:x:65534:\n",
    }
    if uid == 0:
        files["passwd"] = files["passwd"].replace(f"agent:x:{uid}:{gid}:", "agent:x:0:0:", 1)
    for name, text in files.items():
        p = d / name
        try:
            if p.read_text() == text:
                continue
        except OSError:
            pass
        tmp = d / f".{name}.tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    return d


def base_environment(path: str, via_socket: bool, egress: bool = False) -> dict[str, str]:
    """What the sandbox's Python needs before any session is known (a warm start's too);
    with `egress`, the egress door's socket beside the broker's (`broker/egress.py`)."""
    env = {
        "PATH": path,
        "LANG": "C.UTF-8",
        "PYTHONPATH": APP,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        **agent_browser.environment(),
    }
    if via_socket:  # sandbox_entry relays 127.0.0.1 inside to this socket
        env["NANOCLAW_BROKER_SOCKET"] = f"{BROKER_DIR}/broker.sock"
        if egress:  # sandbox_entry relays it too and points HTTP(S)_PROXY there
            env["NANOCLAW_EGRESS_SOCKET"] = f"{BROKER_DIR}/egress.sock"
    return env


def environment(spec: SpawnSpec, path: str, via_socket: bool,
                egress: bool = False) -> dict[str, str]:
    return {
        **base_environment(path, via_socket, egress),
        "HOME": SESSION,
        "NANOCLAW_SESSION_DIR": SESSION,
        "NANOCLAW_DB_DIR": DB,
        "NANOCLAW_GROUP_DIR": GROUP,
        "NANOCLAW_GLOBAL_DIR": GLOBAL,
        **spec.env,
    }


def user(agent_uid: int) -> tuple[int, int]:
    """The sandbox's uid:gid: the host's own user, or `agent_uid` when the host is root."""
    if os.geteuid() == 0:
        return agent_uid, agent_uid
    return os.getuid(), os.getgid()


def mount_points(spec: SpawnSpec) -> list[tuple[str, bool]]:
    """(path inside `work/`, is a folder) of every mount point the runtimes need there:
    the mounts directly below `/workspace` that no other mount holds."""
    mounts = session_mounts(spec)
    out = []
    for m in mounts[1:]:
        if any(o.target != SESSION and m.target.startswith(o.target + "/") for o in mounts):
            continue  # inside another mount (db/'s files): that folder is the host's
        out.append((m.target[len(SESSION) + 1:], m.source.is_dir()))
    return out


def prepare(spec: SpawnSpec, uid: int, gid: int) -> None:
    """Before a sandbox gets the session: the agent's `work/` is its to change, so what
    sits where the runtime mounts the group, global and extra folders may be anything
    (`agent -> /etc`, a FIFO, a file): through `hostile.py`, each mount point becomes a
    plain folder (or file) again, whatever was there is removed and logged."""
    owner = (uid, gid) if os.geteuid() == 0 else None
    with hostile.Folder.open(spec.session_dir / "work") as work:
        for rel, is_dir in mount_points(spec):
            if work.ensure_mount_point(rel, is_dir, owner):
                logger.warning("session {}: replaced {} in its folder (not a plain {}; the"
                               " runtime mounts there)", spec.session_id, rel,
                               "folder" if is_dir else "file")


def image_hash(container_dir: Path) -> str:
    """What the agent image is built from; a changed hash means `make image` again."""
    from nanoclaw.runtime import opencode  # here: `python -m nanoclaw.runtime.opencode`

    h = hashlib.sha256()
    for n in ("Dockerfile", "requirements.txt", "build.sh"):
        p = container_dir / n
        h.update(n.encode() + b"\0" + (p.read_bytes() if p.exists() else b"") + b"\0")
    h.update(b"opencode\0" + opencode.pin().encode() + b"\0")  # the CLIs the image carries
    h.update(b"agent-browser\0" + agent_browser.pin().encode() + b"\0")
    return h.hexdigest()[:16]
