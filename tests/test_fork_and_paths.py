"""Two host-wide hazards, checked on a real host (process runtime, fake model):

- fork: no worker inherits the orchestrator's handle on the central DB (habit 8 of the
  architecture review; SQLite forbids carrying a connection across fork);
- paths: a data directory whose name holds `?`, `#` or `%` (characters that mean
  something in a SQLite `file:` URI) works like any other.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import time
from pathlib import Path

from conftest import Host, wait_for

DB_FILES = ("nanoclaw.db", "nanoclaw.db-wal", "nanoclaw.db-shm")
SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
KCMP_FILE = 0


def db_fds(pid: int, data: Path) -> dict[int, str]:
    """The fds of `pid` open on the central DB's files: fd → file name."""
    want = {str(data.resolve() / n): n for n in DB_FILES}
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target in want:
            out[int(fd)] = want[target]
    return out


def same_open_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool | None:
    """Do the two fds share one open file description (one was inherited from the
    other's process by fork)? kcmp(2) answers exactly; None where it is unavailable
    (other architecture, kernel without it, seccomp or ptrace policy refusing it)."""
    if SYS_KCMP is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.syscall(SYS_KCMP, pid1, pid2, KCMP_FILE, fd1, fd2)
    if r < 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EACCES):
            return None
        raise OSError(ctypes.get_errno(), f"kcmp({pid1}:{fd1}, {pid2}:{fd2})")
    return r == 0


def inherited_handles(h: Host) -> list[str]:
    """What each worker holds on the central DB that it did not open itself (empty when
    all is well). Two checks:

    1. Counts. A worker holds exactly one Store (store.py: "Workers hold one `Store`
       each, opened after fork"; the web chat, which opens a second, is off here).
       SQLite gives each connection one fd on nanoclaw.db and one on -wal, and each
       process one fd on -shm. So every worker must show exactly one fd on each file.
       An inherited orchestrator handle shows as a second fd on nanoclaw.db and -wal
       (the worker's own connection then shares the inherited -shm fd and SQLite's
       in-memory lock state: the real danger).
    2. Identity, where kcmp(2) is allowed: no worker fd on those files shares an open
       file description with an fd of the orchestrator. The orchestrator opens its own
       connection again after each fork, so a shared description can only be inherited.
    """
    host_pid = h.proc.pid
    mine = db_fds(host_pid, h.data)
    found = []
    for w in h.workers():
        pid = w["pid"]
        fds = db_fds(pid, h.data)
        counts = {n: list(fds.values()).count(n) for n in DB_FILES}
        if counts != {n: 1 for n in DB_FILES}:
            found.append(f"{w['name']} (pid {pid}) holds {counts}")
        for fd in fds:
            for hfd in mine:
                if same_open_file(host_pid, hfd, pid, fd):
                    found.append(f"{w['name']} (pid {pid}) fd {fd} is the orchestrator's fd {hfd}")
    return found


def settled(h: Host, check, timeout: float = 10.0) -> list[str]:
    """Poll `check` until it finds nothing (a worker may hold a short-lived extra
    connection for a moment); what it still finds at the deadline."""
    deadline = time.time() + timeout
    while True:
        found = check(h)
        if not found or time.time() > deadline:
            return found
        time.sleep(0.2)


def test_no_worker_inherits_the_orchestrators_db_handle(host_factory):
    """Every worker, the first ones and one restarted later, opens its own connection
    on a clean slate: nothing of the orchestrator's SQLite handle crosses the fork."""
    h = host_factory("fork", NANOCLAW_WEB_ENABLED="false").start()
    wait_for(lambda: all(w["state"] == "RUNNING" for w in h.workers()), 15, what="workers up")
    assert db_fds(h.proc.pid, h.data), "the orchestrator keeps its own connection"
    found = settled(h, inherited_handles)
    assert not found, "\n".join(found)

    old = h.worker_pid("router")
    assert h.cli("workers", "restart", "router").returncode == 0
    wait_for(lambda: h.worker_pid("router") not in (None, old), 15, what="router restart")
    found = settled(h, inherited_handles)
    assert not found, "\n".join(found)
    assert h.cli("send", "after forks", "--wait", "30").stdout.strip() == "echo: after forks"


def test_data_dir_with_uri_characters(host_factory):
    """`?`, `#` and `%` in the data directory's path end a SQLite URI's path or escape
    into it; every DB opened by URI must quote it. Message, reply, status and workers
    all work there, and no worker logs an error or restarts."""
    h = host_factory("da?ta#1%20x").start()
    assert all(c in str(h.data) for c in "?#%")
    c = h.client()
    mid = c.send("hello from an odd path")
    assert c.wait_reply(mid, 60)["text"] == "echo: hello from an odd path"
    r = h.cli("send", "again", "--wait", "30")
    assert (r.returncode, r.stdout.strip()) == (0, "echo: again"), r.stderr

    st = h.cli("status")
    assert st.returncode == 0, st.stderr
    assert "host: running" in st.stdout
    assert f"data: {h.data}" in st.stdout
    assert "sessions: 1 active" in st.stdout, st.stdout
    ws = h.cli("workers")
    assert ws.returncode == 0, ws.stderr
    names = [w["name"] for w in h.workers()]
    assert names and all(n in ws.stdout for n in names)

    assert all(w["restarts"] == 0 and w["state"] == "RUNNING" for w in h.workers()), h.workers()
    errors = [ln for ln in (h.base / "logs" / "nanoclaw.error.log").read_text().splitlines()
              if "| ERROR" in ln] if (h.base / "logs" / "nanoclaw.error.log").exists() else []
    assert errors == []
