"""Extra mounts: which host folders an agent may see besides its own, and how.

An agent group asks for them in `container_configs.additional_mounts` (a JSON list of
`{"hostPath": "~/projects/site", "containerPath": "site", "readonly": true}`; they
appear at `/workspace/extra/<containerPath>`). The host grants them only against an
allowlist kept outside every sandbox (`NANOCLAW_MOUNT_ALLOWLIST`, default
`~/.config/nanoclaw/mount-allowlist.json`):

    {"allowedRoots": [{"path": "~/projects", "allowReadWrite": true}],
     "blockedPatterns": ["more", "names"]}

Always refused, whatever the allowlist says: a path (as asked, or after resolving
symlinks) with a part containing a blocked pattern (reference §7: `.ssh`, `.aws`,
`.env`, credentials, keys, …), a home directory or any folder holding one, and
anything that is, holds or lies inside NanoClaw's own data, logs, groups, `.env`, the
allowlist, or its installation: the checkout (the runner source `container/`, the
`nanoclaw/` package) and the Python that runs it (the venv, `sys.prefix`, and the
interpreter's own install, `sys.base_prefix`). An agent that could write there would
change the host's code or every agent's runner. The same rules are applied again at
every spawn, on the resolved path. No allowlist file means no extra mounts. A mount
under a root without `allowReadWrite` is read-only.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoclaw.errors import Refused
from nanoclaw.runtime.base import Mount

if TYPE_CHECKING:
    from nanoclaw.config import Settings

BLOCKED = (".ssh", ".gnupg", ".gpg", ".aws", ".azure", ".gcloud", ".kube", ".docker",
           "credentials", ".env", ".netrc", ".npmrc", ".pypirc", "id_rsa", "id_ed25519",
           "private_key", ".secret")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: `$` allows "x\n"
EXTRA = "/workspace/extra"


class MountError(Refused, ValueError):
    """This mount is refused; the message says why in one line."""


@dataclass(frozen=True)
class Root:
    path: Path
    read_write: bool = False


@dataclass
class Allowlist:
    roots: list[Root] = field(default_factory=list)
    blocked: tuple[str, ...] = BLOCKED
    source: str = "(none)"

    @classmethod
    def load(cls, path: Path) -> "Allowlist":
        path = path.expanduser()
        if not path.exists():
            return cls(source=str(path))
        try:
            data = json.loads(path.read_text())
            roots = [Root(Path(os.path.realpath(Path(str(r["path"])).expanduser())),
                          bool(r.get("allowReadWrite", r.get("allow_read_write", False))))
                     for r in data.get("allowedRoots", data.get("allowed_roots", []))]
            extra = tuple(str(p) for p in data.get("blockedPatterns",
                                                   data.get("blocked_patterns", [])))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise MountError(f"mount allowlist {path} is unreadable: {e}") from None
        return cls(roots, BLOCKED + extra, str(path))


def home_dirs() -> set[Path]:
    homes = {Path("/root"), Path.home()}
    for p in pwd.getpwall():
        if p.pw_dir and p.pw_dir not in ("/", "/nonexistent") and (p.pw_uid == 0
                                                                    or p.pw_uid >= 1000):
            homes.add(Path(p.pw_dir))
    if os.path.isdir("/home"):
        homes.update(Path("/home", n) for n in os.listdir("/home"))
    return {Path(os.path.realpath(h)) for h in homes}


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check(request: dict[str, Any], allow: Allowlist, protected: list[Path]) -> Mount:
    """One requested mount → the Mount to make, or MountError saying why not."""
    raw = request.get("hostPath", request.get("host_path"))
    if not raw or not isinstance(raw, str):
        raise MountError(f"extra mount {request!r} has no hostPath")
    asked = Path(raw).expanduser()
    if not asked.is_absolute():
        raise MountError(f"extra mount {raw}: hostPath must be absolute")
    real = Path(os.path.realpath(asked))
    for part in (*asked.parts, *real.parts):
        hit = next((b for b in allow.blocked if b.lower() in part.lower()), None)
        if hit:
            raise MountError(f"extra mount {raw} refused: the path contains {hit!r}"
                             " (credentials and keys never enter a sandbox)")
    if not real.exists():
        raise MountError(f"extra mount {raw} refused: no such file or folder")
    home = next((h for h in home_dirs() if h == real or h.is_relative_to(real)), None)
    if home is not None:
        raise MountError(f"extra mount {raw} refused: {'it is' if home == real else 'it holds'}"
                         f" the home directory {home}")
    for p in protected:
        own = Path(os.path.realpath(p))
        if _overlaps(real, own):
            how = ("the same folder" if real == own else "it holds that folder"
                   if own.is_relative_to(real) else "it lies inside that folder")
            raise MountError(f"extra mount {raw} refused: it overlaps NanoClaw's own {own}"
                             f" ({how})")
    root = next((r for r in allow.roots if real == r.path or real.is_relative_to(r.path)), None)
    if root is None:
        raise MountError(f"extra mount {raw} refused: not under an allowed root of the mount"
                         f" allowlist {allow.source}")
    name = request.get("containerPath", request.get("container_path")) or real.name
    name = str(name).removeprefix(EXTRA + "/")
    if not NAME.fullmatch(name):
        raise MountError(f"extra mount {raw} refused: bad containerPath {name!r} (one plain"
                         " name; it appears at /workspace/extra/<name>)")
    readonly = request.get("readonly", request.get("read_only", True)) is not False
    return Mount(real, f"{EXTRA}/{name}", writable=not readonly and root.read_write)


def protected(settings: "Settings") -> list[Path]:
    """What no extra mount may overlap: NanoClaw's own state, its secrets, the allowlist,
    and its installation (`installation()`)."""
    return [settings.data_dir, settings.logs_dir, settings.groups_dir, Path(".env").resolve(),
            settings.mount_allowlist.expanduser(), *installation()]


def installation() -> list[Path]:
    """The code the host and every agent run: the runner source (`container/`), the
    `nanoclaw` package, the checkout holding both, the venv and the interpreter's own
    install. A writable mount of any of them (or of a folder holding one) would let an
    agent rewrite the host; a read-only one would show it the host's code and config."""
    import nanoclaw
    from nanoclaw.util import RUNNER_DIR

    package = Path(nanoclaw.__file__).resolve().parent
    paths = [RUNNER_DIR, package, package.parent]
    for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
        if prefix and Path(prefix) not in paths:
            paths.append(Path(prefix))
    return paths


