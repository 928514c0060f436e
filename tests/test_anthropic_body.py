"""The `anthropic` provider's request body (issue 17): the runner encodes the JSON of a
streamed Messages call itself, keeping the encoded tool schemas and system prompt while
they stay equal, and hands the SDK bytes. What goes on the wire must be exactly what
`client.messages.stream(...)` sends for the same arguments: the same body, byte for byte,
and the same headers.

Both requests are captured in a runner-side process (the runner's lazy SDK import is not
brought into the test process) through the SDK's real HTTP client, with an in-memory
transport in place of the network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent

PROBE = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from agent_runner.providers.anthropic import AnthropicApi, anthropic, _http, _WARM_EVENTS
from agent_runner.providers.toolloop import MAX_TOKENS

httpx = _http()
SSE = "".join(f"event: {n}\ndata: {json.dumps(d)}\n\n" for n, d in _WARM_EVENTS).encode()
seen = []

def reply(request):
    seen.append(request)
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=SSE)

http = httpx.Client(transport=httpx.MockTransport(reply))
ours = AnthropicApi("http://api.invalid", "key", http_client=http)
sdk = anthropic.Anthropic(api_key="key", base_url="http://api.invalid", http_client=http,
                          max_retries=0)
VOLATILE = {"x-stainless-read-timeout", "x-stainless-timeout"}

class Quiet:
    def note(self, headers):
        pass

convo = []  # a conversation kept across calls, as the tool loop keeps its history

def capture(case):
    seen.clear()
    if case.get("grow"):
        del convo[:case.get("cut", 0)]
        convo.extend(case["messages"])
        case["messages"] = convo
    turn = ours.stream(case["model"], case["system"], case["messages"], case["tools"],
                       case["effort"], Quiet(), lambda: False)
    try:
        while True:
            next(turn)
    except StopIteration as stop:
        blocks = stop.value.content
    kwargs = {"model": case["model"], "max_tokens": MAX_TOKENS,
              "system": case["system"], "messages": case["messages"]}
    if case["tools"] is not None:
        kwargs["tools"] = case["tools"]
    if case["effort"]:
        kwargs["output_config"] = {"effort": case["effort"]}
    with sdk.messages.stream(**kwargs) as stream:
        for _ in stream:
            pass
    a, b = seen
    heads = lambda r: {k: v for k, v in r.headers.items() if k not in VOLATILE}
    return {"ours": a.content.decode(), "sdk": b.content.decode(),
            "ours_headers": heads(a), "sdk_headers": heads(b),
            "url": [str(a.url), str(b.url)], "blocks": len(blocks),
            "kept": list(ours.body._kept)}

for line in sys.stdin:
    print(json.dumps(capture(json.loads(line))), flush=True)
'''


@pytest.fixture(scope="module")
def probe():
    proc = subprocess.Popen([sys.executable, "-c", PROBE, str(ROOT / "container")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(case: dict) -> dict:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(case) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, f"probe ended: rc={proc.poll()}"
        return json.loads(line)

    yield send
    proc.kill()
    proc.wait()


TOOLS = [{"name": "bash", "description": "Run a command — in the workspace",
          "input_schema": {"type": "object", "properties": {
              "command": {"type": "string", "description": "the command"},
              "timeout": {"type": "integer", "minimum": 1}}, "required": ["command"]}},
         {"name": "send_message", "description": "Send a message",
          "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}}]


def case(**over) -> dict:
    base = {"model": "claude-test", "effort": None,
            "system": "You are Andy. Ünïcödé and \"quotes\"\n", "tools": TOOLS,
            "messages": [{"role": "user", "content": "hello <there> & 🦀"}]}
    base.update(over)
    return base


def same(result: dict) -> None:
    assert result["ours"] == result["sdk"]
    assert result["ours_headers"] == result["sdk_headers"]
    assert result["url"][0] == result["url"][1]


def test_the_body_and_headers_are_the_sdks_own(probe):
    first = probe(case())
    same(first)
    assert first["blocks"] == 2  # the canned answer was read: text and a tool call
    body = json.loads(first["ours"])
    assert body["stream"] is True and body["tools"] == TOOLS
    with_effort = probe(case(effort="low", tools=None))
    same(with_effort)
    assert "tools" not in json.loads(with_effort["ours"])
    assert json.loads(with_effort["ours"])["output_config"] == {"effort": "low"}


def test_kept_parts_follow_a_change(probe):
    """The kept bytes are of the value they were made from: another tool list or system
    prompt on the next call is encoded afresh, and the old one is not sent again."""
    same(probe(case()))
    changed = [dict(TOOLS[0], description="another")] + TOOLS[1:]
    second = probe(case(tools=changed, system="another prompt"))
    same(second)
    body = json.loads(second["ours"])
    assert body["tools"][0]["description"] == "another" and body["system"] == "another prompt"
    third = probe(case())
    same(third)
    assert json.loads(third["ours"])["tools"] == TOOLS
    assert sorted(third["kept"]) == ["system", "tools"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=3),
    max_leaves=10)
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant"]),
    "content": st.text(max_size=40) | st.lists(st.fixed_dictionaries(
        {"type": st.just("tool_result"), "tool_use_id": st.text(max_size=8),
         "content": st.text(max_size=20), "extra": JSON}), max_size=2)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(system=st.text(max_size=60), messages=st.lists(MESSAGE, min_size=1, max_size=4),
       schema=st.dictionaries(st.text(max_size=8), JSON, max_size=3),
       effort=st.sampled_from([None, "low", "high"]), with_tools=st.booleans())
def test_any_conversation_is_sent_as_the_sdk_sends_it(probe, system, messages, schema, effort,
                                                       with_tools):
    tools = [{"name": "t", "description": "d",
              "input_schema": {"type": "object", "properties": schema}}]
    same(probe(case(system=system, messages=messages, effort=effort,
                    tools=tools if with_tools else None)))


def test_a_growing_conversation_is_sent_as_the_sdk_sends_it(probe):
    """The history's messages are encoded once and their bytes kept: as the conversation
    grows, and as its oldest turns are set aside, each body is still the SDK's."""
    for turn in range(6):
        same(probe(case(grow=True, cut=2 if turn == 4 else 0, messages=[
            {"role": "user", "content": f"question {turn} ✓"},
            {"role": "assistant", "content": [{"type": "text", "text": f"answer {turn}"}]}])))
    last = json.loads(probe(case(grow=True, messages=[]))["ours"])["messages"]
    assert [m["content"] for m in last if m["role"] == "user"] == [
        f"question {t} ✓" for t in (1, 2, 3, 4, 5)]
