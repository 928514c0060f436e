"""Sandbox entry (`python -m sandbox_entry`): reach the broker, then run the agent runner.

With the default network `none` a sandbox has no network at all, only loopback. The
host mounts the broker's unix socket at `$NANOCLAW_BROKER_SOCKET`; this module relays a
127.0.0.1 port inside the sandbox to it and points `ANTHROPIC_BASE_URL` there, so every
HTTP client (the `anthropic` SDK, the Claude Code CLI) works unchanged and nothing but
the broker is reachable. The relay is a few threads in the runner's own process: no
extra process, nothing to supervise. Without the variable this just runs the runner.

The egress door (`nanoclaw/broker/egress.py`) is reached the same way: with
`$NANOCLAW_EGRESS_SOCKET` set, a second relay, and once the session is known
`HTTP_PROXY`/`HTTPS_PROXY` (and the lower-case names) point at it with the session's
token as the proxy password, `NO_PROXY` keeps the broker's relay direct. Every HTTP
client that honours those (urllib, requests, httpx, curl, Node with a proxy agent) uses
the web through the door; nothing else leaves the sandbox.

Warm start (`NANOCLAW_WARM=1`): the host starts a sandbox before any session needs it.
The runner imports everything a turn needs (the providers in `NANOCLAW_WARM_PRELOAD`),
then waits on stdin for one JSON line, `{"env": {...}, "cwd": "..."}`: the session's
environment and working folder, sent once the host has put the session's folders in
place. EOF instead means the host no longer needs this sandbox: exit 0. A cold turn
then costs no interpreter start and no SDK import.

Zygote (`NANOCLAW_ZYGOTE=1`, the process runtime): the same preload, once, then one
process serves every session: for each JSON line on stdin, `{"env", "cwd", "log"}`, it
forks a child that becomes that session's agent (its own process session, output to
`log`, then the runner as above) and answers `{"pid": N}` on stdout; when a child ends
it says `{"exit": N, "code": C}` (C negative: the signal). The children share the
zygote's imported pages copy-on-write (`gc.freeze()` keeps the collector from touching
them), so an agent is ready in milliseconds and costs only what it changes. Fork
safety: the zygote starts no thread and opens no connection or database before it
forks (it checks: a thread found makes it exit, and the host starts agents cold); each
child starts the relays itself, re-seeds `random` (Python does at fork) and opens its
own files. EOF on stdin: the host is gone or done; the zygote exits and its children
live on, each in its own process session.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import time

CHUNK = 65536


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _serve(listener: socket.socket, target: str) -> None:
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.connect(target)
        except OSError:
            conn.close()  # the client sees a connection error and retries
            up.close()
            continue
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def start_relay(target: str, name: str = "broker-relay") -> str:
    """Listen on 127.0.0.1 (any free port) and relay each connection to `target`."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    threading.Thread(target=_serve, args=(listener, target), daemon=True,
                     name=name).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
LOCAL = "127.0.0.1,localhost,::1"


def use_egress(relay: str) -> None:
    """Point every HTTP client at the egress relay, with the session's token (the
    broker's: the door looks it up the same way) as the proxy password."""
    token = os.environ.get("ANTHROPIC_API_KEY", "")
    url = relay.replace("http://", f"http://nanoclaw:{token}@", 1) if token else relay
    for name in PROXY_VARS:
        os.environ[name] = url
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = LOCAL


def preload(providers: list[str]) -> None:
    """Import the runner and the named providers' SDKs (and let each warm itself up)."""
    importlib.import_module("agent_runner.main")
    from agent_runner.providers import REGISTRY

    for name in providers:
        try:
            factory = REGISTRY.factory(name)
            warm_up = getattr(sys.modules[factory.__module__], "warm_up", None)
            if warm_up is not None:
                warm_up()
        except Exception as exc:  # the session itself will report it properly
            print(f"warm: preloading provider {name!r} failed: {exc}", file=sys.stderr)


def wait_for_session() -> bool:
    """Block until the host hands this sandbox a session; False when it never will."""
    line = sys.stdin.readline()
    if not line.strip():
        return False
    job = json.loads(line)
    os.environ.update({str(k): str(v) for k, v in job["env"].items()})
    time.tzset()  # TZ arrived with the session
    os.chdir(job.get("cwd") or os.environ.get("NANOCLAW_GROUP_DIR") or "/")
    null = os.open(os.devnull, os.O_RDONLY)  # nothing more comes on stdin
    os.dup2(null, 0)
    os.close(null)
    return True


def _say(msg: dict) -> None:
    os.write(1, (json.dumps(msg) + "\n").encode())


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _reap() -> None:
    """Report every child that ended (the host keeps its exit code)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _say({"exit": pid, "code": _exit_code(status)})


def _become_agent(job: dict, wake_r: int, wake_w: int) -> None:
    """In the forked child: a session of its own, its own output, then the runner.
    Never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.close(wake_r)
        os.close(wake_w)
        os.setsid()
        out = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        os.environ.update({str(k): str(v) for k, v in job["env"].items()})
        time.tzset()
        os.chdir(job.get("cwd") or os.environ.get("NANOCLAW_GROUP_DIR") or "/")
        for fd in [int(f) for f in os.listdir("/proc/self/fd") if int(f) > 2]:
            try:  # whatever the zygote had open (the listing's own fd is gone already)
                os.close(fd)
            except OSError:
                pass
        gc.enable()  # the zygote's objects stay frozen: collections never touch their pages
        connect()()
        runpy.run_module("agent_runner", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - said in the agent's own log, then exit 1
        print(f"zygote child failed: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def zygote() -> None:
    """Serve fork requests until stdin ends (see the module's doc)."""
    if threading.active_count() != 1:
        print(f"zygote: {threading.active_count() - 1} thread(s) running after the preload;"
              " forking would copy them half-way: not serving", file=sys.stderr)
        raise SystemExit(3)
    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _say({"ready": os.getpid()})
    buf = b""
    while True:
        try:
            ready, _, _ = select.select([0, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap()
        if 0 not in ready:
            continue
        data = os.read(0, 65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            job = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _become_agent(job, wake_r, wake_w)
            _say({"pid": pid})
        _reap()


def main() -> None:
    if os.environ.pop("NANOCLAW_ZYGOTE", "") == "1":
        gc.disable()  # no collections during the preload: fewer holes in shared pages
        preload([p for p in os.environ.pop("NANOCLAW_WARM_PRELOAD", "").split(",") if p])
        zygote()
        return
    setup = connect()
    if os.environ.pop("NANOCLAW_WARM", "") == "1":
        preload([p for p in os.environ.pop("NANOCLAW_WARM_PRELOAD", "").split(",") if p])
        if not wait_for_session():
            return
    setup()
    runpy.run_module("agent_runner", run_name="__main__", alter_sys=True)


def connect():
    """Start the relays now; the returned function points the environment at them once
    the session (its token) is known."""
    target = os.environ.pop("NANOCLAW_BROKER_SOCKET", "")
    relay = start_relay(target) if target else None
    door = os.environ.pop("NANOCLAW_EGRESS_SOCKET", "")
    egress = start_relay(door, "egress-relay") if door else None

    def setup() -> None:
        if relay:
            os.environ["ANTHROPIC_BASE_URL"] = relay
        if egress:
            use_egress(egress)

    return setup


if __name__ == "__main__":
    main()
