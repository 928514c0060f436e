"""The credential broker in-process, against a hand-driven upstream: unknown tokens get
401; the real credential replaces the session token; a stream passes through as it comes
(the upstream holds back its tail until the client has seen the head); usage is counted
per agent group from SSE and JSON answers; a group over its daily budget gets a clear
error — and, end to end, the user sees it."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import wait_for

from dbread import db_row
from nanoclaw.broker.proxy import Broker
from nanoclaw.broker.usage import Meter, total
from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.util import token_hash

TOKEN = "session-token-1"
REAL = "sk-ant-real-credential"


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


HEAD = sse("message_start", {"type": "message_start", "message": {
    "id": "m1", "type": "message", "role": "assistant", "content": [],
    "usage": {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 2,
              "cache_read_input_tokens": 5}}})
TAIL = (sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}})
        + sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": "hi \"usage\""}})
        + sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 7}})
        + sse("message_stop", {"type": "message_stop"}))


class Upstream:
    """Streams HEAD, then waits for `release` before TAIL; JSON when not streaming."""

    def __init__(self):
        self.release = threading.Event()
        self.seen: list[dict] = []
        up = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                up.seen.append({"headers": dict(self.headers.items()), "body": body})
                if not body.get("stream"):
                    data = json.dumps({"type": "message", "content": [], "usage": {
                        "input_tokens": 3, "output_tokens": 4}}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in (HEAD, None, TAIL):
                    if part is None:
                        up.release.wait(30)
                        continue
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class Running:
    def __init__(self, tmp: Path, upstream: Upstream, **settings):
        self.settings = Settings(data_dir=tmp / "data", logs_dir=tmp / "logs",
                                 groups_dir=tmp / "groups", anthropic_base_url=upstream.url,
                                 anthropic_api_key=REAL, timezone="UTC", **settings)
        self.store = Store.open(self.settings.data_dir)
        self.group = self.store.create_agent_group("G", "g", "anthropic", "m", "Andy")
        sid = self.store.create_session(self.group, None, None, None)["id"]
        self.store.set_container(sid, "running", "c1", token_hash(TOKEN))
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        threading.Thread(target=self._run, daemon=True).start()
        self.url = wait_for(lambda: self.store.get_state("broker_url"), 10, what="broker up")
        self.port = int(self.url.rsplit(":", 1)[1])

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.stop_event = asyncio.Event()
        store = Store.open(self.settings.data_dir)
        self.loop.run_until_complete(Broker(store, self.settings).serve(self.stop_event))

    def close(self):
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.store.close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.stop()


@pytest.fixture
def broker(tmp_path, upstream):
    made: list[Running] = []

    def make(**settings) -> Running:
        made.append(Running(tmp_path / str(len(made)), upstream, **settings))
        return made[-1]

    yield make
    for b in made:
        b.close()


def post(b: Running, body: dict, token: str = TOKEN) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=30)
    conn.request("POST", "/v1/messages", json.dumps(body),
                 {"x-api-key": token, "content-type": "application/json"})
    return conn.getresponse()


def test_unknown_token_is_refused(broker, upstream):
    b = broker()
    r = post(b, {"stream": False}, token="made-up")
    assert r.status == 401
    assert json.loads(r.read())["error"]["type"] == "authentication_error"
    assert upstream.seen == []


def test_credential_swapped_and_json_usage_counted(broker, upstream):
    b = broker()
    r = post(b, {"stream": False, "messages": []})
    assert r.status == 200 and json.loads(r.read())["usage"]["output_tokens"] == 4
    sent = {k.lower(): v for k, v in upstream.seen[0]["headers"].items()}
    assert sent["x-api-key"] == REAL and TOKEN not in json.dumps(sent)
    row = wait_for(lambda: db_row(b.store, "SELECT * FROM token_usage"), 10, what="usage row")
    assert b.store.tokens_used(b.group, row["day"]) == 7 and row["requests"] == 1


def test_stream_arrives_incrementally_and_usage_is_counted(broker, upstream):
    b = broker()
    r = post(b, {"stream": True, "messages": []})
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    got = b""
    while b"message_start" not in got:  # the head, while the upstream still holds the tail
        chunk = r.read1(65536)
        assert chunk, "stream ended before its head arrived"
        got += chunk
    assert not upstream.release.is_set()
    upstream.release.set()
    got += r.read()
    assert got == HEAD + TAIL
    row = wait_for(lambda: db_row(b.store, "SELECT * FROM token_usage"), 10, what="usage row")
    assert (row["input_tokens"], row["output_tokens"], row["cache_creation_input_tokens"],
            row["cache_read_input_tokens"], row["requests"]) == (10, 7, 2, 5, 1)


def test_stream_over_the_unix_socket(broker, upstream):
    b = broker()
    upstream.release.set()

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(b.settings.broker_socket))

    conn = UnixConnection("localhost", timeout=30)
    conn.request("POST", "/v1/messages", json.dumps({"stream": True}), {"x-api-key": TOKEN})
    r = conn.getresponse()
    assert r.status == 200 and r.read() == HEAD + TAIL
    assert oct(b.settings.broker_socket.stat().st_mode & 0o777) == "0o666"


def test_daily_budget_refuses_with_a_clear_message(broker, upstream):
    b = broker(daily_token_budget=20)
    upstream.release.set()
    assert post(b, {"stream": True}).read().endswith(TAIL)  # 24 tokens: now over
    wait_for(lambda: db_row(b.store, "SELECT * FROM token_usage"), 10, what="usage row")
    r = post(b, {"stream": True})
    err = json.loads(r.read())
    assert r.status == 403 and r.getheader("x-should-retry") == "false"
    assert "daily token budget (20 tokens) is used up (24 used today)" in err["error"]["message"]
    assert len(upstream.seen) == 1
    b.store.conn.execute("UPDATE container_configs SET daily_token_budget=1000")
    assert post(b, {"stream": True}).status == 200  # the group's own budget wins


def test_meter_survives_any_chunking():
    stream = HEAD + TAIL
    for size in (1, 2, 7, 64, len(stream)):
        m = Meter("text/event-stream; charset=utf-8")
        for i in range(0, len(stream), size):
            m.feed(stream[i:i + size])
        assert m.finish() == {"input_tokens": 10, "output_tokens": 7,
                              "cache_creation_input_tokens": 2, "cache_read_input_tokens": 5}
        assert total(m.usage) == 24
    j = Meter("application/json")
    j.feed(b'{"type":"message","usage":{"input_tokens":1,')
    j.feed(b'"output_tokens":2}}')
    assert j.finish() == {"input_tokens": 1, "output_tokens": 2}


def test_budget_error_reaches_the_user(host_factory):
    h = host_factory(NANOCLAW_DAILY_TOKEN_BUDGET="1").start()
    c = h.client()
    assert c.wait_reply(c.send("first"), 60)["text"] == "echo: first"
    wait_for(lambda: h.q("SELECT * FROM token_usage"), 10, what="usage counted")
    text = c.wait_reply(c.send("second"), 60)["text"]
    assert text.startswith("Error:") and "daily token budget (1 tokens) is used up" in text
