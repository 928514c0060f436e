"""The credential broker: the only process that holds the API key.

Agents get `ANTHROPIC_BASE_URL` pointing here and a per-session token. The broker
looks the token up (hashed) among running sessions, refuses anything else with 401,
swaps in the real credential and forwards to the upstream, streaming the answer back
chunk by chunk (SSE passes through unbuffered).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
from aiohttp import web

from nanoclaw.config import Settings
from nanoclaw.containers import token_hash
from nanoclaw.log import logger
from nanoclaw.store import Store

HOP = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-authorization", "proxy-authenticate", "content-length", "x-api-key",
       "authorization", "accept-encoding"}


def pick_port(preferred: int = 0) -> int:
    """The preferred port if it is free, else any free port on 127.0.0.1. Agents keep
    the broker's URL for their lifetime, so a restarted broker must come back on the
    same port (SO_REUSEADDR: the old connections may still sit in TIME_WAIT)."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise OSError("no free port for the broker")


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}},
                             status=status)


class Broker:
    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self.session: aiohttp.ClientSession | None = None

    def credential_headers(self) -> dict[str, str]:
        if self.settings.anthropic_api_key:
            return {"x-api-key": self.settings.anthropic_api_key}
        if self.settings.claude_code_oauth_token:
            return {"authorization": f"Bearer {self.settings.claude_code_oauth_token}"}
        return {}

    def authenticate(self, request: web.Request) -> dict[str, Any] | None:
        token = request.headers.get("x-api-key", "")
        auth = request.headers.get("authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        if not token:
            return None
        return self.store.session_for_token(token_hash(token))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        session = self.authenticate(request)
        if session is None:
            logger.warning("refused a request with an unknown token ({} {})", request.method,
                           request.path)
            return _error(401, "authentication_error", "invalid session token")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers.update(self.credential_headers())
        url = self.settings.anthropic_base_url + request.path_qs
        body = await request.read()
        assert self.session is not None
        try:
            async with self.session.request(request.method, url, headers=headers, data=body,
                                            allow_redirects=False) as up:
                resp = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.lower() not in HOP
                    and k.lower() != "content-encoding"})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            logger.error("upstream {} unreachable: {}", self.settings.anthropic_base_url, e)
            return _error(502, "api_error", f"the host could not reach the model API: {e}")

    async def serve(self, stop: asyncio.Event) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600),
            auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = self.settings.broker_port or int(self.store.get_state("broker_port") or 0)
        chosen = pick_port(port)
        if port and chosen != port:
            logger.error("broker port {} is taken; moved to {} (running agents lose the model"
                         " until they restart)", port, chosen)
        port = chosen
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.store.set_state("broker_port", str(port))
        self.store.set_state("broker_url", f"http://127.0.0.1:{port}")
        if not self.credential_headers():
            logger.warning("no ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN set: requests are"
                           " forwarded without a credential")
        logger.info("broker listening on 127.0.0.1:{} → {}", port,
                    self.settings.anthropic_base_url)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await self.session.close()
