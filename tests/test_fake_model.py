"""The fake Anthropic API against the real `anthropic` client (and raw HTTP for the rest)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import anthropic
import pytest

from nanoclaw.devtools.fake_model import FakeModel


@pytest.fixture
def client(fake):
    return anthropic.Anthropic(base_url=fake.url, api_key="test-key", max_retries=2)


def raw(fake, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={"content-type": "application/json",
                                                     **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def user(text):
    return [{"role": "user", "content": text}]


def test_plain_call_echoes(client, fake):
    msg = client.messages.create(model="m", max_tokens=50, messages=user("hello there"))
    assert msg.content[0].text == "echo: hello there"
    assert msg.stop_reason == "end_turn"
    assert msg.usage.cache_read_input_tokens == 0 and msg.usage.input_tokens > 0
    req = fake.requests[-1]
    assert req["path"] == "/v1/messages"
    assert req["body"]["messages"][0]["content"] == "hello there"
    assert req["headers"]["authorization"] == "Bearer test-key"


def test_streaming_with_message_block(client):
    prompt = ('<context timezone="UTC"/>\n<messages>\n<message id="2" from="a">one</message>\n'
              '<message id="4" from="tg-main" sender="Al">two &amp; three</message>\n</messages>')
    with client.messages.stream(model="m", max_tokens=50, messages=user(prompt)) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert "message_start" in events and "message_stop" in events
    assert final.content[0].text == '<message to="tg-main">echo: two & three</message>'


def test_tool_round_trip(client):
    first = client.messages.create(
        model="m", max_tokens=50, messages=user('please [[tool:bash {"command": "ls"}]]'))
    assert first.stop_reason == "tool_use"
    call = first.content[0]
    assert (call.type, call.name, call.input) == ("tool_use", "bash", {"command": "ls"})
    assert call.id.startswith("toolu_")
    second = client.messages.create(model="m", max_tokens=50, messages=[
        {"role": "user", "content": 'please [[tool:bash {"command": "ls"}]]'},
        {"role": "assistant",
         "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": [{"type": "text", "text": "a.txt b.txt"}]}]},
    ])
    assert second.content[0].text == "done: a.txt b.txt"


def test_streamed_tool_use(client):
    with client.messages.stream(model="m", max_tokens=50,
                                messages=user('[[tool:write {"path": "x", "content": "y"}]]'),
                                ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].input == {"path": "x", "content": "y"}


def test_injected_429_is_retried_after_retry_after(client, fake):
    fake.inject(status=429, count=1, retry_after=0.01)
    msg = client.messages.create(model="m", max_tokens=50, messages=user("again"))
    assert msg.content[0].text == "echo: again"
    assert len(fake.requests) == 2


def test_injected_429_surfaces_after_retries(fake):
    fake.inject(status=429, count=1, retry_after=1)
    resp, data = raw(fake, "POST", "/v1/messages",
                     {"model": "m", "max_tokens": 5, "messages": user("x")}, {"x-api-key": "k"})
    assert resp.status == 429 and resp.getheader("retry-after") == "1"
    assert resp.getheader("content-type") == "application/json"
    assert json.loads(data)["error"]["type"] == "rate_limit_error"
    fake.inject(status=529, count=3, retry_after=0.01)
    c = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=2)
    with pytest.raises(anthropic.APIStatusError) as info:
        c.messages.create(model="m", max_tokens=5, messages=user("x"))
    assert info.value.status_code == 529


def test_dropped_connection_is_retried(client, fake):
    fake.inject(drop=True, count=1)
    msg = client.messages.create(model="m", max_tokens=50, messages=user("after drop"))
    assert msg.content[0].text == "echo: after drop"
    assert len(fake.requests) == 2


def test_count_tokens_and_models(client):
    assert client.messages.count_tokens(model="m", messages=user("hello")).input_tokens > 0
    assert [m.id for m in client.models.list().data] == ["claude-fake-1"]


def test_auth_headers(fake):
    body = {"model": "m", "max_tokens": 5, "messages": user("k")}
    resp, _ = raw(fake, "POST", "/v1/messages?beta=true", body, {"x-api-key": "k"})
    assert resp.status == 200
    assert fake.requests[-1]["path"] == "/v1/messages"
    resp, _ = raw(fake, "POST", "/v1/messages", body, {"authorization": "Bearer t"})
    assert resp.status == 200
    resp, data = raw(fake, "POST", "/v1/messages", body)
    assert resp.status == 401
    assert json.loads(data) == {"type": "error", "error": {
        "type": "authentication_error", "message": json.loads(data)["error"]["message"]}}


def test_http_controls(fake):
    resp, _ = raw(fake, "POST", "/_fake/inject", {"status": 500, "count": 1})
    assert resp.status == 200
    body = {"model": "m", "max_tokens": 5, "messages": user("z")}
    resp, _ = raw(fake, "POST", "/v1/messages", body, {"x-api-key": "k"})
    assert resp.status == 500
    resp, data = raw(fake, "GET", "/_fake/requests")
    assert [r["path"] for r in json.loads(data)] == ["/v1/messages"]
    raw(fake, "POST", "/_fake/reset", {})
    assert fake.requests == []


def test_standalone_process_serves_until_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "nanoclaw.devtools.fake_model", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        assert c.messages.create(model="m", max_tokens=5, messages=user("p")).content[0].text \
            == "echo: p"
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_injected_delay_still_answers(client, fake):
    fake.inject(delay_ms=20, count=1)
    assert client.messages.create(model="m", max_tokens=5, messages=user("slow")).content[0].text \
        == "echo: slow"


def test_reply_override():
    fake = FakeModel(reply="fixed").start()
    try:
        c = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=0)
        text = c.messages.create(model="m", max_tokens=5,
                                 messages=user('<message id="1" from="x">hi</message>'))
        assert text.content[0].text == '<message to="x">fixed</message>'
    finally:
        fake.stop()
