"""Bind mounts in the host's mount namespace, for handing a session to a warm sandbox.

A warm bwrap sandbox is started before its session is known, with `/workspace` bound
from an empty staging folder that is a *shared* mount. To hand it a session the host
builds the session's tree (session folder, group folder, `groups/global` read-only,
extras) on a private staging mount, binds that tree onto the shared folder — the kernel
copies it into the sandbox, which sees it appear at `/workspace` with the same flags —
then makes the staging private and detaches it. The host's mount table is back as it
was; the sandbox keeps its copy for as long as it lives. Needs root (CAP_SYS_ADMIN in
the host's namespace); without it the warm pool is not used.

Mount points are reached through `O_PATH | O_NOFOLLOW` descriptors opened one folder at
a time, so a symlink an agent left in its session folder (`agent -> /etc`) is refused
instead of followed into the host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _check(rc: int, what: str, target: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what} {target}: {os.strerror(e)}")


def mount(source: str | None, target: str, flags: int) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(), None,
                       ctypes.c_ulong(flags), None), "mount", target)


def detach(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), "umount", target)


def bind_self(path: str, propagation: int) -> None:
    """Bind a folder onto itself and give that mount its own propagation: `MS_PRIVATE`
    (nothing mounted below shows anywhere else) or `MS_SHARED` (what is mounted below
    shows in every copy of it, e.g. inside a sandbox that binds it)."""
    mount(path, path, MS_BIND)
    mount(None, path, propagation)


def bind(source: str, target: str, readonly: bool = False) -> None:
    """A recursive bind onto a folder only the host writes, then its flags."""
    mount(source, target, MS_BIND | MS_REC)
    mount(None, target, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV
          | (MS_RDONLY if readonly else 0))


def can_mount() -> bool:
    """Root with the power to change the host's mounts (not inside a user namespace)."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            first = f.read().split()
        return first[:3] == ["0", "0", "4294967295"]
    except OSError:
        return False


@contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def opened(path: str | Path) -> AbstractContextManager[int]:
    """An O_PATH descriptor of a folder, closed on leaving the block."""
    return _fd(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW))


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _step(parent: int, name: str, directory: bool, create: bool) -> int:
    """O_PATH descriptor of `name` in `parent`: never a symlink; made when missing."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        if not create:
            raise
        if directory:
            os.mkdir(name, 0o755, dir_fd=parent)
        else:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o644, dir_fd=parent))
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        raise ValueError(f"{name!r} is not a plain {'folder' if directory else 'file'}")
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | (os.O_DIRECTORY if directory else 0),
                   dir_fd=parent)


def bind_into(source: str, base_fd: int, rel: str, readonly: bool = False,
              directory: bool = True) -> None:
    """Bind `source` at `rel` under the folder `base_fd`, creating the mount point
    (folders 0755, or an empty file) and refusing any symlink, `..` or odd file on the
    way; then set its flags (a bind ignores them on the first call)."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"bad mount point {rel!r}")
    parent = os.dup(base_fd)
    try:
        for part in parts[:-1]:
            nxt = _step(parent, part, True, True)
            os.close(parent)
            parent = nxt
        with _fd(_step(parent, parts[-1], directory, True)) as under:
            mount(source, fd_path(under), MS_BIND | MS_REC)
        # a fresh lookup lands on the new mount (the old descriptor is the folder under it)
        with _fd(_step(parent, parts[-1], directory, False)) as top:
            mount(None, fd_path(top), MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV
                  | (MS_RDONLY if readonly else 0))
    finally:
        os.close(parent)


def mounted_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(root)
    points = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].encode().decode("unicode_escape")
                if point == prefix or point.startswith(prefix + "/"):
                    points.append(point)
    except OSError:
        return []
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def detach_all(root: Path) -> int:
    """Detach every mount at or below `root` (left by a worker that died mid-handover)."""
    n = 0
    for _ in range(64):  # stacked mounts show once per layer
        points = mounted_under(root)
        if not points:
            break
        for p in points:
            try:
                detach(p)
                n += 1
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):
                    raise
    return n
