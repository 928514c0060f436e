"""What every fake platform shares: an aiohttp app on 127.0.0.1 in its own thread and
event loop, a record of every call, and scripted misbehaviour (`inject`): an HTTP
status (with `retry_after` for 429s), a stall (the request hangs until released), or a
dropped connection, for the next `count` calls of a method that match some parameters;
an error may carry the platform's own `description`. A `land_then_stall` rule lets the
call do what it does (the message is posted) and then holds its answer until released:
the client never learns that it landed, as when a crash or a timeout cuts it off."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web


HOLD = web.RequestKey("land_then_stall", bool)  # this request's answer is held back


@dataclass
class Rule:
    method: str
    count: int = 1
    status: int | None = None
    retry_after: float | None = None
    stall: bool = False
    drop: bool = False
    land_then_stall: bool = False
    match: dict[str, Any] = field(default_factory=dict)
    hits: int = 0
    description: str | None = None


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float
    outcome: str = "ok"  # ok | injected:<status> | stalled | dropped | landed-stalled


class FakeServer:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self._ready = threading.Event()
        self._release: asyncio.Event | None = None

    # ---- lifecycle --------------------------------------------------------------------
    def app(self) -> web.Application:
        raise NotImplementedError

    def start(self) -> "FakeServer":
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def _serve(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._release = asyncio.Event()
        app = self.app()
        app.middlewares.append(self._hold_answer)
        self.runner = web.AppRunner(app, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def stop(self) -> None:
        if self.loop is None:
            return
        self.release()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the server's loop from a test thread."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn, *args)

    # ---- misbehaviour -----------------------------------------------------------------
    def inject(self, method: str, count: int = 1, status: int | None = None,
               retry_after: float | None = None, stall: bool = False, drop: bool = False,
               description: str | None = None, land_then_stall: bool = False,
               **match: Any) -> Rule:
        rule = Rule(method, count, status, retry_after, stall, drop, land_then_stall, match,
                    description=description)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
        self.release()

    def release(self) -> None:
        """End every stalled request (their clients have usually given up already)."""
        if self.loop is not None and self._release is not None:
            def _rel() -> None:
                self._release.set()  # type: ignore[union-attr]
                self._release = asyncio.Event()
            self.loop.call_soon_threadsafe(_rel)

    def take(self, method: str, params: dict[str, Any]) -> Rule | None:
        with self.lock:
            for r in self.rules:
                if r.count > 0 and r.method in (method, "*") and all(
                        str(params.get(k)) == str(v) for k, v in r.match.items()):
                    r.count -= 1
                    r.hits += 1
                    return r
        return None

    def record(self, method: str, params: dict[str, Any], outcome: str = "ok") -> Call:
        c = Call(method, params, time.time(), outcome)
        with self.lock:
            self.calls.append(c)
        return c

    async def misbehave(self, request: web.Request, method: str, params: dict[str, Any],
                        error: Callable[..., web.Response]) -> web.StreamResponse | None:
        """Apply an injected rule, if one matches: returns the response to send, or None."""
        rule = self.take(method, params)
        if rule is None:
            return None
        if rule.land_then_stall:  # done as usual; `_hold_answer` keeps the answer back
            request[HOLD] = True
            return None
        if rule.stall:
            self.record(method, params, "stalled")
            await self._released()
            return web.Response(status=504)  # the client gave up long ago
        if rule.drop:
            self.record(method, params, "dropped")
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never reaches the client
        self.record(method, params, f"injected:{rule.status}")
        if rule.description is not None:
            return error(rule.status or 500, rule.retry_after, description=rule.description)
        return error(rule.status or 500, rule.retry_after)

    async def _released(self) -> None:
        """Until `release()` (or ten minutes: the client has given up long before)."""
        release = self._release
        assert release is not None
        try:
            await asyncio.wait_for(release.wait(), 600)
        except asyncio.TimeoutError:
            pass

    @web.middleware
    async def _hold_answer(self, request: web.Request, handler: Callable[..., Any]) -> Any:
        response = await handler(request)
        if request.get(HOLD):
            await self._released()
            if request.transport is not None:
                request.transport.abort()  # the answer is lost with the connection
        return response

    # ---- queries ----------------------------------------------------------------------
    def calls_of(self, method: str, outcome: str | None = "ok") -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.method == method
                    and (outcome is None or c.outcome == outcome)]
