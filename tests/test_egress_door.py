"""The egress door end to end (issue 21, item 1): a real door on its unix socket, real
clients through `sandbox_entry`'s relay, test web servers on 127.0.0.1 (plain HTTP and
HTTPS with a test CA), first from this process, then from inside one real bwrap sandbox
and one real docker container, each running every probe in one start.

Only loopback is ever contacted. The test's own servers are reached through the
test-only seam `NANOCLAW_EGRESS_TEST_ALLOW` (`127.0.0.1:<port>`, exactly as written), and
their ports are added to `NANOCLAW_EGRESS_PORTS`, so every other spelling of 127.0.0.1
at the very same port is refused by the address check, not by the port policy. The
"host's own ports" are two listeners standing in for the web chat and the broker
(their ports in `host_state`, as the real workers write them); the test asserts that
nothing ever connected to them."""

from __future__ import annotations

import asyncio
import base64
import datetime
import http.client
import http.server
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, wait_for
from hypothesis import HealthCheck, given
from hypothesis import settings as h_settings
from hypothesis import strategies as st

from nanoclaw.broker.egress import Door
from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.util import token_hash

sys.path.insert(0, str(ROOT / "container"))
import sandbox_entry  # noqa: E402  (the relay the sandboxes use)

SPELLINGS = ["localhost", "[::1]", "2130706433", "127.1", "0x7f000001", "0177.0.0.1",
             "0.0.0.0", "[::ffff:127.0.0.1]"]


# ---- the test's own web servers ------------------------------------------------------------
def make_ca(d: Path) -> tuple[str, Path, Path]:
    """A test CA (PEM text) and a server certificate for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nanoclaw egress test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return pem, d / "server.pem", d / "server.key"


class Page(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str]] = []  # (method, path, Host) of every request

    def _go(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get("Host", "")))
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        while self.headers.get("Transfer-Encoding") == "chunked":
            size = int(self.rfile.readline().split(b";")[0], 16)
            body += self.rfile.read(size + 2)[:size]
            if not size:
                break
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", urllib.parse.parse_qs(url.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if url.path == "/big":
            out = b"x" * int(urllib.parse.parse_qs(url.query)["n"][0])
        else:
            out = f"egress-ok {self.command} {url.path} len={len(body)}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _go

    def log_message(self, *a) -> None:
        pass


class Listener:
    """A port of 'the host' (web chat, broker) that records any connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            c.close()


class World:
    """Everything the tests share: servers, a running door, groups and their tokens."""

    def __init__(self, base: Path):
        self.base = base
        self.ca, cert, key = make_ca(base)
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.https = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.https.socket = ctx.wrap_socket(self.https.socket, server_side=True)
        for s in (self.http, self.https):
            threading.Thread(target=s.serve_forever, daemon=True).start()
        self.hp, self.sp = self.http.server_address[1], self.https.server_address[1]
        self.web, self.broker = Listener(), Listener()
        self.settings = Settings(
            data_dir=base / "data", egress_connections=3,
            egress_test_allow=f"127.0.0.1:{self.hp},127.0.0.1:{self.sp}",
            egress_ports=f"80,443,{self.hp},{self.sp},{self.web.port},{self.broker.port}")
        self.store = Store.open(self.settings.data_dir)
        self.store.set_state("web_url", f"http://127.0.0.1:{self.web.port}/")
        self.store.set_state("broker_port", str(self.broker.port))
        self.groups, self.tokens = {}, {}
        for name, policy in (("on", None), ("off", "off"), ("bwrap", None), ("docker", None),
                             ("allow", "allow:example.org")):
            ag = self.store.create_agent_group(name, name, "anthropic", "m", name)
            if policy:
                self.store.set_web_policy(ag, policy)
            s = self.store.create_session(ag, None, None, None)
            token = f"tok-{name}-" + base64.b32encode(os.urandom(10)).decode()
            self.store.set_container(s["id"], "running", "x", token_hash(token))
            self.groups[name], self.tokens[name] = ag, token
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        ready = threading.Event()
        self.door: Door | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.door = Door(Store.open(self.settings.data_dir), self.settings)
            self.loop.run_until_complete(self.door.serve(self.stop, ready.set))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "the door did not start"
        self.relay = sandbox_entry.start_relay(str(self.settings.egress_socket), "test-relay")

    def proxy(self, group: str) -> str:
        return self.relay.replace("http://", f"http://nanoclaw:{self.tokens[group]}@")

    def opener(self, group: str | None) -> urllib.request.OpenerDirector:
        proxy = self.proxy(group) if group else self.relay
        ctx = ssl.create_default_context(cadata=self.ca)
        return urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": proxy, "https": proxy}),
            urllib.request.HTTPSHandler(context=ctx))

    def log(self, group: str) -> list[dict]:
        return [dict(r) for r in self.store.conn.execute(
            "SELECT host, port, allowed, reason, connections, bytes FROM egress_log WHERE"
            " agent_group_id=? ORDER BY host, port", (self.groups[group],))]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(5)
        for s in (self.http, self.https):
            s.shutdown()
        self.store.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("egress"))
    yield w
    w.close()
    assert w.web.accepted == 0 and w.broker.accepted == 0, "the host's own ports were reached"


