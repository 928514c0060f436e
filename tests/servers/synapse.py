"""A real Synapse homeserver for the Matrix tests, on 127.0.0.1, started once per test
run (`shared()`): SQLite and the media store in a scratch directory, a generated config
with no federation listener, no key servers (`trusted_key_servers: []`), no stats, no
URL previews and relaxed rate limits, so it never calls out. Users are registered with
the shared-secret admin API (`/_synapse/admin/v1/register`, HMAC over a nonce).

It runs from its own venv (`.venv-synapse`, `make test-servers`, from
tests/servers/synapse.lock); a missing venv skips the tests that need it."""

from __future__ import annotations

import atexit
import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("SYNAPSE_VENV", ROOT / ".venv-synapse")) / "bin" / "python"
SERVER_NAME = "localhost"
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even by SIGKILL (no orphan)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Account:
    user_id: str
    access_token: str
    device_id: str
    password: str


CONFIG = """\
server_name: "{server_name}"
pid_file: "{dir}/homeserver.pid"
public_baseurl: "http://127.0.0.1:{port}/"
listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: "{dir}/homeserver.db"
log_config: "{dir}/log.yaml"
media_store_path: "{dir}/media"
max_upload_size: "{max_upload}"
registration_shared_secret: "{secret}"
macaroon_secret_key: "{macaroon}"
form_secret: "{form}"
signing_key_path: "{dir}/signing.key"
report_stats: false
enable_registration: false
enable_metrics: false
url_preview_enabled: false
trusted_key_servers: []
suppress_key_server_warning: true
federation_domain_whitelist: []
presence:
  enabled: false
user_directory:
  enabled: false
rc_message: {{per_second: {rate}, burst_count: {burst}}}
rc_registration: {{per_second: 1000, burst_count: 1000}}
rc_login:
  address: {{per_second: 1000, burst_count: 1000}}
  account: {{per_second: 1000, burst_count: 1000}}
  failed_attempts: {{per_second: 1000, burst_count: 1000}}
rc_joins:
  local: {{per_second: 1000, burst_count: 1000}}
  remote: {{per_second: 1000, burst_count: 1000}}
rc_joins_per_room: {{per_second: 1000, burst_count: 1000}}
rc_invites:
  per_room: {{per_second: 1000, burst_count: 1000}}
  per_user: {{per_second: 1000, burst_count: 1000}}
  per_issuer: {{per_second: 1000, burst_count: 1000}}
rc_key_requests: {{per_second: 1000, burst_count: 1000}}
rc_admin_redaction: {{per_second: 1000, burst_count: 1000}}
rc_room_creation: {{per_second: 1000, burst_count: 1000}}
rc_media_create: {{per_second: 1000, burst_count: 1000}}
rc_delayed_event_mgmt: {{per_second: 1000, burst_count: 1000}}
rc_presence:
  per_user: {{per_second: 1000, burst_count: 1000}}
"""

LOG = """\
version: 1
formatters:
  f: {format: "%(asctime)s %(name)s %(levelname)s %(message)s"}
handlers:
  file: {class: logging.FileHandler, filename: "DIR/synapse.log", formatter: f}
root: {level: WARNING, handlers: [file]}
disable_existing_loggers: false
"""


class Synapse:
    """One Synapse process. `rate`/`burst`: the message rate limit (relaxed by default)."""

    def __init__(self, rate: float = 1000, burst: int = 1000, max_upload: str = "10M"):
        self.dir = Path(tempfile.mkdtemp(prefix="synapse-"))
        self.port = free_port()
        self.secret = secrets.token_hex(16)
        self.rate, self.burst, self.max_upload = rate, burst, max_upload
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Synapse":
        if not PYTHON.exists():
            raise FileNotFoundError(f"{PYTHON} is missing: run `make test-servers`")
        d = self.dir
        (d / "media").mkdir()
        (d / "homeserver.yaml").write_text(CONFIG.format(
            server_name=SERVER_NAME, dir=d, port=self.port, secret=self.secret,
            macaroon=secrets.token_hex(16), form=secrets.token_hex(16), rate=self.rate,
            burst=self.burst, max_upload=self.max_upload))
        (d / "log.yaml").write_text(LOG.replace("DIR", str(d)))
        # an ed25519 signing key as Synapse writes it: algorithm, version, unpadded seed
        seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
        (d / "signing.key").write_text(f"ed25519 a_test {seed}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HTTP", "http"))}
        env.update(no_proxy="*", SYNAPSE_ASYNC_IO_REACTOR="0")
        self.out = open(d / "stdout.log", "ab")
        self.proc = subprocess.Popen(
            [str(PYTHON), "-m", "synapse.app.homeserver", "-c", str(d / "homeserver.yaml")],
            cwd=d, env=env, stdout=self.out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"synapse exited {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_matrix/client/versions", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"synapse did not answer within {START_TIMEOUT:g}s: {self.log()}")

    def log(self) -> str:
        text = ""
        for name in ("stdout.log", "synapse.log"):
            try:
                text += (self.dir / name).read_text()[-3000:]
            except OSError:
                pass
        return text

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- the client-server API, plainly (for set-up; the tests' users use matrix-nio) ----
    def call(self, method: str, path: str, body: dict | None = None,
             token: str | None = None, timeout: float = 30) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:300]!r}") from None

    def register(self, localpart: str, displayname: str | None = None,
                 admin: bool = False) -> Account:
        """A new user through the shared-secret admin API (nonce, then HMAC-SHA1)."""
        password = secrets.token_hex(8)
        with self.lock:
            nonce = self.call("GET", "/_synapse/admin/v1/register")["nonce"]
            mac = hmac.new(self.secret.encode(), digestmod=hashlib.sha1)
            mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(),
                                     b"admin" if admin else b"notadmin"]))
            got = self.call("POST", "/_synapse/admin/v1/register", {
                "nonce": nonce, "username": localpart, "password": password, "admin": admin,
                "displayname": displayname or localpart, "mac": mac.hexdigest()})
        return Account(got["user_id"], got["access_token"], got["device_id"], password)


_shared: Synapse | None = None
_shared_lock = threading.Lock()


def shared() -> Synapse:
    """The one Synapse of this test run (started on first use, stopped at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Synapse().start()
            atexit.register(_shared.stop)
        return _shared
