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
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
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


def main() -> None:
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