def fetch(opener, url: str, data: bytes | None = None) -> dict:
    try:
        with opener.open(url, data=data, timeout=10) as r:
            return {"status": r.status, "body": r.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "reason": str(e.reason)}
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        return {"error": str(getattr(e, "reason", e)) or type(e).__name__}


def raw(world: World, data: bytes) -> bytes:
    host, port = world.relay.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# ---- from this process, through the same relay -------------------------------------------
def test_plain_http_and_https_through_connect(world):
    o = world.opener("on")
    r = fetch(o, f"http://127.0.0.1:{world.hp}/page")
    assert r == {"status": 200, "body": "egress-ok GET /page len=0"}
    r = fetch(o, f"https://127.0.0.1:{world.sp}/page")
    assert r == {"status": 200, "body": "egress-ok GET /page len=0"}
    r = fetch(o, f"http://127.0.0.1:{world.hp}/post", data=b"x" * 1000)
    assert r["body"] == "egress-ok POST /post len=1000"
    rows = {(r["host"], r["port"]): r for r in world.log("on") if r["allowed"]}
    assert rows[("127.0.0.1", world.hp)]["connections"] >= 2
    assert rows[("127.0.0.1", world.sp)]["bytes"] > 1000  # the TLS handshake and page


def test_every_spelling_of_loopback_and_the_hosts_ports_are_refused(world):
    o = world.opener("on")
    for name in SPELLINGS:
        for url in (f"http://{name}:{world.hp}/page", f"https://{name}:{world.sp}/page"):
            r = fetch(o, url)
            assert r.get("status") == 403 or "403" in r.get("error", ""), (url, r)
    for port in (world.web.port, world.broker.port):
        r = fetch(o, f"http://127.0.0.1:{port}/")
        assert r["status"] == 403 and "a port of this host" in r["reason"], r
    r = fetch(o, f"http://127.0.0.1:{world.hp}/redirect?to="
              + urllib.parse.quote(f"http://localhost:{world.hp}/page"))
    assert r["status"] == 403 and "local name" in r["reason"], r
    reasons = {r["host"]: r["reason"] for r in world.log("on") if not r["allowed"]}
    assert "loopback address" in reasons["127.0.0.1"] or "port of this host" in reasons[
        "127.0.0.1"]
    assert reasons["localhost"] == "local name"
    assert "unspecified" in reasons["0.0.0.0"] and "loopback" in reasons["::1"]


