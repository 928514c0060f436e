"""The egress door's decisions, pure (issue 21, item 1): which addresses, names, ports and
group policies it refuses, and its reading of request heads. Nothing here opens a
connection: the door's `decide` runs with a resolver the test controls, so no refused
address is ever contacted; the request parser is fuzzed with Hypothesis (bad input is
a one-line `BadRequest`, never a crash)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoclaw.broker.egress import Door, Refusal
from nanoclaw.broker.egress_http import BadRequest, parse_head
from nanoclaw.broker.egress_policy import (
    BadTarget,
    GroupPolicy,
    address_refusal,
    host_refusal,
    inet_aton,
    parse_host,
)
from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.util import token_hash

ip = ipaddress.ip_address

REFUSED = {
    # IPv4
    "127.0.0.1": "loopback", "127.255.255.254": "loopback", "0.0.0.0": "unspecified",
    "0.1.2.3": "unspecified", "10.0.0.1": "private", "172.16.5.4": "private",
    "172.31.255.255": "private", "192.168.1.1": "private", "100.64.0.1": "CGNAT",
    "100.127.255.255": "CGNAT", "169.254.1.1": "link-local", "169.254.169.254": "metadata",
    "168.63.129.16": "metadata", "100.100.100.200": "metadata", "224.0.0.1": "multicast",
    "239.255.255.250": "multicast", "255.255.255.255": "broadcast", "240.0.0.1": "reserved",
    "192.0.0.8": "reserved", "192.0.2.1": "documentation", "198.18.0.1": "benchmarking",
    # IPv6
    "::1": "loopback", "::": "unspecified", "fc00::1": "private", "fd12:3456::1": "private",
    "fd00:ec2::254": "metadata", "fe80::1": "link-local", "fec0::1": "private",
    "ff02::1": "multicast", "ff05::2": "multicast", "2001:db8::1": "documentation",
    "2001::1": "Teredo", "100::1": "reserved", "64:ff9b:1::1": "private",
    "4000::1": "reserved",
    # IPv6 forms that carry a refused IPv4 address
    "::ffff:127.0.0.1": "loopback", "::ffff:10.1.2.3": "private",
    "::ffff:169.254.169.254": "metadata", "::127.0.0.1": "loopback",
    "::10.0.0.1": "private", "2002:7f00:1::": "loopback", "2002:a00:1::1": "private",
    "2002:a9fe:a9fe::": "metadata", "64:ff9b::7f00:1": "loopback",
    "64:ff9b::a9fe:a9fe": "metadata", "64:ff9b::6440:1": "CGNAT",
}
PUBLIC = ["1.1.1.1", "8.8.8.8", "93.184.216.34", "2606:4700:4700::1111",
          "2a00:1450:4001:80b::200e", "::ffff:1.1.1.1", "64:ff9b::101:101"]

SPELLINGS_OF_LOOPBACK = ["127.0.0.1", "2130706433", "127.1", "127.0.1", "0x7f000001",
                         "0x7F000001", "0177.0.0.1", "0x7f.0.0.1", "0177.1", "017700000001",
                         "127.0.0.1.", "[::1]", "[::ffff:127.0.0.1]", "[0:0:0:0:0:0:0:1]",
                         "[::ffff:7f00:1]", "[::127.0.0.1]"]


@pytest.mark.parametrize("text,kind", sorted(REFUSED.items()))
def test_every_non_public_range_is_refused(text, kind):
    why = address_refusal(ip(text))
    assert why is not None, text
    want = {"CGNAT": "shared (CGNAT)", "metadata": "cloud metadata"}.get(kind, kind)
    assert want in why, (text, why)


@pytest.mark.parametrize("text", PUBLIC)
def test_public_addresses_pass(text):
    assert address_refusal(ip(text)) is None


def test_the_hosts_own_addresses_are_refused():
    assert "this host" in address_refusal(ip("8.8.4.4"), frozenset({ip("8.8.4.4")}))
    assert "this host" in address_refusal(ip("::ffff:8.8.4.4"), frozenset({ip("8.8.4.4")}))


@pytest.mark.parametrize("text", SPELLINGS_OF_LOOPBACK)
def test_every_spelling_of_loopback_parses_to_a_refused_address(text):
    h = parse_host(text)
    assert h.ip is not None and address_refusal(h.ip) is not None
    assert "loopback" in address_refusal(h.ip)


def test_numeric_spellings_read_like_inet_aton():
    assert str(inet_aton("2130706433")) == "127.0.0.1"
    assert str(inet_aton("10.1")) == "10.0.0.1"
    assert str(inet_aton("0xa9fea9fe")) == "169.254.169.254"
    assert str(inet_aton("0251.0376.0251.0376")) == "169.254.169.254"
    assert inet_aton("1.2.3.256") is None and inet_aton("08.1.1.1") is None
    assert inet_aton("4294967296") is None and inet_aton("1.2.3.4.5") is None
    for bad in ("1.2.3.256", "08.0.0.1", "0x", "4294967296", "1..2", "[::1", "[fe80::1%eth0]",
                "::1", "exa mple.com", "ex\u00e4mple.com", "-a.com", "a" * 300):
        with pytest.raises(BadTarget):
            parse_host(bad)


def test_names_that_are_never_the_internet():
    for name in ("localhost", "foo.localhost", "metadata.google.internal", "metadata",
                 "x.internal", "printer.local", "1.0.0.127.in-addr.arpa"):
        assert host_refusal(parse_host(name)), name
    assert host_refusal(parse_host("example.com")) is None


def test_group_policies_and_subdomains():
    on, off = GroupPolicy.parse("on"), GroupPolicy.parse("off")
    allow = GroupPolicy.parse("allow:a.com, B.org.")
    deny = GroupPolicy.parse("deny:x.com")
    h = parse_host
    assert on.decide(h("anything.net")) is None
    assert "off" in off.decide(h("a.com")) and GroupPolicy.parse(None).mode == "off"
    assert allow.decide(h("a.com")) is None and allow.decide(h("www.a.com")) is None
    assert allow.decide(h("b.org")) is None
    assert allow.decide(h("evila.com")) and allow.decide(h("a.com.evil.net"))
    assert allow.decide(h("1.2.3.4"))  # a list of names admits no bare address
    assert deny.decide(h("x.com")) and deny.decide(h("api.x.com"))
    assert deny.decide(h("notx.com")) is None
    assert str(allow) == "allow:a.com,b.org"
    for bad in ("maybe", "allow:", "allow:1.2.3.4", "deny:a b.com", "block:x.com"):
        with pytest.raises(ValueError):
            GroupPolicy.parse(bad)


# ---- the door's decision, with a resolver the test controls --------------------------------
class FakeResolver:
    def __init__(self, answers: dict[str, list[str]]):
        self.answers, self.asked = answers, []

    async def __call__(self, host: str, port: int):
        self.asked.append(host)
        return [ip(a) for a in self.answers[host]]


@pytest.fixture
def door(tmp_path):
    s = Settings(data_dir=tmp_path / "data", egress_ports="80,443,8080")
    store = Store.open(s.data_dir)
    ag = store.create_agent_group("g", "g", "claude", "m", "g")
    store.set_state("web_url", "http://127.0.0.1:8080/")
    resolver = FakeResolver({
        "good.example": ["93.184.216.34"],
        "evil.example": ["127.0.0.1"],
        "mixed.example": ["93.184.216.34", "2606:4700::1", "10.0.0.7"],
        "mixed6.example": ["93.184.216.34", "::ffff:169.254.169.254"],
        "meta.example": ["169.254.169.254"],
        "cgnat.example": ["100.64.3.3"],
        "ula.example": ["fd00::5"],
        "mcast.example": ["ff02::1"],
        "linklocal.example": ["fe80::9"],
        "zero.example": ["0.0.0.0"],
    })
    d = Door(store, s, resolve=resolver, local=lambda: frozenset({ip("81.2.69.142")}))
    yield d, ag, resolver
    store.close()


def _decide(d: Door, ag: str, target: str, method: str = "GET"):
    raw = (f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    return asyncio.run(d.decide(ag, parse_head(raw)))


def test_the_door_refuses_names_whose_answers_are_not_public(door):
    d, ag, resolver = door
    assert _decide(d, ag, "http://good.example/") == [ip("93.184.216.34")]
    for name, why in (("evil.example", "loopback"), ("mixed.example", "10.0.0.7: private"),
                      ("mixed6.example", "metadata"), ("meta.example", "metadata"),
                      ("cgnat.example", "CGNAT"), ("ula.example", "private"),
                      ("mcast.example", "multicast"), ("linklocal.example", "link-local"),
                      ("zero.example", "unspecified")):
        with pytest.raises(Refusal) as e:
            _decide(d, ag, f"http://{name}/")
        assert why in e.value.reason and e.value.status == 403, (name, e.value.reason)


def test_the_door_never_asks_the_resolver_about_a_literal_or_a_local_name(door):
    d, ag, resolver = door
    for host in SPELLINGS_OF_LOOPBACK + ["localhost", "metadata.google.internal",
                                         "169.254.169.254", "0.0.0.0", "[fd00:ec2::254]"]:
        with pytest.raises(Refusal):
            _decide(d, ag, f"http://{host}/")
        with pytest.raises(Refusal):
            _decide(d, ag, f"{host}:443", "CONNECT")
    assert resolver.asked == []


def test_ports_policy_and_the_hosts_own_ports(door):
    d, ag, _ = door
    with pytest.raises(Refusal, match="port 22 is not open"):
        _decide(d, ag, "good.example:22", "CONNECT")
    with pytest.raises(Refusal, match="a port of this host"):
        _decide(d, ag, "http://127.0.0.1:8080/")  # the web chat's port (host_state)
    with pytest.raises(Refusal, match="an address of this host"):
        _decide(d, ag, "http://81.2.69.142/")


def test_the_groups_policy_comes_first(door):
    d, ag, resolver = door
    d.store.set_web_policy(ag, "off")
    with pytest.raises(Refusal, match="off"):
        _decide(d, ag, "http://good.example/")
    d.store.set_web_policy(ag, "allow:example")
    assert _decide(d, ag, "http://good.example/")
    d.store.set_web_policy(ag, "deny:good.example")
    with pytest.raises(Refusal, match="deny list"):
        _decide(d, ag, "http://good.example/")
    d.store.set_web_policy(ag, "garbage")  # a broken stored policy opens nothing
    with pytest.raises(Refusal, match="off"):
        _decide(d, ag, "http://good.example/")


def test_the_door_connects_to_the_address_it_checked_not_a_second_answer(door):
    """DNS rebinding: the resolver answers a public address once and loopback after.
    The door asks once and connects to what it checked (connect is stubbed: no
    connection is opened to any address)."""
    d, ag, _ = door
    calls = []

    async def rebinding(host, port):
        calls.append(host)
        return [ip("93.184.216.34")] if len(calls) == 1 else [ip("127.0.0.1")]

    tried = []

    async def connect(addrs, port):
        tried.append((addrs, port))
        raise Refusal(502, "stub")

    d.resolve, d.connect = rebinding, connect
    sess = d.store.create_session(ag, None, None, None)
    d.store.set_container(sess["id"], "running", "x", token_hash("tok"))
    head = parse_head(b"GET http://rebind.example/ HTTP/1.1\r\nProxy-Authorization: Basic "
                      + base64.b64encode(b"nanoclaw:tok") + b"\r\n\r\n")
    with pytest.raises(Refusal, match="stub"):
        asyncio.run(d.serve_one(ag, head, None, None))
    assert calls == ["rebind.example"] and tried == [([ip("93.184.216.34")], 80)]


# ---- request heads ----------------------------------------------------------------------
def test_request_heads_that_are_read():
    h = parse_head(b"GET http://Example.COM:8080/a/b?c=d HTTP/1.1\r\nHost: evil.com\r\n"
                   b"Proxy-Authorization: Basic " + base64.b64encode(b"nanoclaw:T0K") +
                   b"\r\nConnection: x-secret\r\nX-Secret: 1\r\nAccept: */*\r\n\r\n")
    assert (h.method, h.host.name, h.port, h.path, h.token) == ("GET", "example.com", 8080,
                                                               "/a/b?c=d", "T0K")
    up = h.upstream_head().decode()
    assert up.startswith("GET /a/b?c=d HTTP/1.1\r\nHost: example.com:8080\r\n")
    assert "evil.com" not in up and "Proxy-Authorization" not in up and "X-Secret" not in up
    assert "Connection: close" in up and "Accept: */*" in up
    c = parse_head(b"CONNECT [2606:4700::1]:443 HTTP/1.1\r\nProxy-Authorization: Bearer t\r\n"
                   b"\r\n")
    assert c.connect and c.host.name == "2606:4700::1" and c.port == 443 and c.token == "t"
    p = parse_head(b"POST http://a.com HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert p.chunked and p.path == "/"


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\n\r\n", b"GET https://a.com/ HTTP/1.1\r\n\r\n",
    b"GET http://u:p@a.com/ HTTP/1.1\r\n\r\n", b"GET http://a.com/#x HTTP/1.1\r\n\r\n",
    b"CONNECT a.com HTTP/1.1\r\n\r\n", b"CONNECT a.com:99999 HTTP/1.1\r\n\r\n",
    b"GET http://a.com/ HTTP/2.0\r\n\r\n", b"get http://a.com/ HTTP/1.1\r\n\r\n",
    b"GET http://a.com/ HTTP/1.1\r\n folded\r\n\r\n",
    b"POST http://a.com/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST http://a.com/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST http://a.com/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"GET http://a.com/\x00 HTTP/1.1\r\n\r\n", b"GET http://\xc3\xa4.com/ HTTP/1.1\r\n\r\n",
    b"GET http://a.com/ HTTP/1.1\r\nX: a\x01b\r\n\r\n", b"GET http://[::1/ HTTP/1.1\r\n\r\n",
    b"GET http://1.2.3.999/ HTTP/1.1\r\n\r\n", b"GET http://a.com:/ HTTP/1.1\r\n\r\n",
])
def test_bad_heads_are_one_line_400s(raw):
    with pytest.raises(BadRequest) as e:
        parse_head(raw)
    assert "\n" not in str(e.value) and str(e.value)


HEADISH = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda m, t, v, hs: (f"{m} {t} {v}\r\n" + "".join(hs) + "\r\n").encode(
        "utf-8", "surrogatepass"),
        st.sampled_from(["GET", "CONNECT", "POST", "get", "", "G ET"]),
        st.one_of(st.text(max_size=60),
                  st.builds(lambda s, h, p, path: f"{s}{h}{p}{path}",
                            st.sampled_from(["http://", "https://", "", "//", "http:/"]),
                            st.one_of(st.text(max_size=30), st.from_regex(
                                r"\[?[0-9a-fA-FxX:.]{0,30}\]?", fullmatch=True)),
                            st.sampled_from(["", ":80", ":", ":0", ":65536", ":-1", ":1e3"]),
                            st.text(max_size=20))),
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", ""]),
        st.lists(st.text(max_size=40).map(lambda s: s + "\r\n"), max_size=5)),
)


@settings(max_examples=400, deadline=None)
@given(HEADISH)
def test_fuzzed_heads_parse_or_fail_in_one_line(raw):
    try:
        h = parse_head(raw)
    except BadRequest as e:
        assert str(e) and "\n" not in str(e) and "\r" not in str(e)
        return
    assert 1 <= h.port <= 65535 and h.host.name
    head = h.upstream_head() if not h.connect else b""
    assert b"\r\n\r\n" not in head[:-4]  # nothing smuggled into the rebuilt head


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=80), st.from_regex(r"\[?[0-9a-fA-FxX:.%]{0,40}\]?",
                                                       fullmatch=True)))
def test_fuzzed_hosts_parse_or_fail_cleanly(text):
    try:
        h = parse_host(text)
    except BadTarget as e:
        assert str(e) and "\n" not in str(e)
        return
    if h.ip is not None:
        address_refusal(h.ip)  # decided, whatever it is
    else:
        assert h.name == h.name.lower() and h.name.isascii()
