"""The broker with more than one upstream, in-process, against the fake OpenAI-compatible
server and the fake Anthropic API: each upstream gets its own credential in its own
header (none for a keyless local one), a group reaches only its upstream and its
fallback's (a forged request with its token for another is refused and nothing is
sent), usage of Chat Completions answers (streamed or not, asked for or not) counts into
the same daily budget, which refuses on every upstream; the doctor's check; the
settings' one-line errors; and, in a real host, a request forged with a sandbox's own
token."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from pathlib import Path

import pytest

from conftest import wait_for
from nanoclaw import config, upstreams
from nanoclaw.broker.proxy import CHECK_HEADER, CHECK_STATE, Broker, usage_asked
from nanoclaw.broker.usage import Meter
from nanoclaw.config import Settings, SettingsError
from nanoclaw.db.store import Store
from nanoclaw.devtools.fake_openai import FakeOpenAI
from nanoclaw.util import token_hash

TOKEN = "session-token-up"
OAI_KEY = "sk-openai-real"
ANT_KEY = "sk-ant-real"
NAMED_KEY = "sk-router-real"


class Running:
    """A broker on its own loop; one agent group (`provider`, config columns) with one
    running session whose token is TOKEN."""

    def __init__(self, tmp: Path, settings: Settings, provider: str = "openai", **cols):
        self.settings = settings
        self.store = Store.open(settings.data_dir)
        self.group = self.store.create_agent_group("G", "g", provider, "m", "Andy")
        if cols:
            self.store.update_group_config(self.group, **cols)
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

    def send(self, method: str, target: str, body: dict | None = None,
             headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, target, json.dumps(body) if body is not None else None,
                         {"authorization": f"Bearer {TOKEN}", "content-type":
                          "application/json", **(headers or {})})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def usage(self) -> dict:
        rows = self.store._rows("SELECT * FROM token_usage")
        return rows[0] if rows else {}


@pytest.fixture(scope="module")
def oai_server():
    fake = FakeOpenAI(port=0).start()
    yield fake
    fake.stop()


@pytest.fixture
def oai(oai_server):
    oai_server.clear()
    yield oai_server
    oai_server.clear()


@pytest.fixture
def local():
    fake = FakeOpenAI(port=0).start()
    fake.require_key = False
    yield fake
    fake.stop()


@pytest.fixture
def broker(tmp_path, oai, fake_model, local):
    made: list[Running] = []

    def make(provider: str = "openai", budget: int = 0, **cols) -> Running:
        base = tmp_path / str(len(made))
        named = {"local": {"url": local.url},
                 "router": {"url": oai.url, "key_env": "ROUTER_KEY"},
                 "claude-eu": {"url": fake_model.url, "api": "anthropic", "key_env": "EU_KEY"}}
        s = Settings(data_dir=base / "data", logs_dir=base / "logs", groups_dir=base / "groups",
                     anthropic_base_url=fake_model.url, anthropic_api_key=ANT_KEY,
                     openai_base_url=oai.url, openai_api_key=OAI_KEY, timezone="UTC",
                     upstreams=json.dumps(named), daily_token_budget=budget)
        made.append(Running(base, s.with_upstream_keys({"ROUTER_KEY": NAMED_KEY,
                                                        "EU_KEY": "sk-eu-real"}),
                            provider, **cols))
        return made[-1]

    yield make
    for b in made:
        b.close()


CHAT = {"model": "gpt-fake-1", "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "claude-fake-1", "max_tokens": 16, "messages": [{"role": "user",
                                                                 "content": "hi"}]}


def test_openai_upstream_gets_a_bearer_key_and_usage_counts_json_and_stream(broker, oai):
    b = broker()
    status, raw = b.send("POST", "/up/openai/chat/completions", CHAT)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "echo: hi"
    seen = oai.requests[-1]
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {OAI_KEY}"
    assert TOKEN not in json.dumps(seen["headers"])
    first = wait_for(b.usage, 10, what="usage of the JSON answer")
    reported = json.loads(raw)["usage"]
    assert (first["input_tokens"], first["output_tokens"]) == (
        reported["prompt_tokens"], reported["completion_tokens"])
    # streamed without asking for usage: the broker asks, so the stream carries it
    status, raw = b.send("POST", "/up/openai/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and raw.rstrip().endswith(b"data: [DONE]") and b'"usage"' in raw
    assert oai.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    wait_for(lambda: b.usage().get("requests") == 2, 10, what="usage of the stream")
    assert b.usage()["input_tokens"] > first["input_tokens"]


def test_each_upstream_its_own_credential_and_a_local_one_none(broker, oai, local,
                                                                fake_model):
    b = broker(upstream="router", fallback_upstream="local")
    assert b.send("POST", "/up/router/chat/completions", CHAT)[0] == 200
    assert oai.requests[-1]["headers"]["authorization"] == f"Bearer {NAMED_KEY}"
    assert b.send("POST", "/up/local/chat/completions", CHAT)[0] == 200
    assert "authorization" not in local.requests[-1]["headers"]
    assert "x-api-key" not in local.requests[-1]["headers"]
    e = broker(provider="anthropic", upstream="claude-eu")
    assert e.send("POST", "/up/claude-eu/v1/messages", MSG)[0] == 200
    assert fake_model.requests[-1]["headers"]["x-api-key"] == "sk-eu-real"
    assert "authorization" not in fake_model.requests[-1]["headers"]
    # the bare /v1/messages of the Claude CLI goes to the group's Anthropic-style upstream
    assert e.send("POST", "/v1/messages", MSG)[0] == 200
    assert fake_model.requests[-1]["headers"]["x-api-key"] == "sk-eu-real"


@pytest.mark.parametrize("target", [
    "/up/anthropic/v1/messages", "/v1/messages", "/up/router/chat/completions",
    "/up/nowhere/chat/completions", "/up/openai/../anthropic/v1/messages",
    "/up/local/chat/completions"])
def test_a_group_cannot_reach_an_upstream_it_is_not_allowed(broker, oai, fake_model, local,
                                                            target):
    b = broker()  # an openai group: the openai upstream only
    before = (len(oai.requests), len(fake_model.requests), len(local.requests))
    status, raw = b.send("POST", target, MSG if "messages" in target else CHAT)
    assert status in (403, 404), raw
    err = json.loads(raw)["error"]
    assert err["message"].startswith(("NanoClaw's broker refused", "NanoClaw's broker does"))
    assert (len(oai.requests), len(fake_model.requests), len(local.requests)) == before
    assert b.usage() == {}


def test_only_chat_completions_and_models_are_forwarded_to_openai_style(broker, oai):
    b = broker()
    for method, target in [("POST", "/up/openai/embeddings"), ("POST", "/up/openai/files"),
                           ("POST", "/up/openai/chat/completions/"),
                           ("POST", "/up/openai//chat/completions"),
                           ("POST", "/up/openai/chat/%63ompletions"),
                           ("GET", "/up/openai/chat/completions")]:
        status, raw = b.send(method, target, CHAT)
        assert status == 404 and b"does not forward" in raw, (target, raw)
    assert oai.requests == []
    status, raw = b.send("GET", "/up/openai/models")
    assert status == 200 and json.loads(raw)["data"]


@pytest.mark.parametrize("provider,target,body", [
    ("openai", "/up/openai/chat/completions", CHAT),
    ("anthropic", "/v1/messages", MSG),
    ("anthropic", "/up/local/chat/completions", CHAT)])
def test_the_budget_refuses_on_every_upstream(broker, provider, target, body):
    b = broker(provider=provider, budget=1, fallback_upstream="local")
    assert b.send("POST", target, body)[0] == 200
    wait_for(b.usage, 10, what="usage")
    status, raw = b.send("POST", target, body)
    err = json.loads(raw)["error"]
    assert status == 403 and "daily token budget" in err["message"]


def test_the_doctors_check_needs_its_token_and_reports_each_upstream(broker, local):
    b = broker()
    token = b.store.get_state(CHECK_STATE)
    assert b.send("GET", "/_nanoclaw/upstream/local")[0] == 401  # a session token is not it
    for name in ("openai", "local", "anthropic", "claude-eu"):
        status, raw = b.send("GET", f"/_nanoclaw/upstream/{name}",
                             headers={CHECK_HEADER: token})
        assert status == 200 and json.loads(raw)["ok"] is True, (name, raw)
    local.inject(status=503)
    assert json.loads(b.send("GET", "/_nanoclaw/upstream/local",
                             headers={CHECK_HEADER: token})[1])["status"] == 503


# ---- pure parts ----------------------------------------------------------------------------

def test_meter_reads_chat_completions_usage_with_cached_tokens():
    m = Meter("text/event-stream")
    chunk = {"object": "chat.completion.chunk", "choices": [], "usage": {
        "prompt_tokens": 100, "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 60}}}
    for part in (b'data: {"choices": [{"delta": {"content": "\\"usage\\""}}]}\n\n',
                 f"data: {json.dumps(chunk)}\n\n".encode(), b"data: [DONE]\n\n"):
        m.feed(part)
    assert m.finish() == {"input_tokens": 40, "cache_read_input_tokens": 60,
                          "output_tokens": 7}


def test_usage_is_asked_for_only_on_streams():
    assert json.loads(usage_asked(b'{"stream": true, "stream_options": {"x": 1}}')) == {
        "stream": True, "stream_options": {"x": 1, "include_usage": True}}
    assert usage_asked(b'{"stream": false}') == b'{"stream": false}'
    assert usage_asked(b"not json") == b"not json"


@pytest.mark.parametrize("value,message", [
    ("{bad", "must be a JSON object"),
    ('{"openai": {"url": "http://x"}}', "built in"),
    ('{"Bad Name": {"url": "http://x"}}', "lower-case"),
    ('{"a": {"url": "ftp://x"}}', "http:// or https://"),
    ('{"a": {"url": "http://x", "api": "gemini"}}', "api must be one of"),
    ('{"a": {"url": "http://x", "key": "sk"}}', "unknown key"),
    ('{"a": {"url": "http://x", "key_env": "not a name"}}', "environment variable")])
def test_bad_upstreams_setting_is_one_clear_line(monkeypatch, value, message):
    monkeypatch.setenv("NANOCLAW_UPSTREAMS", value)
    with pytest.raises(SettingsError) as exc:
        config.load()
    text = str(exc.value)
    assert text.startswith("bad setting NANOCLAW_UPSTREAMS: ") and message in text
    assert "\n" not in text


def test_named_keys_are_secrets_scrubbed_from_children(monkeypatch):
    monkeypatch.setenv("NANOCLAW_UPSTREAMS", json.dumps(
        {"router": {"url": "https://r.example/v1", "key_env": "ROUTER_KEY"}}))
    monkeypatch.setenv("ROUTER_KEY", "sk-r")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-o")
    assert {"ROUTER_KEY", "OPENAI_API_KEY"} <= set(config.secret_names())
    env = config.scrubbed_env()
    assert "ROUTER_KEY" not in env and "OPENAI_API_KEY" not in env
    s = config.load()
    assert upstreams.configured(s)["router"].key_env == "ROUTER_KEY"
    assert s.upstream_key("ROUTER_KEY") == ""  # only the broker's copy holds it


def test_groups_update_names_provider_and_upstream(tmp_path, monkeypatch):
    import subprocess
    import sys

    from conftest import ROOT, clean_env

    env = clean_env(NANOCLAW_DATA_DIR=str(tmp_path / "data"),
                    NANOCLAW_GROUPS_DIR=str(tmp_path / "groups"),
                    NANOCLAW_LOGS_DIR=str(tmp_path / "logs"),
                    NANOCLAW_UPSTREAMS=json.dumps({"ollama": {"url": "http://127.0.0.1:1/v1"}}))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "nanoclaw", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    Store.open(tmp_path / "data").close()  # what the host's first start makes
    add = cli("groups", "add", "Research")
    assert add.returncode == 0, add.stderr
    r = cli("groups", "update", "research", "--provider", "openai", "--upstream", "ollama",
            "--model", "llama3.1", "--fallback-upstream", "anthropic")
    assert r.returncode == 0, r.stderr
    listed = cli("groups", "list").stdout
    line = next(ln for ln in listed.splitlines() if "research" in ln)
    assert "openai" in line and "ollama" in line and "llama3.1" in line
    bad = cli("groups", "update", "research", "--upstream", "nowhere")
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "unknown upstream 'nowhere'" in bad.stderr


# ---- in a real host: forged from the sandbox ----------------------------------------------

def test_a_forged_request_with_the_agents_own_token_reaches_no_other_upstream(
        host_factory, fake_model, oai):
    """The agent (process runtime) holds its session token; with it, a request to the
    `openai` upstream its group is not allowed is refused, and nothing reaches it."""
    from conftest import agent_pids

    # no warm pool, no zygote: a cold agent's /proc environ is its session's environment
    h = host_factory(OPENAI_BASE_URL=oai.url, OPENAI_API_KEY=OAI_KEY,
                     NANOCLAW_WARM_POOL="0", NANOCLAW_ZYGOTE="false").start()
    r = h.cli("send", "wake up", "--wait", "60")
    assert r.stdout.strip() == "echo: wake up", r.stderr
    env = {}
    for pid in agent_pids(h.data, spares=False):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            k, _, v = item.decode().partition("=")
            env.setdefault(k, v)
    token, base = env["ANTHROPIC_API_KEY"], env["ANTHROPIC_BASE_URL"]
    assert token and base.startswith("http://127.0.0.1:")
    port = int(base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/up/openai/chat/completions", json.dumps(CHAT),
                 {"authorization": f"Bearer {token}", "content-type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert resp.status == 403 and "may not use upstream 'openai'" in answer["error"]["message"]
    assert oai.requests == []


def test_doctor_checks_each_upstream_through_the_broker_and_names_its_groups(
        host_factory, fake_model, oai, local):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    named = {"local": {"url": local.url}, "dead": {"url": f"http://127.0.0.1:{dead}/v1"}}
    h = host_factory(OPENAI_BASE_URL=oai.url, OPENAI_API_KEY=OAI_KEY,
                     NANOCLAW_UPSTREAMS=json.dumps(named)).start()
    group = h.q("SELECT folder FROM agent_groups")[0]["folder"]
    assert h.cli("groups", "update", group, "--fallback-upstream", "local").returncode == 0
    r = h.cli("doctor")
    lines = {ln.split(" (")[0].split("upstream ")[-1]: ln for ln in r.stdout.splitlines()
             if " upstream " in f" {ln}"}
    assert lines["anthropic"].startswith("ok ") and f"used by {group})" in lines["anthropic"]
    assert lines["openai"].startswith("ok ") and "used by no group" in lines["openai"]
    assert lines["local"].startswith("ok ") and f"used by {group} (fallback)" in lines["local"]
    assert lines["dead"].startswith("BAD") and "unreachable" in lines["dead"]
    assert r.returncode == 1
    # one cheap request each, with each upstream's own credential, through the broker
    assert [q["path"] for q in oai.requests] == ["/v1/models"]
    assert oai.requests[0]["headers"]["authorization"] == f"Bearer {OAI_KEY}"
    assert [q["path"] for q in local.requests] == ["/v1/models"]
    assert [q["path"] for q in fake_model.requests] == ["/v1/models"]