def test_no_token_bad_input_and_off_groups(world):
    r = fetch(world.opener(None), f"http://127.0.0.1:{world.hp}/page")
    assert r["status"] == 407
    out = raw(world, b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and out.count(b"\n") <= 6
    assert raw(world, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    off = world.opener("off")
    for url in (f"http://127.0.0.1:{world.hp}/page", f"https://127.0.0.1:{world.sp}/page"):
        r = fetch(off, url)
        assert r.get("status") == 403 or "403" in r.get("error", ""), r
    assert {(r["allowed"], r["reason"]) for r in world.log("off")} == {
        (0, "web access is off for this agent group")}
    r = fetch(world.opener("allow"), f"http://127.0.0.1:{world.hp}/page")
    assert r["status"] == 403 and "allow list" in r["reason"]


@h_settings(max_examples=150, deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n"),
    st.builds(lambda m, t: f"{m} {t} HTTP/1.1\r\nHost: {t}\r\n\r\n".encode("utf-8", "replace"),
              st.sampled_from(["GET", "CONNECT", "POST", "PUT", "get", "X"]),
              st.text(max_size=50))))
def test_fuzzed_requests_get_one_line_and_the_door_lives(world, data):
    """Whatever comes (no token: nothing is ever forwarded), the answer is a 400 or 407
    with a one-line body, and the door goes on serving."""
    out = raw(world, data)
    status, _, rest = out.partition(b"\r\n")
    assert status.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 407 ")), out[:200]
    body = rest.split(b"\r\n\r\n", 1)[1]
    assert body.count(b"\n") == 1 and body.endswith(b"\n")


def test_one_checked_request_per_connection(world):
    """A second request pipelined behind the first (or hidden in a body) never reaches
    upstream; the client's Host header is replaced by the URI's."""
    before = len(Page.seen)
    token = base64.b64encode(f"nanoclaw:{world.tokens['on']}".encode())
    head = (f"POST http://127.0.0.1:{world.hp}/one HTTP/1.1\r\nHost: evil.example\r\n"
            f"Proxy-Authorization: Basic {token.decode()}\r\nContent-Length: 5\r\n\r\nhello"
            f"GET http://127.0.0.1:{world.hp}/two HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    out = raw(world, head)
    assert b"egress-ok POST /one len=5" in out and b"/two" not in out
    chunked = (f"POST http://127.0.0.1:{world.hp}/three HTTP/1.1\r\nProxy-Authorization: Basic"
               f" {token.decode()}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
               f"GET /four HTTP/1.1\r\n\r\n").encode()
    assert b"egress-ok POST /three len=3" in raw(world, chunked)
    time.sleep(0.2)
    assert [(m, p, h) for m, p, h in Page.seen[before:]] == [
        ("POST", "/one", f"127.0.0.1:{world.hp}"), ("POST", "/three", f"127.0.0.1:{world.hp}")]


def test_limits_bytes_and_connections(world):
    d = world.door
    assert d is not None
    o = world.opener("on")
    old = d.limit
    d.limit = d.bytes_used(world.groups["on"], d.today()) + 50_000
    try:
        r = fetch(o, f"http://127.0.0.1:{world.hp}/big?n=200000")
        assert "error" in r  # cut at the limit: the client never gets the whole answer
        r = fetch(o, f"http://127.0.0.1:{world.hp}/page")
        assert r["status"] == 403 and "used up" in r["reason"]
    finally:
        d.limit = old
    held = []
    token = world.tokens["on"]
    for _ in range(world.settings.egress_connections):
        s = socket.create_connection(("127.0.0.1", int(world.relay.rsplit(":", 1)[1])))
        s.sendall(f"CONNECT 127.0.0.1:{world.sp} HTTP/1.1\r\nProxy-Authorization: Bearer"
                  f" {token}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        held.append(s)
    try:
        r = fetch(o, f"http://127.0.0.1:{world.hp}/page")
        assert r["status"] == 429, r
    finally:
        for s in held:
            s.close()
    wait_for(lambda: fetch(o, f"http://127.0.0.1:{world.hp}/page").get("status") == 200, 10)


def test_sandbox_entry_points_clients_at_the_door_after_a_warm_handover(world, monkeypatch):
    """A warm sandbox starts its relays before any session exists; the proxy variables
    are set only once the session's token has arrived, and any client that honours them
    (urllib's default opener here) goes through the door as that session's group."""
    for name in (*sandbox_entry.PROXY_VARS, "NO_PROXY", "no_proxy", "ANTHROPIC_API_KEY",
                 "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NANOCLAW_EGRESS_SOCKET", str(world.settings.egress_socket))
    setup = sandbox_entry.connect()
    assert "NANOCLAW_EGRESS_SOCKET" not in os.environ and "HTTP_PROXY" not in os.environ
    monkeypatch.setenv("ANTHROPIC_API_KEY", world.tokens["off"])  # the handover
    setup()
    assert os.environ["https_proxy"].startswith("http://nanoclaw:tok-off-")
    assert os.environ["NO_PROXY"] == "127.0.0.1,localhost,::1"
    monkeypatch.delenv("NO_PROXY")  # the test's server is on loopback (see the probe)
    monkeypatch.delenv("no_proxy")
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's, built from the env
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{world.hp}/page", timeout=10)
        raise AssertionError("an off group reached the page")
    except urllib.error.HTTPError as e:
        assert e.code == 403 and "off for this agent group" in str(e.reason)


def test_cli_sets_the_policy_and_shows_the_log(world, tmp_path):
    env = clean_env(NANOCLAW_DATA_DIR=str(world.settings.data_dir),
                    NANOCLAW_LOGS_DIR=str(tmp_path / "logs"))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nanoclaw", *args], capture_output=True,
                              text=True, timeout=60, env=env, cwd=tmp_path)

    r = cli("groups", "update", "allow", "--web", "allow:Example.org,b.net")
    assert r.returncode == 0 and "web: allow:example.org,b.net" in r.stdout, r.stderr
    assert world.store.web_policy(world.groups["allow"]) == "allow:example.org,b.net"
    r = cli("groups", "update", "allow", "--web", "maybe")
    assert r.returncode != 0 and "bad web policy" in r.stderr + r.stdout
    r = cli("usage", "--web", "--group", "off")
    assert r.returncode == 0 and "web access is off for this agent group" in r.stdout
    assert "refused" in r.stdout and "127.0.0.1" in r.stdout
    assert "web" in cli("groups", "list").stdout.splitlines()[0].lower()


def test_old_groups_get_off_and_new_ones_on(tmp_path):
    import sqlite3

    from nanoclaw.db import central
    from nanoclaw.db.migrations import MIGRATIONS

    data = tmp_path / "data"
    data.mkdir()
    conn = sqlite3.connect(str(data / "nanoclaw.db"))
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                 " name TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL)")
    before = [n for n, _ in MIGRATIONS].index("egress-web")
    for v, (name, sql) in enumerate(MIGRATIONS[:before], 1):
        conn.executescript(sql)
        conn.execute("INSERT INTO schema_migrations VALUES (?,?,'old')", (v, name))
    conn.execute("INSERT INTO agent_groups VALUES ('ag-old', 'Old', 'old', 'claude', 'old')")
    conn.commit()
    conn.close()
    store = Store.open(data)
    try:
        assert store.web_policy("ag-old") == "off"
        assert store.web_policy(store.create_agent_group("n", "n", "claude", "m", "n")) == "on"
    finally:
        store.close()
    assert "egress-web" in central.migrate(central.connect(tmp_path / "x.db"))


# ---- from inside real sandboxes ----------------------------------------------------------
PROBE = r'''
import json, os, socket, ssl, sys, urllib.error, urllib.parse, urllib.request
sys.path.insert(0, "/app")
import sandbox_entry
sandbox_entry.connect()()
A = json.loads(os.environ["PROBE"])
out = {"no_proxy": os.environ.get("NO_PROXY"), "proxy_set": all(
    os.environ.get(n, "").startswith("http://nanoclaw:") for n in sandbox_entry.PROXY_VARS)}
# The test's server is on 127.0.0.1, which NO_PROXY keeps inside the sandbox: drop it so
# every probe goes to the door (in real use no web server is on loopback)
for n in ("NO_PROXY", "no_proxy"):
    os.environ.pop(n)
ctx = ssl.create_default_context(cadata=A["ca"])
def opener(proxy=None):
    hs = [urllib.request.HTTPSHandler(context=ctx)]
    if proxy:
        hs.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    return urllib.request.build_opener(*hs)
def fetch(url, o=None):
    try:
        with (o or opener()).open(url, timeout=15) as r:
            return {"status": r.status, "body": r.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "reason": str(e.reason)}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {getattr(e, 'reason', e)}"}
hp, sp = A["hp"], A["sp"]
out["http"] = fetch(f"http://127.0.0.1:{hp}/page")
out["https"] = fetch(f"https://127.0.0.1:{sp}/page")
out["spellings"] = {n: [fetch(f"http://{n}:{hp}/page"), fetch(f"https://{n}:{sp}/page")]
                    for n in A["spellings"]}
out["host_ports"] = [fetch(f"http://127.0.0.1:{p}/") for p in A["host_ports"]]
out["redirects"] = {t: fetch(f"http://127.0.0.1:{hp}/redirect?to=" + urllib.parse.quote(t))
                    for t in A["redirects"]}
off = os.environ["HTTP_PROXY"].replace(os.environ["ANTHROPIC_API_KEY"], A["off_token"])
out["off"] = [fetch(f"http://127.0.0.1:{hp}/page", opener(off)),
              fetch(f"https://127.0.0.1:{sp}/page", opener(off))]
try:
    socket.create_connection(("127.0.0.1", hp), 2).close()
    out["direct"] = "connected"
except OSError as e:
    out["direct"] = type(e).__name__
from agent_runner.tools.local import _web_fetch
from agent_runner.tools.base import ToolError
out["web_fetch"] = _web_fetch(None, {"url": f"http://127.0.0.1:{hp}/page"})
try:
    out["web_fetch_refused"] = _web_fetch(None, {"url": f"http://2130706433:{hp}/page"})
except ToolError as e:
    out["web_fetch_refused"] = "ToolError: " + str(e)
print("PROBE " + json.dumps(out), flush=True)
'''


def run_probe(world: World, runtime, group: str, python: str, tmp: Path) -> dict:
    from nanoclaw.db import session as sessiondb
    from nanoclaw.runtime.base import SpawnSpec

    sessiondb.create(str(tmp / "s"), world.settings.agent_owner())
    (tmp / "g").mkdir()
    args = {"ca": world.ca, "hp": world.hp, "sp": world.sp, "spellings": SPELLINGS,
            "host_ports": [world.web.port, world.broker.port],
            "off_token": world.tokens["off"],
            "redirects": [f"http://localhost:{world.hp}/page",
                          f"http://2130706433:{world.hp}/page",
                          f"http://[::1]:{world.hp}/page",
                          f"http://127.0.0.1:{world.web.port}/"]}
    spec = SpawnSpec(session_id=f"egress-{group}", agent_group_id=world.groups[group],
                     session_dir=tmp / "s", group_dir=tmp / "g", global_dir=tmp / "global",
                     runner_dir=ROOT / "container", log_path=tmp / "probe.log",
                     install_id=f"eg{os.getpid() % 10**6}",
                     env={"ANTHROPIC_API_KEY": world.tokens[group], "PROBE": json.dumps(args)},
                     command=[python, "-c", PROBE])
    cid = runtime.spawn(spec)
    try:
        wait_for(lambda: runtime.exit_code(cid) is not None, 90, what="the probe to finish")
    finally:
        runtime.stop(cid)
    text = spec.log_path.read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("PROBE ")), None)
    assert line, text[-3000:]
    return json.loads(line[6:])


