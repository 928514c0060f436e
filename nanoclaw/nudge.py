"""Wake-up nudges: a writer's hint that a sleeping worker has work, so idle workers can
poll slowly (`NANOCLAW_POLL_IDLE`) and still answer at once.

Rows stay the only truth. After the commit that creates work for another worker, the
writer sends one byte to that worker's unix datagram socket `data/run/nudge/<name>.sock`;
the reader wakes, drains its socket and polls as usual. Sending never blocks and never
raises: a lost nudge (no socket yet, a worker restarting, a full queue) costs one poll
interval, never a row, so a `kill -9` of anyone still loses nothing.

Agents share only their session folder with the host. The agent runner binds
`.nudge-agent.sock` in its `work/` (the host nudges it after writing `inbound.db`), and
the delivery worker hard-links its own socket in as `.nudge-host.sock` (the agent nudges
it after writing `outbound.db`; the sandbox sees nothing of `data/run`). That folder is
the agent's to change, so both go through `hostile.py`: no link is followed and only a
socket is sent to.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from nanoclaw.log import logger
from nanoclaw.util import unlink_if_ours

if TYPE_CHECKING:
    from nanoclaw.config import Settings

NUDGED_LINGER = 0.25  # with a nudge socket, poll fast only this long after work

NUDGE = b"!"
HOST_LINK = ".nudge-host.sock"    # in a session folder: the delivery worker's socket
AGENT_SOCK = ".nudge-agent.sock"  # in a session folder: bound by the agent runner
SUN_PATH_MAX = 107                # sockaddr_un.sun_path, less its terminating NUL
NO_SIGNAL_STEP = 0.5              # without the signal pipe, wake this often to see a stop
MIN_GAP = 0.001                   # at most one nudged wake per millisecond (see Waiter)
EXPECTED = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ENOTDIR, errno.ELOOP,
            errno.ENOTSOCK, errno.EPROTOTYPE}  # nobody listening (yet), or queue full

_sender: tuple[int, socket.socket] | None = None  # (pid, socket): one per process
_warned: set[int] = set()
_live: "weakref.WeakSet[Any]" = weakref.WeakSet()  # listeners and waiters, closed in a fork


def run_dir(where: Any) -> Path:
    """`data/run/nudge` of a Settings object or a data directory."""
    return Path(getattr(where, "data_dir", where)) / "run" / "nudge"


def path(where: Any, name: str) -> Path:
    return run_dir(where) / f"{name}.sock"


# ---- sending ------------------------------------------------------------------------
_addresses: dict[tuple[str, str], str] = {}  # (data dir, worker) → its socket's path


def send(where: Any, *names: str) -> None:
    """Nudge workers by name (`router`, `delivery`, `containers`, `channel:cli`, `host`)."""
    data = os.fspath(getattr(where, "data_dir", where))
    for name in names:
        addr = _addresses.get((data, name))
        if addr is None:  # a few per message in every worker: built once
            addr = _addresses[(data, name)] = os.fspath(path(data, name))
        _send(addr)


def agent(session_root: str | os.PathLike) -> None:
    """Nudge the agent of one session: new rows in its `inbound.db`."""
    _send_in(os.path.join(session_root, "work"), AGENT_SOCK)


def host(session_root: str | os.PathLike) -> None:
    """Nudge the delivery worker the way an agent does, through the session's link
    (the runner has its own copy of this; tests use this one)."""
    _send_in(os.path.join(session_root, "work"), HOST_LINK)


def _sock() -> socket.socket:
    global _sender
    if _sender is None or _sender[0] != os.getpid():  # never share one across a fork
        _sender = (os.getpid(), socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC))
    return _sender[1]


@contextmanager
def _addressable(addr: str) -> Iterator[str]:
    """`addr`, or the same socket through its folder's fd when the path is too long for
    sun_path."""
    if len(os.fsencode(addr)) <= SUN_PATH_MAX:
        yield addr
        return
    folder, name = os.path.split(addr)
    fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def _send(addr: str) -> None:
    try:
        with _addressable(addr) as a:
            _sock().sendto(NUDGE, a)
    except OSError as e:
        _quiet(e)


def _send_in(folder: str | os.PathLike, name: str) -> None:
    """Send to `name` in a folder the agent controls: no symlink is followed and the
    entry must be a socket (else an agent could aim the host at any socket it likes)."""
    from nanoclaw import hostile

    try:
        with hostile.Folder.open(folder) as f, f.socket_address(name) as addr:
            if addr is not None:
                _sock().sendto(NUDGE, addr)
    except (OSError, ValueError) as e:
        if isinstance(e, OSError):
            _quiet(e)


def _quiet(e: OSError, what: str = "wake-up nudge not sent") -> None:
    if e.errno not in EXPECTED and e.errno not in _warned:
        _warned.add(e.errno or 0)  # say it once per kind; polling covers for it
        logger.warning("{} ({}); relying on polling", what, e)


def advertise(where: Any, session_root: str | os.PathLike) -> None:
    """Link the delivery worker's socket into a session's `work/` as `.nudge-host.sock`
    (a hard link, kept to the live socket's inode). Best effort: without it, delivery
    polls."""
    from nanoclaw import hostile

    try:
        with hostile.Folder.open(os.path.join(session_root, "work")) as work:
            work.link(path(where, "delivery"), HOST_LINK)
    except ValueError:
        pass  # the agent made the folder something else; polling covers for it
    except OSError as e:  # EXDEV: sessions on another filesystem than data/run
        if e.errno not in (errno.EEXIST, errno.EISDIR):  # those: the agent's own doing
            _quiet(e, "delivery's nudge socket not linked into a session folder")


# ---- receiving ----------------------------------------------------------------------
class Listener:
    """A worker's bound nudge socket."""

    def __init__(self, sock: socket.socket, where: Path, ino: int):
        self.sock, self.path, self.ino = sock, where, ino
        _live.add(self)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> int:
        """Read every pending nudge; returns how many there were."""
        n = 0
        while True:
            try:
                self.sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return n
            except OSError:
                return n
            n += 1

    def close(self) -> None:
        """Close, and remove the socket file unless a newer worker has bound it since."""
        unlink_if_ours(self.path, self.ino)
        self._close_fd()

    def _close_fd(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def listen(where: Any, name: str, mode: int = 0o600) -> Listener | None:
    """Bind `data/run/nudge/<name>.sock` (replacing a stale one a killed worker left).
    None, with a warning, when it cannot be bound: the worker then just polls."""
    p = path(where, name)
    s = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        s = socket.socket(socket.AF_UNIX,
                          socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        with _addressable(os.fspath(p)) as a:
            s.bind(a)
        os.chmod(p, mode)
        return Listener(s, p, os.stat(p).st_ino)
    except OSError as e:
        if s is not None:
            s.close()
        logger.warning("nudge socket {} not available ({}); polling only", p, e)
        return None


class Waiter:
    """What a synchronous worker sleeps on: its nudge socket (if any) and a signal pipe
    (`signal.set_wakeup_fd`), so a nudge or a stop signal ends the sleep at once.

    At most one nudged wake per `min_gap` seconds: a flood of nudges (the delivery
    socket is reachable from sandboxes) becomes polling at `min_gap`, never a busy loop.
    """

    def __init__(self, listener: Listener | None, min_gap: float = MIN_GAP,
                 signals: bool = True):
        self.listener, self.min_gap = listener, min_gap
        self.last_nudge = float("-inf")
        self._poll = select.poll()
        self._pipe: tuple[int, int] | None = None
        if listener is not None:
            self._poll.register(listener.fileno(), select.POLLIN)
        if signals:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            except ValueError:  # not the main thread: step through long sleeps instead
                os.close(r)
                os.close(w)
            else:
                self._pipe = (r, w)
                self._poll.register(r, select.POLLIN)
        _live.add(self)

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds; True when a nudge or a signal ended it early."""
        if self._pipe is None:
            timeout = min(timeout, NO_SIGNAL_STEP)
        events = self._poll.poll(max(0.0, timeout) * 1000.0)
        if not events:
            return False
        if self._pipe is not None:
            _drain_fd(self._pipe[0])
        if self.listener is not None and self.listener.drain():
            now = time.monotonic()
            early = self.last_nudge + self.min_gap - now
            if early > 0:
                time.sleep(early)
                self.listener.drain()
            self.last_nudge = max(now, self.last_nudge + self.min_gap)
        return True

    def close(self) -> None:
        self._release()
        if self.listener is not None:
            self.listener.close()

    def _release(self) -> None:
        """Undo the signal wake-up fd and close the pipe (also in a forked child)."""
        if self._pipe is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
            for fd in self._pipe:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._pipe = None


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except OSError:  # EAGAIN: empty
        pass


def _after_fork_in_child() -> None:
    """A forked worker must not keep its parent's sockets, pipe or signal wake-up fd."""
    for obj in list(_live):
        if isinstance(obj, Waiter):
            obj._release()
        else:
            obj._close_fd()
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Poller:
    """Short interval right after activity, growing to `slow` after `linger` seconds of
    nothing: fast turns when busy, near-zero CPU when idle."""

    @classmethod
    def for_settings(cls, settings: Settings, nudged: bool) -> "Poller":
        """Nudged, a worker can sleep long when idle (a writer wakes it); else it backs
        off only to `poll_max`, the latency a write may wait."""
        if nudged:
            return cls(settings.poll_min, max(settings.poll_idle, settings.poll_max),
                       NUDGED_LINGER)
        return cls(settings.poll_min, settings.poll_max)

    def __init__(self, fast: float, slow: float, linger: float = 2.0):
        self.fast, self.slow, self.linger = fast, slow, linger
        self.last_work = 0.0
        self.interval = fast

    def next(self, did_work: bool, now: float) -> float:
        if did_work:
            self.last_work = now
            self.interval = self.fast
        elif now - self.last_work > self.linger:
            self.interval = min(self.slow, self.interval * 1.5)
        return self.interval
