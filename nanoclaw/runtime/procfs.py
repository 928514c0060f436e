"""Reading the process tree from /proc, for the runtimes and the warm pool.

Why a module of its own: `warm` (which `process` and `bwrap` build on) needs an agent's
descendants too, and took them from `bwrap`, which imports `warm`: a cycle (review §1.4).
"""

from __future__ import annotations

import os


def children(pid: int) -> list[int]:
    """All descendants of pid (the sandboxed processes under a bwrap)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def environ(pid: int) -> list[bytes] | None:
    """The environment `pid` was started with; None when it cannot be read (gone, or
    another user's); empty for a zombie."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return None
