"""The fake OpenAI-compatible server against the real `openai` client: streamed text and
tool calls, the usage chunk, `[DONE]`, non-streaming answers, injected 429/5xx, stalls
and the Authorization header it records; and standalone, as `make bench` runs it."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import httpx
import openai
import pytest

from nanoclaw.devtools.fake_openai import FakeOpenAI


@pytest.fixture(scope="module")
def server():
    fake = FakeOpenAI(port=0).start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(server):
    server.clear()
    yield server
    server.clear()
    server.context_tokens = None


@pytest.fixture
def client(fake):
    return openai.OpenAI(base_url=fake.url, api_key="sk-test-key", max_retries=0)


def user(text):
    return [{"role": "user", "content": text}]


def test_plain_call_echoes_and_reports_usage(client, fake):
    r = client.chat.completions.create(model="m", messages=user("hello there"))
    assert r.choices[0].message.content == "echo: hello there"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert fake.authorizations() == ["Bearer sk-test-key"]
    assert fake.requests[-1]["path"] == "/v1/chat/completions"


def test_stream_has_deltas_tool_calls_a_usage_chunk_and_done(fake):
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True},
            "messages": user('go [[tool:send_message {"text": "hi"}]]')}
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": "Bearer k", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and "text/event-stream" in resp.getheader("content-type")
    lines = [ln for ln in resp.read().decode().split("\n\n") if ln]
    conn.close()
    assert lines[-1] == "data: [DONE]"
    data = [json.loads(ln[6:]) for ln in lines[:-1]]
    calls = [c for d in data for ch in d["choices"] for c in ch["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "send_message"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"text": "hi"}
    assert data[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert data[-1]["choices"] == [] and data[-1]["usage"]["total_tokens"] > 0


def test_streamed_tool_round_trip_with_the_client(client):
    stream = client.chat.completions.create(
        model="m", stream=True, stream_options={"include_usage": True},
        messages=user('please [[tool:bash {"command": "ls"}]]'))
    args, name, usage = "", None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
    assert name == "bash" and json.loads(args) == {"command": "ls"} and usage is not None
    second = client.chat.completions.create(model="m", messages=[
        *user("please"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "bash", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "file.txt"}])
    assert second.choices[0].message.content == "done: file.txt"


def test_no_stream_usage_chunk_unless_asked(fake):
    body = {"model": "m", "stream": True, "messages": user("x")}
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": "Bearer k"})
    text = conn.getresponse().read().decode()
    conn.close()
    assert '"usage"' not in text and text.rstrip().endswith("data: [DONE]")


def test_injected_errors_and_missing_key(client, fake):
    fake.inject(429, retry_after=2)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="m", messages=user("x"))
    assert exc.value.response.headers["retry-after"] == "2"
    assert exc.value.body["code"] == "rate_limit_exceeded"
    fake.inject(503)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=user("x"))
    assert client.chat.completions.create(model="m", messages=user("x")).choices
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": []}))
    resp = conn.getresponse()
    assert resp.status == 401 and json.loads(resp.read())["error"]["code"] == "invalid_api_key"
    conn.close()


def test_context_full_and_stall(client, fake):
    fake.context_tokens = 5
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="m", messages=user("a long prompt " * 10))
    assert exc.value.body["code"] == "context_length_exceeded"
    fake.context_tokens = None
    fake.inject(stall_ms=3000)
    slow = openai.OpenAI(base_url=fake.url, api_key="k", max_retries=0, timeout=0.5)
    # mid-stream, the client lets httpx's own timeout through
    with pytest.raises((openai.APITimeoutError, httpx.ReadTimeout)):
        for _ in slow.chat.completions.create(model="m", stream=True, messages=user("x")):
            pass


def test_runs_standalone():
    proc = subprocess.Popen([sys.executable, "-m", "nanoclaw.devtools.fake_openai", "--port",
                             "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:") and line.strip().endswith("/v1")
        c = openai.OpenAI(base_url=line.split()[-1], api_key="k", max_retries=0)
        assert c.models.list().data[0].id == "gpt-fake-1"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
