"""The egress door: how an agent in a sandbox with network `none` uses the web without
reaching the host.

An HTTP forward proxy on a unix socket beside the broker's (`data/broker/egress.sock`),
which every sandbox with network `none` already has mounted at `/run/nanoclaw`.
`container/sandbox_entry.py` relays a 127.0.0.1 port inside to it and sets
`HTTP_PROXY`/`HTTPS_PROXY` (and the lower-case names) to
`http://nanoclaw:<session token>@127.0.0.1:<port>`, `NO_PROXY` to the loopback names (the
broker's relay). Plain HTTP comes as an absolute-URI request, which the door forwards
rebuilt from its checked parts (`egress_http.py`), one request per connection; TLS
comes as `CONNECT host:port`, which the door tunnels without opening it.

Which agent group a connection belongs to is never the sandbox's word: the
`Proxy-Authorization` carries the session's broker token, looked up (hashed) among
running sessions exactly as the broker does; an unknown token gets 407.

Every request is then decided (`decide`, with `egress_policy.py`): the group's policy,
names that are never the internet, the port policy (`NANOCLAW_EGRESS_PORTS`), then every
address of the host, a literal in any spelling or each resolver answer; the door
connects to the checked address itself. The group's connections at once
(`NANOCLAW_EGRESS_CONNECTIONS`) and bytes a day (`NANOCLAW_EGRESS_DAILY_MB`) are capped.
Each destination is counted per group and day in `egress_log`, allowed or refused with
its reason (`nanoclaw usage --web`). A refusal is `403` (`407`, `429`) with the reason
in the status line and in the body, so a client's error message says why.

Redirects are the client's to follow: each follow-up is a new request through the door,
decided again. Not prevented (no TLS interception): inside a CONNECT tunnel the client
may name another host in its TLS SNI or HTTP `Host` than the one it asked for (domain
fronting on a shared CDN address); an allow list is a list of names, not a guarantee.

Its own worker (`workers/egress.py`), not the broker's: it carries hostile traffic
between agents and the internet, so it must hold no credential, and a hang or crash
here must not take the agents' model calls with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from nanoclaw.broker.egress_http import MAX_HEAD, BadRequest, Head, parse_head
from nanoclaw.broker.egress_policy import (
    IP,
    GroupPolicy,
    address_refusal,
    host_refusal,
    parse_ports,
    parse_test_allow,
    port_refusal,
)
from nanoclaw.broker.proxy import bind_unix
from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.log import logger
from nanoclaw.util import token_hash

Resolver = Callable[[str, int], Awaitable[list[IP]]]
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
RESOLVE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0  # a tunnel or answer silent this long in both directions is closed
CHUNK = 65536
LOG_DAYS = 30  # egress_log rows are kept this long


async def system_resolve(host: str, port: int) -> list[IP]:
    """Every address the system resolver gives for `host` (the door's default)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[IP] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(sockaddr[0])
            if ip not in out:
                out.append(ip)
    return out


def local_addresses() -> frozenset[IP]:
    """The host's own interface addresses (IPv4 from /proc/net/fib_trie's LOCAL routes,
    IPv6 from /proc/net/if_inet6)."""
    out: set[IP] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            last = ""
            for line in f:
                s = line.strip()
                if s.startswith("|--"):
                    last = s[3:].strip()
                elif s.startswith("/32 host LOCAL") and last:
                    with contextlib.suppress(ValueError):
                        out.add(ipaddress.IPv4Address(last))
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                h = line.split()[0]
                with contextlib.suppress(ValueError, IndexError):
                    out.add(ipaddress.IPv6Address(":".join(h[i:i + 4] for i in range(0, 32, 4))))
    except OSError:
        pass
    return frozenset(out)


class Refusal(Exception):
    """A request the door answers with `status` and the one-line `reason`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Door:
    def __init__(self, store: Store, settings: Settings, resolve: Resolver | None = None,
                 local: Callable[[], frozenset[IP]] = local_addresses):
        self.store, self.settings = store, settings
        self.resolve = resolve or system_resolve
        self.ports = parse_ports(settings.egress_ports)
        self.test_allow = parse_test_allow(settings.egress_test_allow)
        if self.test_allow:
            logger.warning("NANOCLAW_EGRESS_TEST_ALLOW is set (tests only): the egress door"
                           " lets agents reach {}", ", ".join(f"{h}:{p}" for h, p in
                                                            sorted(self.test_allow)))
        self._local = local
        self._local_at, self._local_set = 0.0, frozenset()
        self._own_at, self._own_ports = 0.0, frozenset()
        self.open: dict[str, int] = {}        # agent group → connections now
        self.used: dict[tuple[str, str], int] = {}  # (group, day) → bytes
        self.limit = int(settings.egress_daily_mb * 1024 * 1024)

    # ---- what the door knows of the host --------------------------------------------------
    def local(self) -> frozenset[IP]:
        if time.monotonic() - self._local_at > 10:
            self._local_set, self._local_at = self._local(), time.monotonic()
        return self._local_set

    def own_ports(self) -> frozenset[int]:
        """The ports NanoClaw itself listens on (broker, web chat, webhook door)."""
        if time.monotonic() - self._own_at > 5:
            ports = {self.settings.webhook_port, self.settings.broker_port}
            for key in ("broker_port", "web_url", "broker_url"):
                v = self.store.get_state(key) or ""
                tail = v.rstrip("/").rsplit(":", 1)[-1].split("/")[0]
                if tail.isdigit():
                    ports.add(int(tail))
            self._own_ports, self._own_at = frozenset(p for p in ports if p), time.monotonic()
        return self._own_ports

    def today(self) -> str:
        return datetime.now(ZoneInfo(self.settings.tz)).date().isoformat()

    # ---- the decision ---------------------------------------------------------------------
    async def decide(self, group: str, head: Head) -> list[IP]:
        """The checked addresses to connect to, or `Refusal` with the first reason."""
        host, port = head.host, head.port
        stored = self.store.web_policy(group)
        try:
            policy = GroupPolicy.parse(stored)
        except ValueError:
            policy = GroupPolicy("off")  # a broken stored policy opens nothing
        why = policy.decide(host)
        if why:
            raise Refusal(403, why)
        seam = (host.written.lower(), port) in self.test_allow
        why = host_refusal(host) or (None if seam else port_refusal(port, self.ports))
        if why:
            raise Refusal(403, why)
        if host.ip is not None:
            addrs = [host.ip]
        else:
            try:
                addrs = await asyncio.wait_for(self.resolve(host.name, port), RESOLVE_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, UnicodeError, ValueError) as e:
                raise Refusal(502, f"cannot resolve {host.name}: "
                              f"{getattr(e, 'strerror', None) or type(e).__name__}") from None
            if not addrs:
                raise Refusal(502, f"{host.name} has no address")
        if seam:
            return addrs
        own, local = self.own_ports(), self.local()
        for ip in addrs:
            why = address_refusal(ip, local)
            if why and port in own and (ip.is_loopback or ip.is_unspecified or ip in local):
                why = f"a port of this host ({why})"
            if why:
                said = "" if host.ip is not None else f"{host.name} resolves to {ip}: "
                raise Refusal(403, said + why)
        return addrs

    # ---- one client connection ------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        group: str | None = None
        head: Head | None = None
        try:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
                head = parse_head(raw)
            except asyncio.LimitOverrunError:
                raise Refusal(400, "request head too large") from None
            except asyncio.IncompleteReadError:
                return  # the client went away before a whole head
            except BadRequest as e:
                raise Refusal(400, str(e)) from None
            session = self.store.session_for_token(token_hash(head.token)) if head.token \
                else None
            if session is None:
                raise Refusal(407, "no valid session token in Proxy-Authorization")
            group = session["agent_group_id"]
            await self.serve_one(group, head, reader, writer)
        except Refusal as r:
            if group is not None and head is not None:
                self.count(group, head, False, r.reason)
                logger.debug("egress: refused {} {}:{} of agent group {}: {}", head.method,
                             head.host.name, head.port, group, r.reason)  # and in egress_log
            await self.answer(writer, r.status, r.reason)
        except (ConnectionError, asyncio.TimeoutError, OSError):
            pass
        except Exception as e:  # one connection's failure never ends the door
            logger.exception("egress: unexpected error: {}", e)
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def serve_one(self, group: str, head: Head, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        addrs = await self.decide(group, head)
        if self.open.get(group, 0) >= self.settings.egress_connections:
            raise Refusal(429, f"this agent group already has {self.open[group]} connections"
                          " open (NANOCLAW_EGRESS_CONNECTIONS)")
        day = self.today()
        if self.limit and self.bytes_used(group, day) >= self.limit:
            raise Refusal(403, "this agent group's daily web traffic is used up"
                          " (NANOCLAW_EGRESS_DAILY_MB)")
        self.open[group] = self.open.get(group, 0) + 1  # before connecting: no race past it
        moved = [0]
        up_w = None
        try:
            up_r, up_w = await self.connect(addrs, head.port)
            self.count(group, head, True, "")
            if head.connect:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()  # (bytes sent early are read first by the pump)
            else:
                up_w.write(head.upstream_head())
                await self.send_body(head, reader, up_w, moved, group, day)
            await self.pump_both(reader, writer, up_r, up_w, moved, group, day,
                                 client_more=head.connect)
        finally:
            self.open[group] -= 1
            if up_w is not None:
                with contextlib.suppress(Exception):
                    up_w.close()
            if moved[0]:
                self.count(group, head, True, "", moved[0], connections=0)

    async def connect(self, addrs: list[IP], port: int
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last: Exception | None = None
        for ip in addrs:  # the checked addresses, never the name again
            try:
                return await asyncio.wait_for(asyncio.open_connection(str(ip), port),
                                              CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError) as e:
                last = e
        raise Refusal(502, f"cannot connect: {getattr(last, 'strerror', None) or last!r}")

    # ---- moving bytes ---------------------------------------------------------------------
    def add_bytes(self, group: str, day: str, n: int, moved: list[int]) -> None:
        moved[0] += n
        self.used[(group, day)] = self.bytes_used(group, day) + n
        if self.limit and self.used[(group, day)] > self.limit:
            raise Refusal(403, "daily web traffic used up (NANOCLAW_EGRESS_DAILY_MB)")

    def bytes_used(self, group: str, day: str) -> int:
        if (group, day) not in self.used:
            try:
                self.used[(group, day)] = self.store.egress_bytes(group, day)
            except Exception as e:
                logger.error("egress: cannot read the traffic of {}: {}", group, e)
                self.used[(group, day)] = 0
        return self.used[(group, day)]

    async def send_body(self, head: Head, reader: asyncio.StreamReader,
                        up: asyncio.StreamWriter, moved: list[int], group: str, day: str
                        ) -> None:
        """Exactly the request's body, by its framing: nothing after it reaches upstream."""
        if head.chunked:
            while True:
                line = await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT_S)
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise Refusal(400, "bad chunk size") from None
                if len(size_text) > 15:
                    raise Refusal(400, "bad chunk size")
                up.write(line)
                if size == 0:
                    while True:  # trailers, up to the blank line
                        t = await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT_S)
                        up.write(t)
                        if t == b"\r\n":
                            break
                    break
                await self.copy_exact(reader, up, size + 2, moved, group, day)
        elif head.length:
            await self.copy_exact(reader, up, head.length, moved, group, day)
        await up.drain()

    async def copy_exact(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, n: int,
                         moved: list[int], group: str, day: str) -> None:
        while n > 0:
            data = await asyncio.wait_for(src.read(min(n, CHUNK)), IDLE_TIMEOUT_S)
            if not data:
                raise ConnectionResetError("the client ended its body early")
            n -= len(data)
            self.add_bytes(group, day, len(data), moved)
            dst.write(data)
            await dst.drain()

    async def pump_both(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        up_r: asyncio.StreamReader, up_w: asyncio.StreamWriter,
                        moved: list[int], group: str, day: str, client_more: bool) -> None:
        """Upstream's answer to the client; for a tunnel, the client's bytes upstream too.
        Ends when upstream ends (or either side fails, or both stay silent too long)."""
        last = [time.monotonic()]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    with contextlib.suppress(Exception):
                        if dst.can_write_eof():
                            dst.write_eof()
                    return
                last[0] = time.monotonic()
                self.add_bytes(group, day, len(data), moved)
                dst.write(data)
                await dst.drain()

        down = asyncio.ensure_future(pump(up_r, writer))
        tasks = [down]
        if client_more:
            tasks.append(asyncio.ensure_future(pump(reader, up_w)))
        try:
            while not down.done():
                await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_EXCEPTION)
                if any(t.done() and t.exception() for t in tasks):
                    break
                if time.monotonic() - last[0] > IDLE_TIMEOUT_S:
                    break
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            for t in tasks:
                if t.done() and not t.cancelled() and isinstance(t.exception(), Refusal):
                    logger.info("egress: cut a connection of agent group {}: {}", group,
                                t.exception())

    # ---- answers and the log --------------------------------------------------------------
    async def answer(self, writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        """One line: the reason in the status line (a client's error shows it) and body."""
        line = "".join(c if " " <= c <= "~" else "?" for c in reason)[:300]
        body = f"NanoClaw egress: {line}\n".encode()
        extra = "Proxy-Authenticate: Basic realm=\"nanoclaw\"\r\n" if status == 407 else ""
        head = (f"HTTP/1.1 {status} NanoClaw egress: {line}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
        with contextlib.suppress(Exception):
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), 5)

    def count(self, group: str, head: Head, allowed: bool, reason: str, nbytes: int = 0,
              connections: int = 1) -> None:
        try:
            self.store.egress_seen(group, self.today(), head.host.name, head.port, allowed,
                                   reason, nbytes, connections)
        except Exception as e:  # counting must never break a connection
            logger.error("egress: cannot log a destination of {}: {}", group, e)

    def prune(self) -> None:
        before = (datetime.now(ZoneInfo(self.settings.tz)).date()
                  - timedelta(days=LOG_DAYS)).isoformat()
        with contextlib.suppress(Exception):
            self.store.prune_egress(before)

    # ---- the server -----------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event, ready: Callable[[], Any] | None = None) -> None:
        sock = bind_unix(self.settings.egress_socket)
        server = await asyncio.start_unix_server(self.handle, sock=sock, limit=MAX_HEAD)
        self.prune()
        logger.info("egress door listening on {} (ports {})", self.settings.egress_socket,
                    ",".join(map(str, sorted(self.ports))))
        if ready is not None:
            ready()
        try:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 3600)
                self.prune()
        finally:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
            with contextlib.suppress(OSError):
                os.unlink(self.settings.egress_socket)
