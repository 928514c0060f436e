"""`nanoclaw send` and `nanoclaw chat`: a client of the host's terminal socket
(`data/cli.sock`, the `cli` channel), JSON frames one a line.

`nanoclaw send` succeeds only when a real reply arrived: a notice while the agent works
("…; retrying…") is not one. Its exit codes (README, Commands) are 0 a reply, 2 the
host refused the message, 3 no host (or none acknowledged it), 4 no reply yet within
`--wait` (the message is stored and will still be answered), 5 the agent answered with
an error; the one line on stderr names a missing or refused model key when that is the
likely cause."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

from nanoclaw.cli import credentials
from nanoclaw.cli.common import CliError, load_settings
from nanoclaw.config import Settings

EXIT_REFUSED, EXIT_NO_HOST, EXIT_NO_REPLY, EXIT_ERROR_REPLY = 2, 3, 4, 5


def _connect(settings: Settings) -> socket.socket:
    path = str(settings.cli_socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise CliError(f"no host is running (no socket at {path}); start it with: make run",
                       EXIT_NO_HOST)
    except ConnectionRefusedError:
        raise CliError(f"no host is answering on {path}; start it with: make run",
                       EXIT_NO_HOST)
    except PermissionError:
        raise CliError(f"not allowed to use {path} (it belongs to the host's user)")
    return sock


class Lines:
    """Read JSON frames from a socket with a deadline."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def next(self, deadline: float | None) -> dict | None:
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.time()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                raise ConnectionError("the host closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def cmd_send(args: argparse.Namespace) -> int:
    """Send, then wait for the reply. Delivery to the host is at least once: on a lost
    connection or a missing ack the same id is sent again, which the host ignores if it
    already stored it; replies are matched by that id."""
    from nanoclaw.util import new_id

    s = load_settings()
    mid = new_id("cli")
    frame = (json.dumps({"type": "message", "text": args.text, "chat": args.chat, "id": mid})
             + "\n").encode()
    end = time.time() + max(args.wait, 10.0)
    acked, tries, last = False, 0, ""
    while True:
        tries += 1
        try:
            try:
                sock = _connect(s)
            except CliError:
                if tries == 1:
                    raise  # no host at all: say so at once
                raise ConnectionError("host not answering yet") from None
            sock.sendall(frame)
            lines = Lines(sock)
            while True:
                f = lines.next(min(end, time.time() + 3.0) if not acked else end)
                if f is None:
                    if acked:
                        said = f" (the agent said only: {last[:200]!r})" if last else ""
                        raise CliError(f"no reply within {args.wait:g}s{said}; the message is"
                                       " stored (see `nanoclaw status` and"
                                       f" logs/nanoclaw.error.log){_hint(s, last)}",
                                       EXIT_NO_REPLY)
                    break  # no ack yet: send again
                if f.get("type") == "error":
                    raise CliError(f"refused: {f.get('error')}", EXIT_REFUSED)
                if f.get("type") == "ack" and f.get("id") == mid:
                    acked = True
                    if args.wait <= 0:
                        print(f"sent ({mid})")
                        return 0
                elif f.get("type") == "reply" and f.get("in_reply_to") == mid:
                    kind = f.get("kind", "reply")
                    if kind == "notice":  # the agent is still at it: keep waiting
                        last = str(f.get("text", ""))
                        continue
                    if kind == "error":
                        text = str(f.get("text", "")).removeprefix("Error:").strip()
                        raise CliError(f"the agent answered with an error: {text[:400]}"
                                       f"{_hint(s, text)}", EXIT_ERROR_REPLY)
                    print(f.get("text", ""))
                    return 0
        except OSError:
            pass  # connection lost: reconnect and send the same id again
        if time.time() >= end:
            raise CliError("the host did not acknowledge the message", EXIT_NO_HOST)
        time.sleep(0.2)


def _hint(settings: Settings, said: str) -> str:
    """The likely cause, when it is the model key: missing here, or refused upstream."""
    problem = credentials.missing(settings)
    if problem:
        return f"; {problem}: {credentials.WAYS_ON}"
    low = said.lower()
    if "nanoclaw doctor" in low:  # the message says it already
        return ""
    if any(w in low for w in ("401", "403", "authentication", "api key", "key was refused")):
        return (f"; the model API refused the key: check {credentials.key_name(settings)}"
                " (nanoclaw doctor)")
    return ""


def cmd_chat(args: argparse.Namespace) -> int:
    import threading

    s = load_settings()
    sock = _connect(s)
    sock.sendall((json.dumps({"type": "subscribe", "chat": args.chat}) + "\n").encode())
    seen: set[str] = set()
    lines = Lines(sock)

    def reader() -> None:
        try:
            while True:
                f = lines.next(None)
                if f is None:
                    continue
                if f.get("type") == "reply" and f.get("id") not in seen:
                    seen.add(f["id"])
                    print(f"\r{f.get('text', '')}\n> ", end="", flush=True)
                elif f.get("type") == "error":
                    print(f"\rerror: {f.get('error')}\n> ", end="", flush=True)
        except (CliError, OSError, ValueError):
            print("\r(the host closed the connection)")
            os._exit(1)

    threading.Thread(target=reader, daemon=True).start()
    print(f"chatting on '{args.chat}' (Ctrl-D to quit)")
    try:
        while True:
            text = input("> ")
            if text.strip():
                sock.sendall((json.dumps({"type": "message", "text": text, "chat": args.chat})
                              + "\n").encode())
    except (EOFError, KeyboardInterrupt):
        print()
    return 0
