"""What the egress door lets an agent reach: pure decisions, no I/O.

The door (`egress.py`) asks three questions of every request, in this order, and logs
the first refusal's reason:

1. `GroupPolicy.decide(host)`: the agent group's own policy (`off`, `on`,
   `allow:a.com,b.org`, `deny:x.com`; a domain matches itself and its subdomains).
2. `host_refusal(host)` / `port_refusal(port)`: names that are never the internet
   (`localhost`, `*.internal`, `metadata.google.internal`, …), ports outside
   `NANOCLAW_EGRESS_PORTS` (80 and 443 by default).
3. `address_refusal(ip)`, for the literal address the host names (every spelling
   `inet_aton` accepts: `2130706433`, `127.1`, `0x7f000001`, `0177.0.0.1`, `[::1]`,
   `[::ffff:127.0.0.1]`) or for **every** address the resolver answered: one bad answer
   refuses the name, so a DNS answer cannot smuggle a private address in beside a good
   one. The door then connects to the checked address itself, never to the name again,
   so a second, different answer (DNS rebinding) is never used.

Refused: loopback, unspecified, private (RFC 1918, ULA `fc00::/7`), CGNAT `100.64/10`,
link-local, multicast, broadcast, documentation, benchmarking and reserved ranges, cloud
metadata (`169.254.169.254`, `fd00:ec2::254`, Azure's `168.63.129.16`), IPv6 outside
global unicast `2000::/3`, and IPv6 forms that carry an IPv4 address (mapped,
compatible, 6to4, NAT64, Teredo) whose IPv4 address is refused; and any address of
the host itself (`local` set, from its interfaces).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
N4, N6 = ipaddress.IPv4Network, ipaddress.IPv6Network

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "168.63.129.16", "100.100.100.200",
    "fd00:ec2::254"))
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata",
                            "instance-data", "instance-data.ec2.internal"})
# Name suffixes that are never the public internet (RFC 6761, RFC 6762, ICANN .internal).
LOCAL_SUFFIXES = ("localhost", "local", "internal", "localdomain", "home.arpa", "lan",
                  "in-addr.arpa", "ip6.arpa", "onion", "test", "invalid")

V4_REFUSED: list[tuple[N4, str]] = [(N4(n), why) for n, why in (
    ("0.0.0.0/8", "unspecified address"),
    ("127.0.0.0/8", "loopback address"),
    ("10.0.0.0/8", "private address"),
    ("172.16.0.0/12", "private address"),
    ("192.168.0.0/16", "private address"),
    ("100.64.0.0/10", "shared (CGNAT) address"),
    ("169.254.0.0/16", "link-local address"),
    ("192.0.0.0/24", "reserved address"),
    ("192.0.2.0/24", "documentation address"),
    ("198.51.100.0/24", "documentation address"),
    ("203.0.113.0/24", "documentation address"),
    ("192.88.99.0/24", "reserved address"),
    ("198.18.0.0/15", "benchmarking address"),
    ("224.0.0.0/4", "multicast address"),
    ("255.255.255.255/32", "broadcast address"),
    ("240.0.0.0/4", "reserved address"),
)]
V6_REFUSED: list[tuple[N6, str]] = [(N6(n), why) for n, why in (
    ("::/128", "unspecified address"),
    ("::1/128", "loopback address"),
    ("64:ff9b:1::/48", "private address"),
    ("100::/64", "reserved address"),
    ("2001::/32", "Teredo address"),
    ("2001:db8::/32", "documentation address"),
    ("2001::/23", "reserved address"),
    ("fc00::/7", "private address"),
    ("fe80::/10", "link-local address"),
    ("fec0::/10", "private address"),
    ("ff00::/8", "multicast address"),
)]
GLOBAL_UNICAST = N6("2000::/3")
NAT64 = N6("64:ff9b::/96")
COMPAT = N6("::/96")


def embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, compatible, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64 or (ip in COMPAT and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(ip: IP, local: frozenset[IP] = frozenset()) -> str | None:
    """Why the door will not connect to `ip`, or None when it may."""
    if ip in METADATA_ADDRESSES:
        return "cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "scoped IPv6 address"
        inner = embedded_v4(ip)
        if inner is not None:
            why = address_refusal(inner, local)
            if why is not None:
                return f"{why} (inside an IPv6 address)"
            if ip.ipv4_mapped is not None or ip in COMPAT or ip in NAT64:
                return None  # the IPv4 address itself, written as IPv6 (or via NAT64)
        for net, why in V6_REFUSED:
            if ip in net:
                return why
        if ip not in GLOBAL_UNICAST:
            return "reserved address"
    else:
        for net, why in V4_REFUSED:
            if ip in net:
                return why
    if ip in local:
        return "an address of this host"
    if not ip.is_global:  # anything the standard library knows of that the lists missed
        return "reserved address"
    return None


# ---- host names and their numeric spellings -------------------------------------------------
LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
NUM_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


class BadTarget(ValueError):
    """The request names no host the door can even consider: a one-line 400."""


def inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address `text` spells the way `inet_aton` reads it (1 to 4 parts,
    decimal, octal `0…` or hex `0x…`; the last part fills the remaining bytes), or None
    when it is no such spelling."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(NUM_PART.fullmatch(p) for p in parts):
        return None
    values = [int(p, 16) if p[:2].lower() == "0x" else int(p, 8) if p.startswith("0")
              else int(p) for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    n = 0
    for v in head:
        n = (n << 8) | v
    return ipaddress.IPv4Address((n << (8 * (4 - len(head)))) | last)


@dataclass(frozen=True)
class Host:
    """A request's host, canonical: a lower-case name or a literal address."""

    name: str                  # as the door logs it: `example.com`, `127.0.0.1`, `::1`
    ip: IP | None = None       # set when the host is a literal address, in any spelling
    written: str = ""          # exactly as the request wrote it (the test seam matches this)


