"""`nanoclaw run`: the parent that forks one process per concern and keeps them alive.

Start-up: scrub secrets from our own environment (re-exec, secrets passed on a pipe),
take the data-dir lock, apply the host breaker, open and migrate the DB, create the
default agent on a fresh `data/`, then supervise (each worker restarted on its kind's
schedule, `registry.restart_kind`). SIGTERM/SIGINT stop every worker
(TERM, grace, KILL, reap), reset the breaker counts and exit 0.

Between ticks it sleeps until the supervisor's next due time, a worker's exit (SIGCHLD),
a stop signal or a nudge from `nanoclaw workers …` (`nudge.send(…, "host")`).
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import Any

from nanoclaw import config, log, nudge
from nanoclaw.breaker import HostBreaker
from nanoclaw.config import SECRET_ENV, Settings
from nanoclaw.db.central import connect
from nanoclaw.db.store import Store
from nanoclaw.errors import DataError
from nanoclaw.host.registry import make_worker, restart_kind, worker_names
from nanoclaw.host.runner import die_with_parent, last_beat, set_process_name
from nanoclaw.host.runner import run as run_worker
from nanoclaw.host.supervisor import Supervisor
from nanoclaw.log import logger

SECRET_FD_ENV = "NANOCLAW_SECRET_FD"
_SECRETS: dict[str, str] = {}


def scrub_environment(argv: list[str]) -> None:
    """If a secret is in our environment, re-exec without it (it would otherwise show in
    /proc/<pid>/environ of every forked worker), passing the values on a pipe."""
    found = {k: os.environ[k] for k in config.secret_names() if os.environ.get(k)}
    if found:
        r, w = os.pipe()
        os.write(w, json.dumps(found).encode())
        os.close(w)
        os.set_inheritable(r, True)
        env = config.scrubbed_env({SECRET_FD_ENV: str(r)})
        os.execve(sys.executable, [sys.executable, "-m", "nanoclaw", *argv], env)
    fd = os.environ.pop(SECRET_FD_ENV, None)
    if fd is not None:
        with os.fdopen(int(fd), "rb") as f:
            _SECRETS.update(json.loads(f.read() or b"{}"))


class ForkedProc:
    """A worker process: forked (cheap, shares the parent's pages), own process group,
    dies with the orchestrator, secrets dropped unless it is the broker."""

    ctx = multiprocessing.get_context("fork")

    def __init__(self, name: str, settings: Settings):
        self.proc = self.ctx.Process(target=_child_main, args=(name, settings), name=name,
                                     daemon=False)
        self.proc.start()
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.exitcode

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class Spawner:
    """Forks workers with the orchestrator's own DB connection closed, reopened once the
    child exists (habit 8). SQLite forbids carrying a connection across fork: a worker
    would inherit the handle's fds and SQLite's per-process file state, and its own new
    connection would share both (the -shm map and the lock counts the parent holds, not
    it). Closing first leaves the child nothing of ours. `reopened` counts the swaps:
    `PRAGMA data_version` only compares within one connection."""

    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self.reopened = 0

    def __call__(self, name: str) -> ForkedProc:
        self.store.conn.close()
        try:
            return ForkedProc(name, self.settings)
        finally:  # a failed reopen leaves it closed: the next write stops the host loudly
            self.store.conn = connect(self.settings.db_path)
            self.reopened += 1


def _child_main(name: str, settings: Settings) -> None:
    os.setpgid(0, 0)
    die_with_parent()
    set_process_name(f"nc-{name}")
    if os.getppid() == 1:
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    secrets = dict(_SECRETS)
    _SECRETS.clear()
    if name == "broker":
        settings = settings.model_copy(update={
            "anthropic_api_key": secrets.get("ANTHROPIC_API_KEY") or settings.anthropic_api_key,
            "claude_code_oauth_token": secrets.get("CLAUDE_CODE_OAUTH_TOKEN")
            or settings.claude_code_oauth_token,
            "openai_api_key": secrets.get("OPENAI_API_KEY") or settings.openai_api_key,
        }).with_upstream_keys({k: v for k, v in secrets.items() if k not in SECRET_ENV})
    else:
        settings = settings.model_copy(update={"anthropic_api_key": "",
                                               "claude_code_oauth_token": "",
                                               "openai_api_key": ""})
    log.setup(name, settings.logs_dir, settings.log_level, stderr=True,
              rotate_mb=settings.log_rotate_mb, keep=settings.log_keep)
    sys.exit(run_worker(make_worker(name, settings)))


def private_dirs(settings: Settings) -> None:
    """`data/` (every conversation, the web token) and `logs/` are the host user's
    alone: 0700, made so or, from an older install, changed so at every start, so no
    other local user reaches anything under them whatever its own mode (H4). Sandboxes
    are unaffected: their mounts are made by root or by the host's own user."""
    for d in (settings.data_dir, settings.logs_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if d.stat().st_mode & 0o777 != 0o700:
            os.chmod(d, 0o700)


def lock_data_dir(settings: Settings) -> Any:
    """One host per data directory: a second `nanoclaw run` stops with a clear line."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    f = open(settings.data_dir / "host.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataError(f"another host is already running on {settings.data_dir}") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def preload(names: list[str]) -> None:
    """Import the large library two workers share (aiohttp: the broker and the web chat)
    before forking, then freeze what is loaded out of the garbage collector, so the
    workers share those pages with the host instead of each holding its own copy
    (host PSS 123 → 100 MB)."""
    import gc
    import importlib

    if "broker" in names or "channel:web" in names:
        try:
            importlib.import_module("aiohttp.web")
        except ImportError as e:  # the worker itself reports it properly
            logger.warning("preloading aiohttp failed: {}", e)
    gc.freeze()


def run_host(settings: Settings, *, tick: float = 0.1) -> int:
    try:
        private_dirs(settings)
    except OSError as e:  # before the log exists: the terminal is all there is
        print(f"nanoclaw: cannot start: {e}", file=sys.stderr)
        return 2
    log.setup("host", settings.logs_dir, settings.log_level,
              rotate_mb=settings.log_rotate_mb, keep=settings.log_keep)
    problem = settings.agent_uid_problem()
    if problem:
        logger.error("cannot start: {}", problem)
        return 2
    try:
        lock = lock_data_dir(settings)
    except (DataError, OSError) as e:
        logger.error("cannot start: {}", e)
        return 2
    breaker = HostBreaker(settings.breaker_file)
    attempt, delay = breaker.enter(time.time())
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
    if delay:
        logger.warning("host restarted {} times within an hour (unclean shutdowns);"
                       " waiting {:.0f}s before starting", attempt - 1, delay)
        deadline = time.time() + delay
        while time.time() < deadline and not stop["flag"]:
            time.sleep(0.2)
    try:
        store = Store.open(settings.data_dir)
        from nanoclaw.agents.groups import ensure_defaults

        ensure_defaults(store, settings)
    except DataError as e:
        logger.error("cannot start: {}", e)
        return 2
    names = worker_names(settings)
    preload(names)
    spawn = Spawner(settings, store)
    sup = Supervisor(names, spawn, time.time, store, grace=settings.stop_grace,
                     hung_after=settings.worker_hung_after,
                     beats=lambda name: last_beat(settings, name), kind=restart_kind)
    logger.info("host started (pid {}): workers {}", os.getpid(), ", ".join(names))
    if settings.container_network == "host":
        logger.warning("NANOCLAW_CONTAINER_NETWORK=host: sandboxes share the host's network"
                       " (every port it listens on, the local network, cloud metadata); the"
                       " egress door and the groups' web policies do not apply")
    listener = nudge.listen(settings, "host")
    waiter = nudge.Waiter(listener)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only so a worker's exit wakes the waiter
    idle = max(tick, settings.poll_idle) if listener is not None else tick
    version = (spawn.reopened, store.version())
    while not stop["flag"]:
        sup.tick()
        v = (spawn.reopened, store.version())
        if v != version:
            version = v
            for req in store.take_worker_requests():
                err = sup.request(req["worker"], req["action"])
                if err:
                    logger.warning("worker request ignored: {}", err)
                else:
                    logger.info("worker {}: {} requested", req["worker"], req["action"])
        due = sup.next_due()
        now = time.time()
        waiter.wait(idle if due is None else min(idle, max(0.0, due - now) + 0.001))
    waiter.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    logger.info("stopping")
    sup.stop_all()
    deadline = time.time() + settings.stop_grace + 1
    while sup.running() and time.time() < deadline:
        sup.tick()
        time.sleep(0.02)
    if sup.running():
        sup.kill_all()
        time.sleep(0.1)
        sup.tick()
    sup.reset_counts()
    breaker.reset()
    store.close()
    lock.close()
    logger.info("host stopped")
    return 0
