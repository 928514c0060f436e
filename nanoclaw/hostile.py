"""Hostile ground: the one way the host touches an agent's folders (DESIGN §4).

A session's work folder and an agent group's folder belong to the agent, which may be a
prompt-injected model: any entry there can become a symlink (to `/etc`, to another
session), a FIFO, a huge file or a hard link at any moment, also between two calls of
ours. So the host never uses a path inside them. A `Folder` is a directory descriptor
opened once (`O_DIRECTORY | O_NOFOLLOW`); everything below it is reached one component
at a time with `O_NOFOLLOW` relative to the descriptor of its parent (`openat`), files
are opened by `O_PATH` and checked with `fstat` before a single byte is read (regular
files only, one link, a size limit), writes create a fresh file exclusively and
`rename` it into place inside the same folder, and ownership changes walk by descriptor
with `AT_SYMLINK_NOFOLLOW`. A component that is not what it must be is refused
(`Refused`), never followed. `tests/test_hostile_ast.py` fails when other host code
touches these folders by path.

Only the folder's own path is opened by name, and that path's parents are the host's
(`data/sessions/<group>/<session>/`, `groups/`), so nothing the agent controls is
resolved on the way.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from typing import Iterator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_READ = 64 << 20       # a file the host reads whole (a note, a config): 64 MiB
MAX_COPY = 100 << 20      # a file the host copies out for a platform or another agent
MAX_WALK = 200_000        # entries an ownership walk visits before it gives up
MAX_DEPTH = 200           # folders nested deeper than this are not removed


class Refused(ValueError):
    """An entry is not what the host may touch: a link, a special file, too big, a bad
    name. The message is one line and names the entry, never a host path."""


def check_name(name: str) -> str:
    """One path component: no separator, no `.`/`..`, no NUL, not empty."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise Refused(f"bad name {name!r}")
    return name


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p]
    if not parts:
        raise Refused("empty path")
    return [check_name(p) for p in parts]


