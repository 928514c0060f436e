"""The egress door's reading of a proxy request head: pure, strict, bounded.

Two shapes are accepted, as any HTTP client sends them to a forward proxy:

- `CONNECT host:port HTTP/1.1` (TLS, or anything else, tunnelled unopened);
- `METHOD http://host[:port]/path HTTP/1.x` (plain HTTP, absolute URI).

Anything else (an origin-form path, `https://` in absolute form, user info in the
authority, a fragment, control or non-ASCII bytes, folded or duplicate framing headers,
`Transfer-Encoding` other than `chunked`, both it and `Content-Length`) is `BadRequest`:
the door answers one line with 400 and closes. What is forwarded upstream is rebuilt
from the checked parts (`Head.upstream_head`): the target in origin form, `Host` from
the URI (never the client's own `Host` header), hop-by-hop and proxy headers dropped,
`Connection: close`, so one connection carries one checked request.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from nanoclaw.broker.egress_policy import BadTarget, Host, parse_host

MAX_HEAD = 32 * 1024
MAX_HEADERS = 100
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
METHOD = re.compile(r"[A-Z]{1,20}")
VERSION = re.compile(r"HTTP/1\.[01]")
PATH = re.compile(r"/[!-~]*")  # printable ASCII, no space
VALUE = re.compile(r"[\t -~]*")  # header values: visible ASCII, space and tab
# dropped on the way upstream: hop-by-hop (RFC 9110 §7.6.1) and the proxy's own
HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-authenticate",
       "proxy-connection", "te", "trailer", "upgrade", "host", "content-length",
       "transfer-encoding"}


class BadRequest(ValueError):
    """A request the door will not read any further: one line, no crash."""


@dataclass
class Head:
    method: str
    host: Host
    port: int
    path: str = "/"          # origin form, for plain HTTP
    version: str = "HTTP/1.1"
    headers: list[tuple[str, str]] = field(default_factory=list)
    length: int = 0          # request body bytes (Content-Length)
    chunked: bool = False    # request body in chunks (Transfer-Encoding: chunked)
    token: str = ""          # from Proxy-Authorization

    @property
    def connect(self) -> bool:
        return self.method == "CONNECT"

    @property
    def authority(self) -> str:
        h = f"[{self.host.name}]" if ":" in self.host.name else self.host.name
        return h if (self.port == 80 and not self.connect) else f"{h}:{self.port}"

    def upstream_head(self) -> bytes:
        """The request as the door sends it on (plain HTTP only)."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {self.authority}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
        elif self.length or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {self.length}")
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def split_authority(text: str, default_port: int | None) -> tuple[Host, int]:
    """`host[:port]` (`[v6]:port`) → (Host, port); BadRequest when malformed."""
    if "@" in text:
        raise BadRequest("user info in the authority is not allowed")
    if default_port is None and text.count(":") > 1 and not text.startswith("["):
        head, _, tail = text.rpartition(":")  # Python 3.11's CONNECT leaves IPv6 bare
        text = f"[{head}]:{tail}"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadRequest("unclosed [ in the authority")
        host, rest = text[:end + 1], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise BadRequest("bad authority")
        port_text = rest[1:] if rest else ""
        has_port = bool(rest)
    else:
        host, has_port, port_text = text.partition(":")
        has_port = bool(has_port)
    if has_port or default_port is None:
        if not port_text.isdigit() or len(port_text) > 5 or not 1 <= int(port_text) <= 65535:
            raise BadRequest("bad or missing port")
        port = int(port_text)
    else:
        port = default_port
    try:
        return parse_host(host), port
    except BadTarget as e:
        raise BadRequest(str(e)) from None


def proxy_token(value: str) -> str:
    """The session token of `Proxy-Authorization`: `Basic` (the token as password, or
    as user name with no password) or `Bearer`."""
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer":
        return rest
    if scheme.lower() != "basic":
        return ""
    try:
        user, _, password = base64.b64decode(rest, validate=True).decode().partition(":")
    except (binascii.Error, ValueError):
        return ""
    return password or user


def parse_head(raw: bytes) -> Head:
    """The request head (request line and headers, up to and including the blank line)
    as a checked `Head`, or BadRequest with a one-line reason."""
    if len(raw) > MAX_HEAD:
        raise BadRequest("request head too large")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("non-ASCII bytes in the request head") from None
    if not text.endswith("\r\n\r\n"):
        raise BadRequest("incomplete request head")
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("bad request line")
    method, target, version = parts
    if not METHOD.fullmatch(method):
        raise BadRequest("bad method")
    if not VERSION.fullmatch(version):
        raise BadRequest("only HTTP/1.0 and HTTP/1.1 are spoken")
    if method == "CONNECT":
        host, port = split_authority(target, None)
        head = Head(method, host, port, version=version)
    else:
        scheme, sep, rest = target.partition("://")
        if not sep:
            raise BadRequest("a proxy request needs an absolute http:// URI (or CONNECT)")
        if scheme.lower() != "http":
            raise BadRequest("only http:// is forwarded; use CONNECT for https")
        if "#" in rest:
            raise BadRequest("a fragment is not part of a request")
        slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, path = rest[:slash], rest[slash:] or "/"
        if path.startswith("?"):
            path = "/" + path
        if not PATH.fullmatch(path):
            raise BadRequest("bad characters in the path")
        host, port = split_authority(authority, 80)
        head = Head(method, host, port, path=path, version=version)
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest("too many headers")
    lengths: set[str] = set()
    encodings: list[str] = []
    drop: set[str] = set()
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise BadRequest("folded header lines are not allowed")
        name, colon, value = line.partition(":")
        if not colon or not TOKEN.fullmatch(name):
            raise BadRequest("bad header line")
        value = value.strip(" \t")
        if not VALUE.fullmatch(value):
            raise BadRequest("control characters in a header value")
        low = name.lower()
        if low == "content-length":
            lengths.add(value)
        elif low == "transfer-encoding":
            encodings.append(value.lower())
        elif low == "proxy-authorization":
            head.token = proxy_token(value)
        elif low in ("connection", "proxy-connection"):
            drop |= {t.strip().lower() for t in value.split(",")}
        if low not in HOP:
            head.headers.append((name, value))
    head.headers = [(k, v) for k, v in head.headers if k.lower() not in drop]
    if encodings:
        if lengths:
            raise BadRequest("both Transfer-Encoding and Content-Length")
        if encodings != ["chunked"]:
            raise BadRequest("only Transfer-Encoding: chunked is accepted")
        head.chunked = True
    elif lengths:
        if len(lengths) > 1:
            raise BadRequest("conflicting Content-Length headers")
        n = lengths.pop()
        if not n.isdigit() or len(n) > 15:
            raise BadRequest("bad Content-Length")
        head.length = int(n)
    if head.connect and (head.chunked or head.length):
        raise BadRequest("a CONNECT request has no body")
    return head
