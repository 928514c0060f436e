"""The `openai` provider: first the runner alone against the fake OpenAI-compatible
server (turns, the one toolbox, retries, fallback, context-full, visible errors), then a
real host (process runtime) whose broker holds the keys: an `openai` agent answers
through the broker, the fake saw the real key and the agent none, a tool round trip, a
Claude model that stays busy falls back to a local OpenAI-compatible model and the chat
is told, usage from both formats lands in `nanoclaw usage`, and a group over its budget
is refused on every provider."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import SECRET, agent_pids, wait_for
from nanoclaw.devtools.fake_openai import FakeOpenAI
from nanoclaw.devtools.runner_harness import Runner, Session

OPENAI_SECRET = "sk-openai-test-secret-do-not-leak"


@pytest.fixture(scope="module")
def oai_server():
    fake = FakeOpenAI(port=0).start()
    yield fake
    fake.stop()


@pytest.fixture
def oai(oai_server):
    oai_server.clear()
    oai_server.require_key = True
    yield oai_server
    oai_server.clear()
    oai_server.context_tokens = None
    oai_server.require_key = True


def calls(fake) -> list[dict]:
    return [r for r in list(fake.requests) if r["path"].endswith("/chat/completions")]


# ---- the runner alone ----------------------------------------------------------------------

@pytest.fixture
def session(tmp_path):
    return Session(tmp_path, provider="openai", model="gpt-fake-1")


@pytest.fixture
def start(session, oai):
    runners: list[Runner] = []

    def _start(**env: str) -> Runner:
        # the fake stands where the broker would: the runner calls <it>/up/openai/...
        r = Runner(session, oai.root, {"NANOCLAW_MODEL_RETRIES": "1", **env})
        runners.append(r)
        return r

    yield _start
    for r in runners:
        assert r.stop() == 0, r.text()


def test_an_openai_turn_streams_through_the_upstream_path(session, oai, start):
    start()
    mid = session.chat("hello <there>")
    assert session.reply_to(mid)["text"] == "echo: hello <there>"
    session.completed(mid)
    (call,) = calls(oai)
    assert call["path"] == "/up/openai/chat/completions"
    body = call["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "gpt-fake-1" and body["messages"][0]["role"] == "system"
    assert "You are Andy" in body["messages"][0]["content"]
    names = {t["function"]["name"] for t in body["tools"]}
    assert {"bash", "read", "write", "edit", "glob", "grep", "web_fetch", "send_message",
            "schedule_task"} <= names
    assert call["headers"]["authorization"] == "Bearer session-token"


def test_send_message_round_trip_uses_the_shared_toolbox(session, oai, start):
    start()
    mid = session.chat('[[tool:send_message {"text": "hi from a tool"}]]')
    assert session.reply_to(mid)["text"] == "hi from a tool"
    session.completed(mid)
    first, second = calls(oai)
    call = second["body"]["messages"][-2]["tool_calls"][0]
    assert call["function"]["name"] == "send_message"
    result = second["body"]["messages"][-1]
    assert result["role"] == "tool" and result["tool_call_id"] == call["id"]
    assert result["content"].startswith("Message sent")
    assert [r["text"] for r in session.out()] == ["hi from a tool"]


def test_a_tool_error_goes_back_to_the_model(session, oai, start):
    start()
    mid = session.chat('[[tool:write {"path": "/etc/nanoclaw-oai", "content": "x"}]]')
    session.reply_to(mid)
    result = calls(oai)[1]["body"]["messages"][-1]
    assert result["role"] == "tool" and "outside the folders" in result["content"]
    assert not os.path.exists("/etc/nanoclaw-oai")


def test_busy_retries_visibly_then_falls_back_to_another_upstream(session, oai, start):
    session.configure(fallback_upstream="backup", fallback_upstream_api="openai",
                      fallback_model="gpt-backup")
    oai.inject(status=429, count=2, retry_after=0.01)
    start()
    mid = session.chat("are you there")
    wait_for(lambda: len([r for r in session.out() if r["in_reply_to"] == mid]) == 3, 15,
             what="the retry notice, the fallback notice and the answer")
    texts = [r["text"] for r in session.out()]
    assert texts[0].startswith("The model is busy (HTTP 429, rate limited); retrying")
    assert texts[1] == ("(gpt-fake-1 (openai) is still busy (rate limited), so gpt-backup"
                        " (backup) answers for now.)")
    assert texts[2] == "echo: are you there"
    assert [(c["path"], c["body"]["model"]) for c in calls(oai)] == [
        ("/up/openai/chat/completions", "gpt-fake-1"),
        ("/up/openai/chat/completions", "gpt-fake-1"),
        ("/up/backup/chat/completions", "gpt-backup")]


def test_a_server_error_without_fallback_is_a_visible_error(session, oai, start):
    oai.inject(status=503, count=2, retry_after=0.01)
    start()
    mid = session.chat("hello?")
    session.completed(mid)
    texts = [r["text"] for r in session.out()]
    assert texts[-1].startswith("Error: model overloaded/rate limited (HTTP 503")
    assert "gave up after 2 attempts" in texts[-1]
    again = session.chat("again")
    assert session.reply_to(again)["text"] == "echo: again"


def test_a_full_context_sets_older_turns_aside(session, oai, start):
    start()
    for i in range(4):
        mid = session.chat(f"turn {i} " + "x" * 400)
        session.reply_to(mid)
    session.completed(mid)
    last = calls(oai)[-1]["body"]["messages"]
    oai.context_tokens = len(json.dumps(last)) // 4 + 1
    oai.clear()
    mid = session.chat("turn 4 " + "x" * 400)
    wait_for(lambda: len([r for r in session.out() if r["in_reply_to"] == mid]) == 2, 15,
             what="a notice and the answer")
    notice, answer = [r["text"] for r in session.out() if r["in_reply_to"] == mid]
    assert notice.startswith("(My context was full, so I set aside the oldest 4 messages")
    assert "turn 4" in answer
    (kept,) = (session.group / "conversations").glob("*.md")
    assert "turn 0" in kept.read_text() and kept.name in notice
    cont = session.state("continuation:openai")
    assert (Path(session.paths.work) / ".provider" / f"openai-{cont}.json").exists()


def test_the_conversation_is_resumed_after_a_restart(session, oai, start):
    runner = start()
    first = session.chat("my name is Bob")
    session.completed(first)
    assert runner.stop() == 0
    start()
    second = session.chat("who am I")
    session.reply_to(second)
    texts = [m.get("content") for m in calls(oai)[-1]["body"]["messages"]]
    assert any("my name is Bob" in (t or "") for t in texts)


# ---- a real host, its broker and both fakes -----------------------------------------------

def chat(h, text: str) -> str:
    r = h.cli("send", text, "--wait", "60")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def secrets_in(path: Path, secrets: tuple[str, ...]) -> list[str]:
    found = []
    for f in path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            found += [f"{f}: {s}" for s in secrets if s.encode() in data]
    return found


def test_an_openai_agent_answers_through_the_broker_holding_the_only_key(host_factory, oai):
    # no warm pool, no zygote: a cold agent's /proc environ is its session's environment
    h = host_factory(NANOCLAW_PROVIDER="openai", NANOCLAW_MODEL="gpt-fake-1",
                     OPENAI_BASE_URL=oai.url, OPENAI_API_KEY=OPENAI_SECRET,
                     NANOCLAW_WARM_POOL="0", NANOCLAW_ZYGOTE="false").start()
    assert chat(h, "hello openai") == "echo: hello openai"
    assert oai.authorizations() == [f"Bearer {OPENAI_SECRET}"]  # the real key, from the broker
    assert calls(oai)[0]["path"] == "/v1/chat/completions"
    # a tool round trip through the broker
    assert chat(h, '[[tool:send_message {"text": "sent by a tool"}]]') == "sent by a tool"
    assert [c["body"]["messages"][-1]["role"] for c in calls(oai)[1:]] == ["user", "tool"]
    # the agent's environment and files hold neither key
    pids = agent_pids(h.data, spares=False)
    assert pids
    for pid in pids:
        env = Path(f"/proc/{pid}/environ").read_bytes()
        assert OPENAI_SECRET.encode() not in env and SECRET.encode() not in env
    env = b"\0".join(Path(f"/proc/{p}/environ").read_bytes() for p in pids)
    assert b"ANTHROPIC_API_KEY=" in env  # the session token is there, and only it
    assert secrets_in(h.data / "sessions", (OPENAI_SECRET, SECRET)) == []
    assert secrets_in(h.base / "groups", (OPENAI_SECRET, SECRET)) == []
    # three Chat Completions answers (the echo, the tool call, its result) counted
    row = wait_for(lambda: next((r for r in h.q("SELECT * FROM token_usage")
                                 if r["requests"] == 3), None), 10, what="usage counted")
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0


def test_busy_claude_falls_back_to_a_local_model_and_usage_counts_both(host_factory,
                                                                        fake_model, oai):
    oai.require_key = False  # an Ollama-like server on the host's loopback
    upstreams = json.dumps({"local": {"url": oai.url}})
    h = host_factory(NANOCLAW_UPSTREAMS=upstreams).start()
    group = h.q("SELECT id FROM agent_groups")[0]["id"]
    r = h.cli("groups", "update", group, "--fallback-upstream", "local",
              "--fallback-model", "llama-fake")
    assert r.returncode == 0, r.stderr
    assert chat(h, "first, from claude") == "echo: first, from claude"
    fake_model.inject(status=429, count=4, retry_after=0)  # the call and its 3 retries
    client = h.client()
    mid = client.send("are you there")
    wait_for(lambda: any(f.get("text") == "echo: are you there" for f in client.replies_to(mid)),
             60, what="the answer from the fallback")
    texts = [f["text"] for f in client.replies_to(mid)]
    assert ("(claude-sonnet-4-5 (anthropic) is still busy (rate limited), so llama-fake"
            " (local) answers for now.)") in texts
    (call,) = calls(oai)
    assert call["body"]["model"] == "llama-fake" and "authorization" not in call["headers"]
    assert "are you there" in call["body"]["messages"][-1]["content"]
    # usage from both formats, in one row of the group's day
    # the first answer (Messages API) and the fallback's (Chat Completions); the 429s cost
    # nothing
    row = wait_for(lambda: next((r for r in h.q("SELECT * FROM token_usage WHERE"
                                                " agent_group_id=?", (group,))
                                 if r["requests"] == 2), None), 10, what="usage of both calls")
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0
    out = h.cli("usage").stdout
    assert str(row["input_tokens"] + row["output_tokens"]) in out, out


@pytest.mark.parametrize("provider", ["anthropic", "openai", "claude"])
def test_a_group_over_its_budget_is_refused_clearly_on_every_provider(host_factory, oai,
                                                                      provider):
    if provider == "claude":
        pytest.importorskip("claude_agent_sdk")
    h = host_factory(NANOCLAW_PROVIDER=provider, OPENAI_BASE_URL=oai.url,
                     OPENAI_API_KEY=OPENAI_SECRET, NANOCLAW_DAILY_TOKEN_BUDGET="1").start()
    assert chat(h, "spend it").startswith("echo: spend it")
    r = h.cli("send", "and more", "--wait", "60")
    # the terminal shows an agent's error on stderr (exit non-zero), as "Error: …" before
    text = r.stdout.strip() or r.stderr.strip()
    assert r.returncode != 0 or text.startswith("Error:"), text
    assert "daily token budget (1 tokens) is used up" in text and "renews at midnight" in text


def test_a_busy_openai_model_falls_back_to_claude_and_the_chat_is_told(host_factory,
                                                                       fake_model, oai):
    h = host_factory(NANOCLAW_PROVIDER="openai", NANOCLAW_MODEL="gpt-fake-1",
                     OPENAI_BASE_URL=oai.url, OPENAI_API_KEY=OPENAI_SECRET).start()
    group = h.q("SELECT id FROM agent_groups")[0]["id"]
    r = h.cli("groups", "update", group, "--fallback-upstream", "anthropic",
              "--fallback-model", "claude-fake-1")
    assert r.returncode == 0, r.stderr
    oai.inject(status=429, count=4, retry_after=0)  # the call and its 3 retries
    client = h.client()
    mid = client.send("anyone?")
    wait_for(lambda: any(f.get("text") == "echo: anyone?" for f in client.replies_to(mid)),
             60, what="the answer from the fallback")
    texts = [f["text"] for f in client.replies_to(mid)]
    assert texts[0] == "The model is busy (HTTP 429, rate limited); retrying…"
    assert ("(gpt-fake-1 (openai) is still busy (rate limited), so claude-fake-1"
            " (anthropic) answers for now.)") in texts
    assert len(calls(oai)) == 4
    (call,) = [q for q in fake_model.requests if q["path"] == "/v1/messages"]
    assert call["body"]["model"] == "claude-fake-1" and call["headers"]["x-api-key"] == SECRET
