"""A fake Anthropic Messages API on 127.0.0.1, so the real clients run offline.

The `anthropic` SDK and the Claude Code CLI talk to it exactly as they would to the real
API (facts it honours: shared/reference/anthropic-api-fake.md): SSE for streaming,
JSON errors with the right status, both auth headers, Nagle off so a round trip costs a
few ms. Replies are scripted and deterministic, every request is recorded (with the
time it arrived, `received_at`), and errors, delays and dropped connections can be
injected in-process or over HTTP (`/_fake/*`).
Token counts are estimated (4 characters a token); in-process, `context_tokens` makes a
longer request fail as the real API does ("prompt is too long", HTTP 400), and
`extra_input_tokens` inflates the usage a reply reports (a conversation that looks long).

Here: the server's state (recorded requests, injections) and its thread. The request
handler is `fake_http.py`, the scripted replies and their wire form `fake_replies.py`.

Run standalone: `python -m nanoclaw.devtools.fake_model --port 0 [--delay-ms D]`.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from nanoclaw.devtools.fake_http import Handler


@dataclass
class Injection:
    """One scripted misbehaviour, applied to the next `count` API requests."""

    count: int = 1
    status: int | None = None
    retry_after: float | None = None
    delay_ms: int = 0
    drop: bool = False
    message: str | None = None
    stall_ms: int = 0  # fake_openai: stream the head, then go silent this long


# --- the server --------------------------------------------------------------------------

class FakeModel:
    """The fake API server; `start()` serves on a daemon thread until `stop()`."""

    handler: type = Handler  # the request handler (fake_openai.py serves another API)

    def __init__(self, port: int = 0, delay_ms: int = 0, reply: str | None = None) -> None:
        self.port = port
        self.delay_ms = delay_ms
        self.reply = reply
        self.context_tokens: int | None = None  # longer requests fail: "prompt is too long"
        self.extra_input_tokens = 0             # added to the input usage replies report
        self.requests: list[dict[str, Any]] = []
        self._injections: list[Injection] = []
        self._lock = threading.RLock()  # re-entrant: handlers call helpers that lock too
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeModel":
        handler = type("Handler", (self.handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-model",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def inject(self, status: int | None = None, count: int = 1, retry_after: float | None = None,
               delay_ms: int = 0, drop: bool = False, message: str | None = None,
               stall_ms: int = 0) -> None:
        """Make the next `count` API requests fail, wait or drop (queued in order)."""
        if status == 429 and retry_after is None:
            retry_after = 1
        with self._lock:
            self._injections.append(Injection(count, status, retry_after, delay_ms, drop, message,
                                              stall_ms))

    def clear(self) -> None:
        """Forget recorded requests and pending injections."""
        with self._lock:
            self.requests.clear()
            self._injections.clear()

    def next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def record(self, entry: dict[str, Any]) -> None:
        """Keep one request; `received_at` (epoch seconds) is when its body had arrived
        (the bench lines it up with the host's timestamped rows)."""
        entry.setdefault("received_at", time.time())
        with self._lock:
            self.requests.append(entry)

    def take_injection(self) -> Injection | None:
        with self._lock:
            if not self._injections:
                return None
            inj = self._injections[0]
            inj.count -= 1
            if inj.count <= 0:
                self._injections.pop(0)
            return inj


def main(argv: list[str] | None = None) -> int:
    return serve(FakeModel, "Fake Anthropic Messages API on 127.0.0.1", argv)


def serve(cls: type[FakeModel], description: str, argv: list[str] | None) -> int:
    """Run one fake (this one, or `fake_openai`'s) as a process until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=int, default=0, help="added to every API answer")
    parser.add_argument("--reply", default=None, help="fixed reply text instead of the echo")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fake = cls(port=args.port, delay_ms=args.delay_ms, reply=args.reply).start()
    print(f"listening on {fake.url}", flush=True)
    while not stop.wait(0.5):
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