class Folder:
    """A folder of an agent's, held by descriptor; close it (or use `with`)."""

    def __init__(self, fd: int, label: str):
        self.fd, self.label = fd, label

    # ---- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = False, mode: int = 0o700,
             owner: tuple[int, int] | None = None) -> "Folder":
        """The folder at `path` (its parents are the host's); the last component is
        never followed. `create`: made with `mode` (and handed to `owner`) if missing."""
        path = os.fspath(path)
        parent, name = os.path.split(path.rstrip("/"))
        # the parent is the host's own path (it may be a link the owner set up)
        pfd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return cls(_subdir(pfd, check_name(name), create, mode, owner), path)
        finally:
            os.close(pfd)

    def sub(self, rel: str, *, create: bool = False, mode: int = 0o700,
            owner: tuple[int, int] | None = None) -> "Folder":
        """A folder below this one, walked component by component."""
        fd = os.dup(self.fd)
        try:
            for part in _parts(rel):
                nxt = _subdir(fd, part, create, mode, owner)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return Folder(fd, f"{self.label}/{rel}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Folder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _parent(self, rel: str, create: bool = False,
                owner: tuple[int, int] | None = None) -> Iterator[tuple[int, str]]:
        """(descriptor of the folder holding the last component, that component)."""
        *dirs, last = _parts(rel)
        if not dirs:
            yield self.fd, last
            return
        with self.sub("/".join(dirs), create=create, owner=owner) as d:
            yield d.fd, last

    # ---- looking ----------------------------------------------------------------------
    def stat(self, rel: str) -> os.stat_result | None:
        """The entry itself (a link is not followed); None when it is missing."""
        try:
            with self._parent(rel) as (pfd, name):
                return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a link where a folder was on the way
                return None
            raise

    def listdir(self, rel: str = "") -> list[str]:
        if not rel:
            return os.listdir(self.fd)
        with self.sub(rel) as d:
            return os.listdir(d.fd)

    # ---- reading ----------------------------------------------------------------------
    @contextmanager
    def open_file(self, rel: str, limit: int = MAX_READ) -> Iterator[tuple[int, int]]:
        """(readable descriptor, size) of a regular file with one link and at most
        `limit` bytes; anything else is refused without being opened for reading (a
        FIFO never blocks us, a device is never touched)."""
        with self._parent(rel) as (pfd, name):
            try:
                pathfd = os.open(name, PATH_FLAGS, dir_fd=pfd)
            except FileNotFoundError:
                raise Refused(f"{rel!r} does not exist") from None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Refused(f"{rel!r} is not a plain file") from None
                raise
        try:
            st = os.fstat(pathfd)
            if stat.S_ISLNK(st.st_mode):
                raise Refused(f"{rel!r} is a symlink; refusing to follow it")
            if not stat.S_ISREG(st.st_mode):
                raise Refused(f"{rel!r} is not a regular file")
            if st.st_nlink != 1:
                raise Refused(f"{rel!r} has other hard links")
            if st.st_size > limit:
                raise Refused(f"{rel!r} is larger than {limit >> 20} MiB")
            # reopen the checked inode itself: no name is looked up again
            fd = os.open(f"/proc/self/fd/{pathfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        finally:
            os.close(pathfd)
        try:
            yield fd, st.st_size
        finally:
            os.close(fd)

    def read(self, rel: str, limit: int = MAX_READ) -> bytes:
        with self.open_file(rel, limit) as (fd, _):
            data = _read_all(fd, limit + 1)
        if len(data) > limit:  # grew while we read
            raise Refused(f"{rel!r} is larger than {limit >> 20} MiB")
        return data

    # ---- writing ----------------------------------------------------------------------
    def write(self, rel: str, data: bytes, *, mode: int = 0o644,
              owner: tuple[int, int] | None = None, create_dirs: bool = False) -> None:
        """Replace `rel` with `data`: a fresh file made exclusively beside it, then
        renamed over it (a link or FIFO there is replaced, never written through)."""
        with self._parent(rel, create=create_dirs, owner=owner) as (pfd, name):
            tmp = f".nanoclaw-{secrets.token_hex(6)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                try:
                    _write_all(fd, data)
                    os.fchmod(fd, mode)
                    if owner is not None:
                        os.fchown(fd, *owner)
                finally:
                    os.close(fd)
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=pfd)
                except OSError:
                    pass
                raise

    def copy_to(self, rel: str, dst: "Folder", dst_rel: str, *, limit: int = MAX_COPY,
                mode: int = 0o644, owner: tuple[int, int] | None = None) -> int:
        """Copy a checked regular file into another folder (made exclusively there, then
        renamed into place); returns the bytes copied."""
        with self.open_file(rel, limit) as (src, _):
            data = _read_all(src, limit + 1)
        if len(data) > limit:
            raise Refused(f"{rel!r} is larger than {limit >> 20} MiB")
        dst.write(dst_rel, data, mode=mode, owner=owner, create_dirs=True)
        return len(data)

    def move_into(self, name: str, dst: "Folder", new_name: str | None = None) -> None:
        """Rename the entry `name` (whatever it is; a link is moved, not followed) from
        this folder into `dst`, replacing a non-folder there."""
        check_name(name)
        os.rename(name, check_name(new_name or name), src_dir_fd=self.fd, dst_dir_fd=dst.fd)

    def mkdir(self, rel: str, *, mode: int = 0o700,
              owner: tuple[int, int] | None = None) -> None:
        """Make sure `rel` is a folder (made with every missing parent)."""
        self.sub(rel, create=True, mode=mode, owner=owner).close()

    def remove(self, rel: str) -> bool:
        """Remove an entry whatever it is (a folder with all it holds); never follows a
        link. Returns False when nothing was there."""
        try:
            with self._parent(rel) as (pfd, name):
                return _remove(pfd, name)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            if e.errno == errno.ELOOP:
                return False
            raise

    def link(self, src: str | os.PathLike, name: str) -> None:
        """A hard link to a host file (a socket) as `name` here, replacing whatever sits
        there unless it is already that file."""
        check_name(name)
        want = os.stat(src)
        try:
            have = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if (have.st_ino, have.st_dev) == (want.st_ino, want.st_dev):
                return
            _remove(self.fd, name)
        except FileNotFoundError:
            pass
        os.link(src, name, dst_dir_fd=self.fd, follow_symlinks=False)

    @contextmanager
    def socket_address(self, name: str) -> Iterator[str | None]:
        """An address for the unix socket `name` here (None if it is not a socket): the
        checked inode through /proc, so no name is resolved when sending."""
        check_name(name)
        try:
            fd = os.open(name, PATH_FLAGS, dir_fd=self.fd)
        except OSError:
            yield None
            return
        try:
            yield f"/proc/self/fd/{fd}" if stat.S_ISSOCK(os.fstat(fd).st_mode) else None
        finally:
            os.close(fd)

    def ensure_mount_point(self, rel: str, directory: bool,
                           owner: tuple[int, int] | None = None) -> bool:
        """Make `rel` a plain folder (or empty file) for a runtime to mount onto,
        removing whatever else the agent left there. True when something was removed."""
        parts = _parts(rel)
        removed = False
        fd = os.dup(self.fd)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                want_dir = directory or not last
                try:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
                    if not ok:
                        _remove(fd, part)
                        removed = True
                except FileNotFoundError:
                    ok = False
                if not ok:
                    if want_dir:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    else:
                        os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                         | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd))
                    if owner is not None:
                        os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                if want_dir:
                    nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = nxt
        finally:
            os.close(fd)
        return removed

    # ---- ownership --------------------------------------------------------------------
    def adopt(self, uid: int, gid: int) -> int:
        """Give the whole tree to uid:gid, walking by descriptor: a folder swapped for a
        link mid-walk is never entered, a link itself is changed, not its target.
        Returns how many entries changed owner."""
        changed = 0
        seen = 0
        todo = [os.dup(self.fd)]
        try:
            while todo:
                fd = todo.pop()
                try:
                    st = os.fstat(fd)
                    if (st.st_uid, st.st_gid) != (uid, gid):
                        os.fchown(fd, uid, gid)
                        changed += 1
                    for name in os.listdir(fd):
                        seen += 1
                        if seen > MAX_WALK:
                            raise Refused(f"more than {MAX_WALK} entries in {self.label}")
                        try:
                            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                            if stat.S_ISDIR(st.st_mode):
                                todo.append(os.open(name, DIR_FLAGS, dir_fd=fd))
                            elif (st.st_uid, st.st_gid) != (uid, gid):
                                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
                                changed += 1
                        except (FileNotFoundError, NotADirectoryError):
                            continue  # gone, or swapped for something else meanwhile
                        except OSError as e:
                            if e.errno != errno.ELOOP:
                                raise
                finally:
                    os.close(fd)
        finally:
            for fd in todo:
                os.close(fd)
        return changed


def _subdir(pfd: int, name: str, create: bool, mode: int,
            owner: tuple[int, int] | None) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=pfd)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(f"{name!r} is not a plain folder") from None
        raise
    try:
        os.mkdir(name, mode, dir_fd=pfd)
    except FileExistsError:
        pass
    fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
    try:
        os.fchmod(fd, mode)  # not the umask's idea of it
        if owner is not None:
            os.fchown(fd, *owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove(pfd: int, name: str, depth: int = 0) -> bool:
    if depth > MAX_DEPTH:
        raise Refused(f"folders nested deeper than {MAX_DEPTH} levels")
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=pfd)
        return True
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
    except OSError as e:  # swapped for a link meanwhile: remove the link
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            os.unlink(name, dir_fd=pfd)
            return True
        raise
    try:
        for child in os.listdir(fd):
            _remove(fd, child, depth + 1)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=pfd)
    return True


def _read_all(fd: int, limit: int) -> bytes:
    chunks, n = [], 0
    while n < limit:
        b = os.read(fd, min(1 << 20, limit - n))
        if not b:
            break
        chunks.append(b)
        n += len(b)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
