"""Wake-up nudges between the host and this agent, through the session folder.

The host sends one byte to `.nudge-agent.sock` (bound here) after it writes
`inbound.db`, so the idle loop can sleep long and still start a turn at once; this
runner sends one byte to `.nudge-host.sock` (the host's delivery worker, linked in by
the host) after it writes a reply, so the reply leaves at once. Nudges are hints, never
state: the databases stay the truth, every send is best effort and a lost nudge costs
one poll interval. The host side is `nanoclaw/nudge.py` (the runner never imports it).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import stat

log = logging.getLogger("agent_runner")

NUDGE = b"!"
HOST_LINK = ".nudge-host.sock"
AGENT_SOCK = ".nudge-agent.sock"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less its terminating NUL

_sender: tuple[int, socket.socket] | None = None


def _dgram() -> socket.socket:
    return socket.socket(socket.AF_UNIX,
                         socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


def _address(path: str) -> tuple[str, int | None]:
    """A sun_path for `path`; a long one goes through an O_PATH fd of its folder."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        return path, None
    folder, name = os.path.split(path)
    fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{name}", fd


def send_host(session_dir: str) -> None:
    """Wake the host's delivery worker: a reply is in `outbound.db`. Never raises."""
    global _sender
    try:
        if _sender is None or _sender[0] != os.getpid():
            _sender = (os.getpid(), _dgram())
        addr, fd = _address(os.path.join(session_dir, HOST_LINK))
        try:
            _sender[1].sendto(NUDGE, addr)
        finally:
            if fd is not None:
                os.close(fd)
    except OSError:  # no host socket, a full queue, …: the host polls anyway
        pass


class Waiter:
    """The loop's sleep: returns early when the host nudges (or a signal arrives).

    `nudged` is False when the socket could not be bound; the loop then keeps its short
    idle interval, since nothing would wake it."""

    def __init__(self, session_dir: str) -> None:
        self.path = os.path.join(session_dir, AGENT_SOCK)
        self.sock: socket.socket | None = None
        self.ino: int | None = None
        self._poll = select.poll()
        self._pipe: tuple[int, int] | None = None
        try:
            self._bind()
        except OSError as exc:
            log.warning("nudge socket unavailable path=%s error=%s; polling only", self.path, exc)
            if self.sock is not None:
                self.sock.close()
            self.sock = None
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            except ValueError:  # not the main thread
                os.close(r)
                os.close(w)
            else:
                self._pipe = (r, w)
                self._poll.register(r, select.POLLIN)
        except OSError:
            pass

    @property
    def nudged(self) -> bool:
        return self.sock is not None

    def _bind(self) -> None:
        self.sock = _dgram()
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode):
                os.unlink(self.path)  # a killed runner's socket
        except FileNotFoundError:
            pass
        addr, fd = _address(self.path)
        try:
            self.sock.bind(addr)
        finally:
            if fd is not None:
                os.close(fd)
        os.chmod(self.path, 0o666)  # the host may be another uid than this sandbox's user
        self.ino = os.stat(self.path).st_ino
        self._poll.register(self.sock.fileno(), select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds; True when a nudge or a signal ended it early."""
        if not self._poll.poll(max(0.0, timeout) * 1000.0):
            return False
        for fd in ([self.sock.fileno()] if self.sock else []) + (
                [self._pipe[0]] if self._pipe else []):
            try:
                while os.read(fd, 64):
                    pass
            except OSError:  # EAGAIN: drained
                pass
        return True

    def close(self) -> None:
        if self._pipe is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        if self.sock is not None:
            try:
                if os.stat(self.path).st_ino == self.ino:
                    os.unlink(self.path)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
