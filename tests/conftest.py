"""Shared test fixtures: a fake model on 127.0.0.1 and a real host (`nanoclaw run` as a
subprocess, process runtime, everything under tmp_path), plus a terminal client that
reconnects and records every frame it receives.

The developer's environment does not reach the tests: platform tokens, API keys and
NANOCLAW_* settings exported in the shell are removed from os.environ for the whole run
(`_scrubbed_environment`) and every host or subprocess the fixtures start gets its
environment from `clean_env()`. Only the test knobs in KEEP pass.

`@pytest.mark.slow` marks tests that wait in real time on purpose (downtime, long
sleeps): `pytest -m "not slow"` leaves them out."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-ant-test-secret-do-not-leak"

# what a developer's shell may export that must not reach a test host: settings, model
# and platform credentials (a telegram token would start a worker talking to Telegram)
SCRUB = ("NANOCLAW_", "ANTHROPIC_", "CLAUDE_", "TELEGRAM_", "DISCORD_", "SLACK_", "OPENAI_",
         "WHATSAPP_", "TEAMS_", "GOOGLE_CHAT_", "WEBEX_", "MATRIX_", "BLUEBUBBLES_", "EMAIL_",
         "RESEND_", "LINEAR_",
         "GEMINI_", "GOOGLE_API", "AWS_", "GITHUB_TOKEN", "GH_TOKEN", "HF_TOKEN")
# test knobs, not settings: which image and browser to use, whether a missing sandbox
# fails rather than skips (.ci/run), where CI's private dockerd lives
KEEP = {"NANOCLAW_REQUIRE_SANDBOXES", "NANOCLAW_IMAGE", "NANOCLAW_TEST_CHROMIUM",
        "NANOCLAW_CI_DOCKER_DIR"}


def scrubbed(name: str) -> bool:
    return name.startswith(SCRUB) and name not in KEEP


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without the developer's settings and credentials, plus `extra`: the
    environment for every host and subprocess a test starts."""
    return {**{k: v for k, v in os.environ.items() if not scrubbed(k)}, **extra}


@pytest.fixture(scope="session", autouse=True)
def _scrubbed_environment():
    """For the whole run (module-scoped fixtures too): nothing in os.environ that
    `clean_env` would drop, so in-process config.load() sees only what a test sets."""
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if scrubbed(k)]:
            mp.delenv(k)
        yield


@pytest.fixture(autouse=True)
def _no_leaked_environment(monkeypatch):
    """Per test: anything a previous test or fixture exported outside monkeypatch goes."""
    for k in [k for k in os.environ if scrubbed(k)]:
        monkeypatch.delenv(k)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "slow: waits in real time on purpose (downtime, long sleeps); "
        "deselect with -m 'not slow'")


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def fake_model():
    from nanoclaw.devtools.fake_model import FakeModel

    fake = FakeModel(port=0, delay_ms=0)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def model_server():
    """One fake model per test module (the runner and provider tests share it)."""
    from nanoclaw.devtools.fake_model import FakeModel

    fake = FakeModel(port=0).start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(model_server):
    """The module's fake model with no requests, injections or context knobs left over."""
    model_server.clear()
    yield model_server
    model_server.clear()
    model_server.context_tokens = None
    model_server.extra_input_tokens = 0


