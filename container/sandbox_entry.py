"""Sandbox entry (`python -m sandbox_entry`): reach the broker, then run the agent runner.

With the default network `none` a sandbox has no network at all, only loopback. The
host mounts the broker's unix socket at `$NANOCLAW_BROKER_SOCKET`; this module relays a
127.0.0.1 port inside the sandbox to it and points `ANTHROPIC_BASE_URL` there, so every
HTTP client (the `anthropic` SDK, the Claude Code CLI) works unchanged and nothing but
the broker is reachable. The relay is a few threads in the runner's own process: no
extra process, nothing to supervise. Without the variable this just runs the runner.
"""

from __future__ import annotations

import os
import runpy
import socket
import threading

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


def start_relay(target: str) -> str:
    """Listen on 127.0.0.1 (any free port) and relay each connection to `target`."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    threading.Thread(target=_serve, args=(listener, target), daemon=True,
                     name="broker-relay").start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def main() -> None:
    target = os.environ.pop("NANOCLAW_BROKER_SOCKET", "")
    if target:
        os.environ["ANTHROPIC_BASE_URL"] = start_relay(target)
    runpy.run_module("agent_runner", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
