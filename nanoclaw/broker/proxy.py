"""The credential broker: the only process that holds the API key.

Agents get `ANTHROPIC_BASE_URL` pointing here and a per-session token. The broker
looks the token up (hashed) among running sessions, refuses anything else with 401,
swaps in the real credential and forwards to the upstream, streaming the answer back
chunk by chunk (SSE passes through unbuffered).

It forwards only what it meters (`ROUTES`): `POST /v1/messages`, the one call the
`anthropic` provider and the Claude Code CLI (`?beta=true`) make, and
`POST /v1/messages/count_tokens`, which the CLI may make and the API does not bill.
Everything else, with the owner's key, could spend unmetered (batches, files), so it is
refused with a JSON error and never reaches the upstream. The check is on the request
target exactly as it arrived: a path with dot or empty segments, percent-escapes or
backslashes is refused, because a client or proxy on the way may normalise it into an
allowed one (`/v1/./messages` is `/v1/messages` upstream), and the upstream URL is built
from the checked text without re-normalising it. A query string is passed along.

It listens on 127.0.0.1 (the process runtime, sandboxes on the host network) and on a
unix socket in `data/broker/`, the only way out of a sandbox with network `none`. Token
usage is read off each model answer as it streams by (`nanoclaw/broker/usage.py`) and counted
per agent group and day (the host's timezone); a group over its daily token budget
(`container_configs.daily_token_budget`, else `NANOCLAW_DAILY_TOKEN_BUDGET`; 0 = none)
gets a JSON error whose message the runner shows the user as "Error: …", for every
route: nothing is forwarded past the budget.

More than one upstream (`nanoclaw/upstreams.py`): the bare `/v1/messages` goes to the
group's Anthropic-style upstream, `/up/NAME/<path>` to upstream NAME, by the route table
of its API (`API_ROUTES`: Chat Completions for OpenAI-style). A group reaches only its
own upstream and its fallback's (`allowed`); each gets its own credential
(`x-api-key`, or `Authorization: Bearer` for OpenAI-style) and its usage, from either
answer format, counts into the same daily budget. A streamed Chat Completions call is
made to report its usage (`stream_options.include_usage`), so an agent cannot leave it
out; an answer without any is counted by its size. A loopback upstream (Ollama on the
host) is reached the same way, so sandboxes keep network `none`.

`GET /_nanoclaw/upstream/NAME` with the check token of `host_state` (`nanoclaw doctor`)
sends one cheap request (its model list) to NAME and says how it answered.

An agent must tell this broker being down (it waits for the restart) from the model
failing (its retry policy): every answer carries `BOOT_HEADER`, the broker's own 502
carries `UPSTREAM_HEADER`, and `GET HEALTH_PATH` answers without a token
(container/agent_runner/broker.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
from aiohttp import web
from yarl import URL

from nanoclaw import upstreams
from nanoclaw.broker.usage import Meter, estimate
from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.log import logger
from nanoclaw.util import token_hash

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


# 403, not 429: the runner shows a 403's message to the user, and no client retries it.
BUDGET_STATUS = 403

# What lets an agent tell "the broker is down" from "the model failed"
# (container/agent_runner/broker.py holds the same names): every answer carries this
# broker process's boot id, so an agent sees a restart; the broker's own 502 (it could
# not reach the upstream) says so; and GET HEALTH_PATH answers without a token and is
# never forwarded, so an agent whose call got no answer can ask whether the broker is up.
BOOT_HEADER = "x-nanoclaw-broker"
UPSTREAM_HEADER = "x-nanoclaw-upstream-error"
HEALTH_PATH = "/_nanoclaw/health"
CHECK_PATH = "/_nanoclaw/upstream/{name}"
CHECK_HEADER = "x-nanoclaw-check"
CHECK_STATE = "broker_check_token"  # host_state: what `nanoclaw doctor` sends
UP_PREFIX = "/up/"


def _error(status: int, kind: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}},
                             status=status, headers=headers or None)


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at `path` that every sandbox user may connect to (paths
    past the 108-byte limit are bound through /proc/self/fd of their folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if len(str(path)) < 100:
        sock.bind(str(path))
    else:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sock.bind(f"/proc/self/fd/{fd}/{path.name}")
        finally:
            os.close(fd)
    os.chmod(path, 0o666)  # the token, not the socket, is what admits a caller
    sock.listen(128)
    return sock


@dataclass(frozen=True)
class Route:
    metered: bool  # usage is read off the answer and counted; else the call costs no tokens


# What the broker forwards, by exact (method, path); both are refused over the budget.
# POST /v1/messages: every model call of the `anthropic` provider and of the Claude Code
# CLI (which adds `?beta=true`). count_tokens: the CLI may count a prompt before sending
# it; the API does not bill it, so there is no usage to read. Not here, so refused:
# batches and files (real spend or storage outside the meter), models, anything else.
ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/v1/messages"): Route(metered=True),
    ("POST", "/v1/messages/count_tokens"): Route(metered=False),
}
# Below `/up/NAME`, by the upstream's API: paths under its base URL as its clients send
# them. OpenAI-style: chat completions (metered) and the model list (free); nothing else
# (no embeddings, images, files, fine-tuning: spend outside the meter).
API_ROUTES: dict[str, dict[tuple[str, str], Route]] = {
    "anthropic": ROUTES,
    "openai": {("POST", "/chat/completions"): Route(metered=True),
               ("GET", "/models"): Route(metered=False)},
}

# The characters a query may hold (RFC 3986's query, less `#`): it is forwarded as it came.
QUERY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")


def route(method: str, target: str, table: dict[tuple[str, str], Route] = ROUTES
          ) -> tuple[Route | None, str]:
    """The route for a raw request target (path and query as they arrived, before any
    normalisation), or None and why it is refused. Only an exact allowlisted path
    passes; the shapes a normaliser would rewrite get their own reason in the refusal."""
    path, _, query = target.partition("?")
    found = table.get((method, path))
    if found is not None and QUERY.fullmatch(query):
        return found, ""
    if found is not None:
        return None, "the query string holds characters the broker does not forward"
    if not path.startswith("/"):
        why = "the path must start with /"
    elif any(s in (".", "..") for s in path.split("/")):
        why = "dot segments (. or ..) are not forwarded"
    elif "//" in path:
        why = "empty path segments (//) are not forwarded"
    elif "%" in path:
        why = "percent-encoded bytes in the path are not forwarded"
    elif "\\" in path:
        why = "backslashes in the path are not forwarded"
    else:
        why = "only " + " and ".join(f"{m} {p}" for m, p in table) + " are forwarded"
    return None, why


def split_upstream(target: str) -> tuple[str | None, str]:
    """`/up/NAME/rest` → (NAME, `/rest`); any other target → (None, target)."""
    if not target.startswith(UP_PREFIX):
        return None, target
    name, slash, rest = target[len(UP_PREFIX):].partition("/")
    return name, slash + rest


class Broker:
    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self.upstreams = upstreams.configured(settings)
        self.check_token = secrets.token_urlsafe(24)
        self.session: aiohttp.ClientSession | None = None
        self.boot = secrets.token_hex(8)  # this process; a restarted broker has another

    async def health(self, request: web.Request) -> web.Response:
        """Up: no token needed, nothing forwarded, nothing counted."""
        return web.json_response({"ok": True})

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[BOOT_HEADER] = self.boot

    def credential_headers(self, up: upstreams.Upstream | None = None) -> dict[str, str]:
        return upstreams.credential_headers(up or self.upstreams["anthropic"], self.settings)

    def allowed(self, session: dict[str, Any]) -> tuple[str, str | None]:
        """The upstream the session's group uses and its fallback's (None: none)."""
        group = session["agent_group_id"]
        cfg = self.store.container_config(group)
        ag = self.store.agent_group(group) or {}
        provider = upstreams.group_provider(session, cfg, ag)  # as containers.py writes it
        return upstreams.group_upstreams(provider, cfg, self.settings)

    def pick(self, session: dict[str, Any], name: str | None
             ) -> tuple[upstreams.Upstream | None, str]:
        """The upstream a request goes to (a bare path: the group's Anthropic-style one),
        or None and why the group may not use it."""
        primary, fallback = self.allowed(session)
        mine = [n for n in (primary, fallback) if n]
        if name is None:
            name = next((n for n in mine if n in self.upstreams
                         and self.upstreams[n].api == "anthropic"), "anthropic")
        if name not in self.upstreams:
            return None, f"there is no upstream called {name[:40]!r}"
        if name not in mine:
            return None, (f"agent group {session['agent_group_id']} may not use upstream"
                          f" {name!r} (its upstreams: {', '.join(mine)})")
        return self.upstreams[name], ""

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
            logger.warning("refused a request with an unknown token ({} {!r})", request.method,
                           request.raw_path[:200])  # raw and repr'd: no forged log lines
            return _error(401, "authentication_error", "invalid session token")
        group = session["agent_group_id"]
        meter = None
        raw = request.raw_path  # as it arrived: aiohttp neither decodes nor normalises it
        name, target = split_upstream(raw)
        up, why = self.pick(session, name)
        if up is None:
            logger.warning("refused {} {!r} of agent group {}: {}", request.method, raw[:200],
                           group, why)
            return _error(403, "permission_error", f"NanoClaw's broker refused: {why}.",
                          **{"x-should-retry": "false"})
        found, why = route(request.method, target, API_ROUTES[up.api])
        if found is None:
            logger.warning("refused {} {!r} of agent group {}: {}", request.method,
                           raw[:200], group, why)
            return _error(404, "not_found_error",
                          f"NanoClaw's broker does not forward {request.method} {raw[:200]}:"
                          f" {why}.", **{"x-should-retry": "false"})
        refusal = self.over_budget(group)  # every route: nothing passes past the budget
        if refusal is not None:
            return refusal
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers.update(self.credential_headers(up))
        # encoded=True: yarl sends exactly the checked path and query, not a normalised
        # form (it would drop a bare `?`, so that is dropped here, where it is seen)
        path, _, query = target.partition("?")
        url = URL(up.url.rstrip("/") + path + (f"?{query}" if query else ""), encoded=True)
        body = await request.read()
        if found.metered and up.api == "openai":
            body = usage_asked(body)
        assert self.session is not None
        sent = 0
        try:
            async with self.session.request(request.method, url, headers=headers, data=body,
                                            allow_redirects=False) as answer:
                resp = web.StreamResponse(status=answer.status, headers={
                    k: v for k, v in answer.headers.items() if k.lower() not in HOP
                    and k.lower() != "content-encoding"})
                await resp.prepare(request)
                if found.metered and answer.status == 200:
                    meter = Meter(answer.headers.get("content-type", ""))
                async for chunk in answer.content.iter_any():
                    if meter is not None:
                        meter.feed(chunk)
                        sent += len(chunk)
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            logger.error("upstream {} ({}) unreachable: {}", up.name, up.url, e)
            return _error(502, "api_error", f"the host could not reach the model API"
                          f" ({up.name}): {e}", **{UPSTREAM_HEADER: "unreachable"})
        finally:  # also when the agent went away mid-stream: what was streamed was billed
            if meter is not None:
                self.record(group, meter.finish() or estimate(len(body), sent))

    # ---- the doctor's check -----------------------------------------------------------
    async def check(self, request: web.Request) -> web.Response:
        """One cheap request (the model list) to a configured upstream, with its key."""
        if not secrets.compare_digest(request.headers.get(CHECK_HEADER, ""), self.check_token):
            return _error(401, "authentication_error", "invalid check token")
        up = self.upstreams.get(request.match_info["name"])
        if up is None:
            return _error(404, "not_found_error", "no such upstream")
        url = up.url.rstrip("/") + ("/v1/models" if up.api == "anthropic" else "/models")
        headers = {**self.credential_headers(up), "anthropic-version": "2023-06-01"}
        assert self.session is not None
        try:
            async with self.session.get(url, headers=headers, allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=10)) as answer:
                text = (await answer.content.read(2000)).decode("utf-8", "replace")
                return web.json_response({"ok": answer.status == 200, "status": answer.status,
                                          "detail": text[:300]})
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return web.json_response({"ok": False, "status": None,
                                      "detail": f"{type(e).__name__}: {e}"[:300]})

    # ---- usage and budgets ------------------------------------------------------------
    def today(self) -> str:
        return datetime.now(ZoneInfo(self.settings.tz)).date().isoformat()

    def record(self, group: str, usage: dict[str, int]) -> None:
        if usage:
            try:
                self.store.add_usage(group, self.today(), usage)
            except Exception as e:  # counting must never break an answer
                logger.error("could not record token usage of {}: {}", group, e)

    def over_budget(self, group: str) -> web.Response | None:
        budget = self.store.token_budget(group)
        if budget is None:
            budget = self.settings.daily_token_budget
        if not budget:
            return None
        used = self.store.tokens_used(group, self.today())
        if used < budget:
            return None
        logger.warning("agent group {} is over its daily token budget ({} of {})", group, used,
                       budget)
        return _error(BUDGET_STATUS, "permission_error",
                      f"NanoClaw: this agent's daily token budget ({budget:,} tokens) is used up"
                      f" ({used:,} used today). It renews at midnight ({self.settings.tz}); the"
                      " host's owner can raise it.", **{"x-should-retry": "false"})

    async def serve(self, stop: asyncio.Event) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600),
            auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self._stamp)
        app.router.add_get(HEALTH_PATH, self.health, allow_head=False)  # before the catch-all
        app.router.add_get(CHECK_PATH, self.check, allow_head=False)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        # an agent that goes away cancels its upstream call; stopping waits 2 s at most
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0,
                               handler_cancellation=True)
        await runner.setup()
        port = self.settings.broker_port or int(self.store.get_state("broker_port") or 0)
        chosen = pick_port(port)
        if port and chosen != port:
            logger.error("broker port {} is taken; moved to {} (running agents lose the model"
                         " until they restart)", port, chosen)
        port = chosen
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        sock = bind_unix(self.settings.broker_socket)
        await web.SockSite(runner, sock).start()
        self.store.set_state(CHECK_STATE, self.check_token)
        self.store.set_state("broker_port", str(port))
        self.store.set_state("broker_url", f"http://127.0.0.1:{port}")
        if not self.credential_headers():
            logger.warning("no ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN set: requests are"
                           " forwarded without a credential")
        logger.info("broker listening on 127.0.0.1:{} → {}", port, ", ".join(
            f"{u.name}={u.url}" for u in self.upstreams.values()))
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await self.session.close()


def usage_asked(body: bytes) -> bytes:
    """A streamed Chat Completions request, made to end with its usage chunk
    (`stream_options.include_usage`), so the meter sees what it cost."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or not data.get("stream"):
        return body
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body
    data["stream_options"] = {**(options if isinstance(options, dict) else {}),
                              "include_usage": True}
    return json.dumps(data).encode()