class Client:
    """A terminal-channel client: one connection per chat, reconnecting on loss."""

    def __init__(self, sock_path: Path, chat: str = "local"):
        self.path, self.chat = sock_path, chat
        self.frames: list[dict] = []
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.closed = False
        self._connect()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _connect(self) -> None:
        def attempt():
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self.path))
                s.sendall((json.dumps({"type": "subscribe", "chat": self.chat}) + "\n").encode())
                return s
            except OSError:
                return None

        self.sock = wait_for(attempt, 30, what=f"terminal socket {self.path}")

    def _read(self) -> None:
        buf = b""
        while not self.closed:
            try:
                chunk = self.sock.recv(65536)  # type: ignore[union-attr]
            except OSError:
                chunk = b""
            if not chunk:
                if self.closed:
                    return
                buf = b""
                try:
                    self._connect()
                except AssertionError:  # the host is gone for good (test teardown)
                    return
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                with self.lock:
                    self.frames.append(json.loads(line))

    def send(self, text: str, mid: str | None = None) -> str:
        mid = mid or f"t{time.time_ns()}"
        frame = {"type": "message", "text": text, "chat": self.chat, "id": mid}
        deadline = time.time() + 30
        while time.time() < deadline:  # at least once; the id makes a resend harmless
            self._try_send(frame)
            try:
                wait_for(lambda: any(f.get("type") == "ack" and f.get("id") == mid
                                     for f in self.snapshot()), 2, what=f"ack of {mid}")
                return mid
            except AssertionError:
                continue
        raise AssertionError(f"no ack of {mid}")

    def _try_send(self, frame: dict) -> bool:
        try:
            self.sock.sendall((json.dumps(frame) + "\n").encode())  # type: ignore[union-attr]
            return True
        except OSError:
            time.sleep(0.1)
            return False

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)  # type: ignore[union-attr]

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.frames)

    def replies_to(self, mid: str) -> list[dict]:
        return [f for f in self.snapshot() if f.get("type") == "reply" and f.get("in_reply_to") == mid]

    def wait_reply(self, mid: str, timeout: float = 60.0) -> dict:
        return wait_for(lambda: (self.replies_to(mid) or [None])[0], timeout,
                        what=f"reply to {mid}")

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()  # type: ignore[union-attr]
        except OSError:
            pass


