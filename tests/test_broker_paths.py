"""The broker forwards only what it meters (security review M1): a real broker in front of
the fake model, raw request targets sent with http.client (which, unlike aiohttp's client,
sends a path as written). With the daily budget used up, every route is refused; paths
a normaliser would turn into `/v1/messages`, and every path off the allowlist (batches,
files, models), are refused even under budget, and the upstream never sees them; the
CLI's `?beta=true` passes through exactly. A hypothesis fuzz holds that nothing off the
allowlist is ever forwarded."""

from __future__ import annotations

import http.client
import json
import posixpath
import string
from urllib.parse import unquote

import pytest
from conftest import wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from test_broker import REAL, TOKEN, Running
from yarl import URL

from dbread import db_row
from nanoclaw.broker.proxy import QUERY, ROUTES, route

BODY = {"model": "claude-fake-1", "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}]}

# Shapes that reached upstream /v1/messages (or other paid endpoints) before the fix, and
# their relatives: dot segments, empty segments, escapes, backslashes, other endpoints.
BYPASSES = [
    ("POST", "/v1/./messages"), ("POST", "/v1/x/../messages"), ("POST", "/v1//messages"),
    ("POST", "/v1/%6dessages"), ("POST", "/v1/messages%2F"), ("POST", "/v1/messages/batches"),
    ("POST", "/v1/files"), ("GET", "/v1/models"), ("POST", "/v1/messages/"),
    ("POST", "/v1/messages/."), ("POST", "/v1/%2e/messages"), ("POST", "/v1/%2E%2E/v1/messages"),
    ("POST", "//v1/messages"), ("POST", "/v1/messages\\"), ("POST", "/v1\\messages"),
    ("POST", "/v1/messages/batches?beta=true"), ("GET", "/v1/messages/batches"),
    ("DELETE", "/v1/files/file_1"), ("GET", "/v1/messages"), ("PUT", "/v1/messages"),
    ("POST", "/V1/messages"), ("POST", "/v1/messages#x"), ("POST", "/v1/messages?beta=true#x"),
    ("POST", "/v1/messages/count_tokens/"), ("POST", "http://127.0.0.1/v1/messages"),
    ("POST", "/v1/messages;x"),
]
# aiohttp's own parser answers these 400 (plain text) before the broker sees them.
MALFORMED = [("post", "/v1/messages"), ("POST", "*")]


@pytest.fixture
def upstream(fake_model):
    """The fake model, also keeping the raw request line of everything it gets, whatever
    the method or path (the fake's own log keeps only the API calls it serves)."""
    lines: list[str] = []
    base = fake_model._server.RequestHandlerClass

    class Recording(base):  # type: ignore[misc, valid-type]
        def parse_request(self) -> bool:
            lines.append(self.raw_requestline.decode("latin-1").rstrip("\r\n"))
            return super().parse_request()

    fake_model._server.RequestHandlerClass = Recording
    fake_model.lines = lines
    return fake_model


@pytest.fixture
def broker(tmp_path, upstream):
    made: list[Running] = []

    def make(**settings) -> Running:
        made.append(Running(tmp_path / str(len(made)), upstream, **settings))
        return made[-1]

    yield make
    for b in made:
        b.close()


def send(b: Running, method: str, target: str, body: dict | None = None) -> tuple[int, dict]:
    """`method target` exactly as written; the status and the JSON answer ({} if none;
    {"text": …} when aiohttp's own parser refused the request line before the broker)."""
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=30)
    try:
        conn.request(method, target, json.dumps(body or BODY),
                     {"x-api-key": TOKEN, "content-type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw) if raw else {}
        except ValueError:
            return r.status, {"text": raw.decode("utf-8", "replace")}
    finally:
        conn.close()


def spend(b: Running) -> None:
    """Use up a tiny budget with one real model call, then see it hold."""
    assert send(b, "POST", "/v1/messages")[0] == 200
    wait_for(lambda: db_row(b.store, "SELECT * FROM token_usage"), 10, what="usage row")
    status, err = send(b, "POST", "/v1/messages")
    assert status == 403 and "daily token budget" in err["error"]["message"]


def assert_refused(status: int, answer: dict) -> None:
    if status == 400 and "text" in answer:  # the HTTP parser's refusal, not the broker's
        return
    assert status in (403, 404), (status, answer)
    assert answer["type"] == "error" and answer["error"]["type"] in (
        "permission_error", "not_found_error") and answer["error"]["message"]


@pytest.mark.parametrize("method,target", BYPASSES + MALFORMED + [
    ("POST", "/v1/messages?beta=true"), ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/messages/count_tokens?beta=true")])
def test_spent_budget_forwards_nothing(broker, upstream, method, target):
    b = broker(daily_token_budget=1)
    spend(b)
    before, recorded = list(upstream.lines), list(upstream.requests)
    status, answer = send(b, method, target)
    assert_refused(status, answer)
    if route(method, target)[0] is not None:  # allowed, but not past the budget
        assert status == 403 and "daily token budget" in answer["error"]["message"]
    assert upstream.lines == before and upstream.requests == recorded
    assert db_row(b.store, "SELECT requests FROM token_usage")["requests"] == 1


def test_off_the_allowlist_is_refused_under_budget_too(broker, upstream):
    b = broker()  # no budget: only the allowlist stands in the way
    for method, target in BYPASSES:
        status, answer = send(b, method, target)
        assert status == 404 and answer["error"]["type"] == "not_found_error", (target, answer)
        assert "does not forward" in answer["error"]["message"]
    for method, target in MALFORMED:
        assert send(b, method, target)[0] == 400
    assert upstream.lines == [] and upstream.requests == []
    _, answer = send(b, "POST", "/v1/./messages")
    assert "dot segments" in answer["error"]["message"]
    _, answer = send(b, "POST", "/v1/%6dessages")
    assert "percent-encoded" in answer["error"]["message"]


def test_cli_beta_query_is_forwarded_exactly_and_metered(broker, upstream):
    b = broker(daily_token_budget=1_000_000)
    status, answer = send(b, "POST", "/v1/messages?beta=true")
    assert status == 200 and answer["type"] == "message"
    assert upstream.lines == ["POST /v1/messages?beta=true HTTP/1.1"]
    seen = upstream.requests[0]
    assert (seen["path"], seen["query"], seen["headers"]["x-api-key"]) == (
        "/v1/messages", "beta=true", REAL)
    row = wait_for(lambda: db_row(b.store, "SELECT * FROM token_usage"), 10, what="usage row")
    assert row["requests"] == 1 and row["input_tokens"] == answer["usage"]["input_tokens"]


def test_count_tokens_is_forwarded_unbilled_and_stops_with_the_budget(broker, upstream):
    b = broker(daily_token_budget=1)
    status, answer = send(b, "POST", "/v1/messages/count_tokens?beta=true")
    assert status == 200 and answer["input_tokens"] > 0
    assert upstream.lines == ["POST /v1/messages/count_tokens?beta=true HTTP/1.1"]
    assert db_row(b.store, "SELECT * FROM token_usage") is None  # the API bills no tokens for it
    spend(b)
    before = list(upstream.lines)
    assert send(b, "POST", "/v1/messages/count_tokens")[0] == 403
    assert upstream.lines == before


@pytest.mark.parametrize("provider,line", [
    ("anthropic", "POST /v1/messages HTTP/1.1"),
    ("claude", "POST /v1/messages?beta=true HTTP/1.1")])
def test_real_clients_use_only_the_allowlist(host_factory, upstream, provider, line):
    """The `anthropic` provider (SDK) and the Claude Code CLI, in a real host, through the
    broker: they answer, and all they sent upstream was their model calls. A client update
    that starts calling another endpoint fails here, not in production."""
    if provider == "claude":
        pytest.importorskip("claude_agent_sdk")
    h = host_factory(NANOCLAW_PROVIDER=provider).start()
    r = h.cli("send", "hello broker", "--wait", "60")
    assert r.stdout.strip() == "echo: hello broker", r.stderr
    assert upstream.lines and set(upstream.lines) == {line}, upstream.lines


# ---- fuzz ------------------------------------------------------------------------------
PIECES = ["v1", "messages", "count_tokens", "batches", "files", "models", ".", "..", "",
          "%2e", "%2E", "%2F", "%2f", "%6d", "%6dessages", "messages%2F", "\\", "messages\\",
          "messages;", "x"]
TEXT = string.ascii_letters + string.digits + string.punctuation  # printable, no spaces


def targets() -> st.SearchStrategy[str]:
    """Request targets near the allowlist (its pieces, dots, escapes, slashes) and far."""
    segments = st.lists(st.sampled_from(PIECES) | st.text(TEXT, max_size=6), max_size=5)
    path = st.builds(lambda lead, segs: lead + "/".join(segs),
                     st.sampled_from(["/", "//", "", "/v1/"]), segments)
    query = st.sampled_from(["", "?", "?beta=true", "?beta=true#f", "?a=%2e%2e/x"]) | st.text(
        TEXT, max_size=8).map(lambda q: "?" + q)
    allowed = st.sampled_from(sorted(path for _, path in ROUTES))
    return (st.builds(str.__add__, path | allowed, query)
            | st.text(TEXT, min_size=1, max_size=30))


@settings(max_examples=3000, deadline=None, database=None)
@given(st.sampled_from(["POST", "GET", "PUT", "post"]), targets())
def test_fuzz_accepted_targets_are_fixed_points_of_every_normaliser(method, target):
    """What `route` lets through, no client, proxy or server on the way can rewrite."""
    found, why = route(method, target)
    path, _, query = target.partition("?")
    if found is None:
        assert why
        return
    assert ROUTES[(method, path)] is found and QUERY.fullmatch(query)
    assert unquote(path) == path == posixpath.normpath(path)
    assert URL("http://h" + path).raw_path == path


def test_fuzz_nothing_off_the_allowlist_reaches_upstream(broker, upstream):
    b = broker()  # no budget: whatever is refused, the allowlist refused it

    # given() inside the test: one broker for all examples (a fixture per example is slow)
    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "post"]),
           targets())
    def check(method: str, target: str) -> None:
        before = len(upstream.lines)
        status, answer = send(b, method, target)
        path, _, query = target.partition("?")
        if (method, path) in ROUTES and QUERY.fullmatch(query):
            sent = path + (f"?{query}" if query else "")  # as it came, a bare `?` dropped
            assert upstream.lines[before:] == [f"{method} {sent} HTTP/1.1"], target
        else:
            assert upstream.lines[before:] == [], target
            assert status in (400, 404), (target, status, answer)

    check()