def check_probe(world: World, out: dict, group: str) -> None:
    ok = "egress-ok GET /page len=0"
    assert out["proxy_set"] and out["no_proxy"] == "127.0.0.1,localhost,::1"
    assert out["http"] == {"status": 200, "body": ok}, out["http"]
    assert out["https"] == {"status": 200, "body": ok}, out["https"]
    for name, (plain, tls) in out["spellings"].items():
        assert plain.get("status") == 403, (name, plain)
        assert "403" in tls.get("error", ""), (name, tls)  # CONNECT refused
    for r in out["host_ports"]:
        assert r.get("status") == 403 and "a port of this host" in r["reason"], r
    for target, r in out["redirects"].items():
        assert r.get("status") == 403, (target, r)  # the follow-up was decided again
    assert out["off"][0].get("status") == 403 and "403" in out["off"][1].get("error", "")
    assert out["direct"] in ("ConnectionRefusedError", "OSError", "TimeoutError")
    assert ok in out["web_fetch"]
    assert out["web_fetch_refused"].startswith("ToolError: HTTP 403") and \
        "loopback" in out["web_fetch_refused"]
    log = world.log(group)
    allowed = {(r["host"], r["port"]) for r in log if r["allowed"]}
    assert allowed == {("127.0.0.1", world.hp), ("127.0.0.1", world.sp)}, log
    refused = {r["host"] for r in log if not r["allowed"]}
    assert {"localhost", "::1", "0.0.0.0", "127.0.0.1", "::ffff:7f00:1"} <= refused, refused
    assert all(r["reason"] for r in log if not r["allowed"])


def test_from_inside_a_bwrap_sandbox(world, bwrap_works, tmp_path):
    from nanoclaw.runtime.bwrap import BwrapRuntime

    rt = BwrapRuntime(world.settings.model_copy(update={"warm_pool": 0}))
    out = run_probe(world, rt, "bwrap", sys.executable, tmp_path)
    check_probe(world, out, "bwrap")


def test_from_inside_a_docker_container(world, docker_client, agent_image, tmp_path):
    from nanoclaw.runtime.docker import DockerRuntime

    rt = DockerRuntime(world.settings.model_copy(update={"image": agent_image}))
    try:
        out = run_probe(world, rt, "docker", "python", tmp_path)
    finally:
        rt.cleanup_orphans(f"eg{os.getpid() % 10**6}", set())
    check_probe(world, out, "docker")