class Host:
    """`nanoclaw run` in a scratch directory."""

    def __init__(self, base: Path, fake_url: str, extra_env: dict[str, str] | None = None,
                 user: int | None = None):
        self.base = base
        self.user = user  # run the host (and its CLI) as this uid instead of ours
        self.data = base / "data"
        self.env = clean_env(**{
            "NANOCLAW_DATA_DIR": str(self.data),
            "NANOCLAW_LOGS_DIR": str(base / "logs"),
            "NANOCLAW_GROUPS_DIR": str(base / "groups"),
            "NANOCLAW_RUNTIME": "process",
            "NANOCLAW_PROVIDER": "anthropic",
            "NANOCLAW_SWEEP_INTERVAL": "0.5",
            "ANTHROPIC_BASE_URL": fake_url,
            "ANTHROPIC_API_KEY": SECRET,
            **(extra_env or {}),
        })
        self.proc: subprocess.Popen | None = None
        self.clients: list[Client] = []

    @property
    def sock(self) -> Path:
        return self.data / "cli.sock"

    def start(self) -> "Host":
        self.base.mkdir(parents=True, exist_ok=True)
        self.out = open(self.base / "host.out", "ab")
        self.proc = subprocess.Popen(self._as_user([sys.executable, "-m", "nanoclaw", "run"]),
                                     cwd=self.base, env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT)
        wait_for(self.ready, 30, what="host ready")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"host exited {self.proc.returncode}:\n{self.output()}")
        ws = self.workers() if (self.data / "nanoclaw.db").exists() else []
        return bool(ws) and all(w["state"] in ("STARTING", "RUNNING") and w["pid"] for w in ws) \
            and self.sock.exists()

    def output(self) -> str:
        try:
            return (self.base / "host.out").read_text()[-5000:]
        except OSError:
            return ""

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_user([sys.executable, "-m", "nanoclaw", *args]),
                              cwd=self.base, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def _as_user(self, argv: list[str]) -> list[str]:
        if self.user is None:
            return argv
        return ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--clear-groups",
                *argv]

    def db(self):
        import sqlite3

        conn = sqlite3.connect(str(self.data / "nanoclaw.db"), timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def q(self, sql: str, args: tuple = ()) -> list[dict]:
        conn = self.db()
        try:
            return [dict(r) for r in conn.execute(sql, args)]
        finally:
            conn.close()

    def workers(self) -> list[dict]:
        try:
            return self.q("SELECT * FROM workers")
        except Exception:
            return []

    def worker_pid(self, name: str) -> int | None:
        for w in self.workers():
            if w["name"] == name:
                return w["pid"]
        return None

    def client(self, chat: str = "local") -> Client:
        c = Client(self.sock, chat)
        self.clients.append(c)
        return c

    def stop(self, timeout: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        for c in self.clients:
            c.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        # agents adopted across a kill -9 belong to no host now: stop them
        for pid in agent_pids(self.data):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def agent_pids(data_dir: Path, spares: bool = True) -> list[int]:
    """Agent processes started for this data directory (by install mark); without the
    warm pool's spares and the zygote when `spares` is false (its forked agents stay)."""
    pids = _marked(data_dir)
    if spares:
        return pids
    from nanoclaw.runtime.procfs import children
    from nanoclaw.runtime.warm import agent_roots

    out: set[int] = set()
    for root in agent_roots(set(pids)):
        out |= {root, *children(root)}
    return sorted(out & set(pids))


def _marked(data_dir: Path) -> list[int]:
    import hashlib

    mark = f"NANOCLAW_INSTALL={hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:8]}"
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if mark.encode() in env:
                out.append(int(entry))
    return out


@pytest.fixture
def host_factory(tmp_path, fake_model):
    hosts: list[Host] = []

    def make(name: str = "h", **env: str) -> Host:
        h = Host(tmp_path / name, fake_model.url, env)
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.cleanup()


@pytest.fixture
def host(host_factory) -> Host:
    return host_factory().start()


# ---- sandboxes: a real Docker engine and bubblewrap ------------------------------------
# Tests that need them skip with the reason when the engine is truly absent; under
# .ci/run (NANOCLAW_REQUIRE_SANDBOXES=1) a missing engine fails them instead.
IMAGE = os.environ.get("NANOCLAW_IMAGE", "nanoclaw-agent:latest")


def _absent(why: str) -> None:
    if os.environ.get("NANOCLAW_REQUIRE_SANDBOXES") == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def docker_client():
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as e:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        _absent(f"no Docker engine answers at {where} ({type(e).__name__}); .ci/run starts one")
    yield client
    client.close()


@pytest.fixture(scope="session")
def agent_image(docker_client) -> str:
    """The agent image, built at most once per test run (build.sh returns at once when
    the image is up to date, e.g. after .ci/run built it)."""
    r = subprocess.run([str(ROOT / "container" / "build.sh")], capture_output=True, text=True,
                       timeout=1200, env=clean_env(NANOCLAW_IMAGE=IMAGE))
    if r.returncode:
        pytest.fail(f"the agent image did not build:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return IMAGE


@pytest.fixture(scope="session")
def bwrap_works() -> None:
    from nanoclaw.runtime.bwrap import BwrapRuntime

    if not BwrapRuntime.available():
        _absent("bubblewrap is not installed or cannot create a sandbox here")


def install_label(data_dir: Path) -> str:
    import hashlib

    return "nanoclaw.install=" + hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:8]


def containers_of(client, data_dir: Path, all: bool = False, spares: bool = True) -> list:
    """The install's containers; without the warm pool's spares still waiting for a
    session when `spares` is false (a handed-over one carries its session's name)."""
    from nanoclaw.runtime.docker import spare_prefix

    found = client.containers.list(all=all, filters={"label": install_label(data_dir)})
    if spares:
        return found
    waiting = spare_prefix(install_of(data_dir))
    return [c for c in found if not c.name.startswith(waiting)]


def install_of(data_dir: Path) -> str:
    return install_label(data_dir).split("=", 1)[1]
