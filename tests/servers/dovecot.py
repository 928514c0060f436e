"""A private Dovecot (Debian's `dovecot-imapd`, 2.3) for the email tests: its own config,
mail, sockets and log in a temporary directory, IMAP on 127.0.0.1 at a free port, plain
text logins (`ssl = no`: loopback only), users in a passwd-file.

It runs as root and as an ordinary user: as root the login processes run as `nobody`
(Dovecot refuses root there) and so does the mail, in a directory given to `nobody`; as
anyone else every process is that user (its group owns the internal sockets, and the
login process is not chrooted, which needs root). Started in the foreground (`-F`), ready once it
answers an IMAP greeting (bounded), stopped with TERM then KILL. `deliver` appends a
message to a user's INBOX as the receiving server would (the test adds the
Authentication-Results header that server would have added)."""

from __future__ import annotations

import grp
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"

CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
default_login_user = {login}
default_internal_user = {internal}
{extra}first_valid_uid = 1
mail_location = maildir:{root}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""


def available() -> bool:
    return os.path.exists(DOVECOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dovecot:
    def __init__(self, users: dict[str, str]):
        self.users = dict(users)
        self.root = Path(tempfile.mkdtemp(prefix="nc-dovecot-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def _identity(self) -> tuple[str, int, int]:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            return "nobody", nobody.pw_uid, nobody.pw_gid
        me = pwd.getpwuid(os.geteuid())
        return me.pw_name, me.pw_uid, me.pw_gid

    def start(self, timeout: float = 15.0) -> "Dovecot":
        name, uid, gid = self._identity()
        os.chmod(self.root, 0o755)
        for d in ("run", "state", "mail"):
            (self.root / d).mkdir()
        if os.geteuid() == 0:
            os.chown(self.root / "mail", uid, gid)
        (self.root / "users").write_text("".join(
            f"{u}:{{PLAIN}}{p}:{uid}:{gid}::{self.root}/mail/{u}\n"
            for u, p in self.users.items()))
        internal = "root" if os.geteuid() == 0 else name
        # as a user, the internal sockets' group must be one of ours (not `dovecot`)
        extra = "" if os.geteuid() == 0 else \
            f"default_internal_group = {grp.getgrgid(gid).gr_name}\n"
        (self.root / "dovecot.conf").write_text(CONF.format(
            root=self.root, login=name, internal=internal, port=self.port, extra=extra))
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.root / "dovecot.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.proc.stderr.read().decode()[-2000:]}"
                                   f"\n{self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                    s.settimeout(1.0)
                    if s.recv(64).startswith(b"* OK"):
                        return self
            except OSError:
                time.sleep(0.05)
        log = self.log()
        self.stop()
        raise RuntimeError(f"dovecot did not answer within {timeout}s\n{log[-2000:]}")

    def log(self) -> str:
        try:
            return (self.root / "dovecot.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- the mailbox, from outside --------------------------------------------------------
    def imap(self, user: str) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        c.login(user, self.users[user])
        return c

    def deliver(self, user: str, raw: bytes, mailbox: str = "INBOX") -> None:
        c = self.imap(user)
        try:
            typ, data = c.append(mailbox, None, None, raw)
            assert typ == "OK", data
        finally:
            c.logout()

    def flags(self, user: str, mailbox: str = "INBOX") -> dict[int, str]:
        """UID → its FLAGS, as the server holds them."""
        c = self.imap(user)
        try:
            c.select(mailbox, readonly=True)
            typ, data = c.uid("FETCH", "1:*", "(FLAGS)")
            out = {}
            for line in data or []:
                if not isinstance(line, bytes) or b"UID" not in line:
                    continue
                parts = line.decode().replace("(", " ").replace(")", " ").split()
                uid = int(parts[parts.index("UID") + 1])
                out[uid] = " ".join(p for p in parts if p.startswith("\\"))
            return out
        finally:
            c.logout()
