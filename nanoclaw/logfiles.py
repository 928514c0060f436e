"""Logs that stay small: rotation of `logs/nanoclaw.log` and `logs/nanoclaw.error.log`,
retention of `logs/containers/`.

Every worker appends to the same two files, so loguru's own rotation (each process
renaming on its own count) would have them rename each other's fresh files. Instead the
rotation is shared: each process's sink asks `Rotator` before a line; the first process
to see the file past `NANOCLAW_LOG_ROTATE_MB` takes `logs/.rotate.lock`, checks again
that the file is still the one it writes (else another already rotated it) and renames
`nanoclaw.log` → `nanoclaw.log.1` → … → `.N` (`NANOCLAW_LOG_KEEP`; the oldest goes).
Every sink is opened with loguru's `watch`, so each process reopens the new file at its
next line.

`logs/containers/<session>/<spawn>.log` (one per agent start) are kept
`NANOCLAW_CONTAINER_LOG_DAYS` days and, oldest first, to `NANOCLAW_CONTAINER_LOGS_MB`
in all; a file written in the last minute is never removed (an agent may still be
writing it). The sweep worker tidies once an hour, `nanoclaw logs --tidy` at once.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_NAME = ".rotate.lock"
LIVE_S = 60.0  # a container log touched this recently may still be written


def rotate(path: Path, keep: int, fd: int | None = None, max_bytes: int = 0) -> bool:
    """Rename `path` to `path.1` (shifting older ones up, dropping the one past `keep`),
    under the shared lock; only if it is still the file `fd` writes (when given) and
    still larger than `max_bytes`. True when this call rotated it."""
    lock_path = path.parent / LOCK_NAME
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if fd is not None:
            mine = os.fstat(fd)
            if (mine.st_dev, mine.st_ino) != (st.st_dev, st.st_ino):
                return False  # another process rotated it already
        if st.st_size <= max_bytes:
            return False
        if keep <= 0:
            os.unlink(path)
            return True
        Path(f"{path}.{keep}").unlink(missing_ok=True)
        for i in range(keep - 1, 0, -1):
            older = Path(f"{path}.{i}")
            if older.exists():
                os.rename(older, f"{path}.{i + 1}")
        os.rename(path, f"{path}.1")
        return True


@dataclass
class Rotator:
    """loguru's `rotation` hook for one file sink: does the shared rotation itself and
    always answers False (loguru must not rename too); `watch=True` on the sink
    reopens the new file."""

    path: Path
    max_bytes: int
    keep: int

    def __call__(self, message: Any, file: Any) -> bool:
        try:
            size = os.fstat(file.fileno()).st_size
        except (OSError, ValueError):
            return False
        if size + len(message) > self.max_bytes:
            try:
                rotate(self.path, self.keep, file.fileno(), self.max_bytes - len(message))
            except OSError:
                pass  # a full disk or a read-only logs/: keep logging where we are
        return False


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def prune_containers(root: Path, max_age_s: float, max_bytes: int, now: float) -> list[Path]:
    """Remove container logs older than `max_age_s`, then the oldest until the rest fit
    in `max_bytes`; never one written within LIVE_S. Empty session folders go too.
    Returns what was removed."""
    if not root.is_dir():
        return []
    files = []
    for p in root.glob("*/*.log"):
        try:
            st = p.lstat()
        except OSError:
            continue
        files.append((st.st_mtime, st.st_size, p))
    files.sort()  # oldest first
    total = sum(size for _, size, _ in files)
    removed = []
    for mtime, size, p in files:
        if now - mtime < LIVE_S:
            continue
        if now - mtime > max_age_s or total > max_bytes:
            try:
                p.unlink()
            except OSError:
                continue
            total -= size
            removed.append(p)
    for d in {p.parent for p in removed}:
        try:
            d.rmdir()  # only when empty
        except OSError:
            pass
    return removed


def tidy(logs_dir: Path, rotate_mb: float, keep: int, container_days: float,
         containers_mb: float, now: float | None = None) -> list[str]:
    """Rotate the host logs past their size and prune the container logs; what was done,
    one line each."""
    now = time.time() if now is None else now
    done = []
    for name in ("nanoclaw.log", "nanoclaw.error.log"):
        path = logs_dir / name
        if path.exists() and rotate(path, keep, max_bytes=int(rotate_mb * 2**20)):
            done.append(f"rotated {path}")
    removed = prune_containers(logs_dir / "containers", container_days * 86400,
                               int(containers_mb * 2**20), now)
    if removed:
        done.append(f"removed {len(removed)} old container log(s) from {logs_dir / 'containers'}")
    return done


def tidy_settings(settings: Any, now: float | None = None) -> list[str]:
    return tidy(settings.logs_dir, settings.log_rotate_mb, settings.log_keep,
                settings.container_log_days, settings.container_logs_mb, now)