def parse_host(text: str) -> Host:
    """`text` (a URI's or CONNECT target's host, brackets kept for IPv6) as a `Host`, or
    `BadTarget`. A host whose last label is numeric or hex (`0x…`) is an address in some
    spelling (no top-level domain is numeric): it parses as one or is refused."""
    written = text
    if not text or len(text) > 255:
        raise BadTarget("empty or over-long host")
    if text.startswith("["):
        if not text.endswith("]"):
            raise BadTarget("unclosed [ in host")
        inner = text[1:-1]
        if "%" in inner:
            raise BadTarget("IPv6 zone ids are not allowed")
        try:
            ip6 = ipaddress.IPv6Address(inner)
        except ValueError:
            raise BadTarget("bad IPv6 address") from None
        return Host(ip6.compressed, ip6, written)
    if not text.isascii():
        raise BadTarget("non-ASCII host (use its xn-- form)")
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    last = name.rsplit(".", 1)[-1]
    if last.isdigit() or last.startswith("0x"):
        ip4 = inet_aton(name)
        if ip4 is None:
            raise BadTarget("a numeric host that is no IPv4 address")
        return Host(str(ip4), ip4, written)
    if ":" in name:
        raise BadTarget("an IPv6 address must be in brackets")
    if len(name) > 253 or not all(LABEL.fullmatch(lb) for lb in name.split(".")):
        raise BadTarget("bad host name")
    return Host(name, None, written)


def host_refusal(host: Host) -> str | None:
    """A name that is never the public internet, whatever it resolves to."""
    if host.ip is not None:
        return None
    n = host.name
    if n in METADATA_NAMES:
        return "cloud metadata name"
    if any(n == s or n.endswith("." + s) for s in LOCAL_SUFFIXES):
        return "local name"
    return None


def parse_ports(text: str) -> frozenset[int]:
    """`NANOCLAW_EGRESS_PORTS`: `80,443,8080`."""
    out = set()
    for p in text.split(","):
        p = p.strip()
        if not p:
            continue
        if not p.isdigit() or not 1 <= int(p) <= 65535:
            raise ValueError(f"bad port {p!r}")
        out.add(int(p))
    return frozenset(out)


def port_refusal(port: int, allowed: frozenset[int]) -> str | None:
    if port in allowed:
        return None
    return f"port {port} is not open (NANOCLAW_EGRESS_PORTS: {','.join(map(str, sorted(allowed)))})"


def parse_test_allow(text: str) -> frozenset[tuple[str, int]]:
    """`NANOCLAW_EGRESS_TEST_ALLOW` (tests only): `host:port` pairs, host as written."""
    out = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"bad host:port {item!r}")
        out.add((host.lower(), int(port)))
    return frozenset(out)


# ---- the agent group's policy ---------------------------------------------------------------
@dataclass(frozen=True)
class GroupPolicy:
    """`off`, `on`, `allow` (only these domains) or `deny` (all but these domains)."""

    mode: str
    domains: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "GroupPolicy":
        """A stored or typed policy; ValueError with a one-line reason when it is bad."""
        t = (text or "off").strip().lower()
        if t in ("off", "on"):
            return cls(t)
        mode, sep, rest = t.partition(":")
        if not sep or mode not in ("allow", "deny"):
            raise ValueError(f"bad web policy {text!r}: off, on, allow:a.com,b.org or"
                             " deny:x.com")
        domains = []
        for d in rest.split(","):
            d = d.strip().rstrip(".").removeprefix("*.")
            if not d:
                continue
            if len(d) > 253 or not all(LABEL.fullmatch(lb) for lb in d.split(".")) \
                    or d.rsplit(".", 1)[-1].isdigit():
                raise ValueError(f"bad domain {d!r} in the web policy (names only, like"
                                 " example.com)")
            domains.append(d)
        if not domains:
            raise ValueError(f"web policy {mode}: names no domain")
        return cls(mode, tuple(dict.fromkeys(domains)))

    def __str__(self) -> str:
        return self.mode + (":" + ",".join(self.domains) if self.domains else "")

    def matches(self, host: Host) -> bool:
        n = host.name
        return host.ip is None and any(n == d or n.endswith("." + d) for d in self.domains)

    def decide(self, host: Host) -> str | None:
        """Why the group may not reach `host`, or None."""
        if self.mode == "off":
            return "web access is off for this agent group"
        if self.mode == "allow" and not self.matches(host):
            return "not in this agent group's allow list"
        if self.mode == "deny" and self.matches(host):
            return "in this agent group's deny list"
        return None