def requests_of(raw: Any) -> list[dict[str, Any]]:
    """A group's `additional_mounts` (JSON text or a list) as request dicts; MountError
    when it is not a JSON list."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw or "[]")
        except ValueError:
            raise MountError(f"additional_mounts is not JSON: {raw[:80]!r}") from None
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise MountError("additional_mounts must be a JSON list")
    return [r if isinstance(r, dict) else {"hostPath": r} for r in raw]


def name_of(request: dict[str, Any]) -> str:
    """The name a request asks for under /workspace/extra (as `check` would grant it)."""
    name = request.get("containerPath", request.get("container_path"))
    if not name:
        raw = request.get("hostPath", request.get("host_path")) or ""
        name = Path(os.path.realpath(Path(str(raw)).expanduser())).name if raw else ""
    return str(name).removeprefix(EXTRA + "/")


def resolve(requests: Any, allowlist: Path,
            protected: list[Path]) -> tuple[list[Mount], list[str]]:
    """All granted mounts and one line per refusal (the spawn goes on without those)."""
    try:
        requests = requests_of(requests)
        if not requests:
            return [], []
        allow = Allowlist.load(allowlist)
    except MountError as e:
        return [], [str(e)]
    mounts, problems, seen = [], [], set()
    for r in requests:
        try:
            m = check(r, allow, protected)
        except MountError as e:
            problems.append(str(e))
            continue
        if m.target in seen:
            problems.append(f"extra mount {m.source} refused: {m.target} is taken")
            continue
        seen.add(m.target)
        mounts.append(m)
    return mounts, problems
