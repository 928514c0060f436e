"""Linear issue comments as chat (issue 14).

End to end: a real host whose door takes Linear-signed Comment webhooks from
`LinearSender` and whose `channel:linear` worker POSTs GraphQL to a fake Linear on
127.0.0.1 (tests/fakes/fake_linear.py), which sends the bot's own comments back by
webhook as Linear does. In-process: the rate-limit and key errors, the replay window on
a fake clock, and the webhook parser under hypothesis."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from conftest import Host, wait_for
from fakes.fake_linear import ANN, SECRET, VIEWER, FakeLinear, LinearSender, sign
from fakes.hosts import inbound_events, wire_chat
from nanoclaw import config
from nanoclaw.channels.base import OutboundMessage, RetryAfter, SendError
from nanoclaw.channels.linear import LinearChannel
from nanoclaw.channels.linear_webhook import LinearWebhook, parse
from nanoclaw.channels.webhook import BadPayload

BOB = {"id": "user-bob", "name": "Bob"}


@pytest.fixture(scope="module")
def lin():
    fake = FakeLinear().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory, lin):
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path_factory.mktemp("lin"), model.url, {
        **lin.host_env(), "NANOCLAW_SEND_ATTEMPTS": "2", "NANOCLAW_WEB_ENABLED": "false"})
    h.start()
    lin.attach(h)
    wait_for(lambda: lin.connected(h), 30, what="door up and the channel's first call")
    yield h
    h.cleanup()
    model.stop()


@pytest.fixture(scope="module")
def hook(host, lin) -> LinearSender:
    assert lin.sender is not None
    return lin.sender


def events_of(host: Host, team: str) -> list[dict]:
    return [e for e in inbound_events(host, "linear") if e["platform_id"] == f"linear:{team}"]


def answer(lin: FakeLinear, team: str, text: str, timeout: float = 60):
    return wait_for(lambda: next((s for s in lin.bot_sent(team) if s.text == text), None),
                    timeout, what=repr(text))


def test_a_comment_is_answered_as_a_threaded_reply_on_its_issue(host, lin, hook):
    team = lin.chat(1)
    wire_chat(host, "linear", f"linear:{team}", is_group=True)
    issue = lin.issue(team)
    top = lin.comment(issue["id"], "what is the status?")
    got = answer(lin, team, "echo: what is the status?")
    assert (got.thread, got.reply_to) == (issue["id"], top["id"])  # parentId: under it
    (ev,) = events_of(host, team)
    assert (ev["message_id"], ev["thread_id"]) == (top["id"], issue["id"])
    assert ev["payload"]["sender_id"] == ANN["id"] and ev["payload"]["sender_name"] == "Ann"
    # a reply in that thread is answered under the same top-level comment (one level)
    reply = lin.comment(issue["id"], "and the ETA?", parent=top["id"])
    got = answer(lin, team, "echo: and the ETA?")
    assert got.reply_to == top["id"] and reply["parentId"] == top["id"]


def test_a_bad_signature_or_a_stale_webhook_is_refused_and_stores_nothing(host, lin, hook):
    team = lin.chat(2)
    wire_chat(host, "linear", f"linear:{team}", is_group=True)
    issue = lin.issue(team)
    c = lin._add_comment(issue["id"], ANN, "forged?")
    raw = json.dumps(lin.event(c)).encode()
    assert hook.post(raw, signature=None) == 401
    assert hook.post(raw, signature="0" * 64) == 401
    assert hook.post(raw, signature=sign(raw, "not-the-secret")) == 401
    assert hook.post(raw.replace(b"forged", b"FORGED"), signature=sign(raw)) == 401
    stale = json.dumps(lin.event(c, at=time.time() - 120)).encode()  # tolerance: 60 s
    assert hook.post(stale) == 401
    future = json.dumps(lin.event(c, at=time.time() + 120)).encode()
    assert hook.post(future) == 401
    no_time = json.dumps({k: v for k, v in lin.event(c).items()
                          if k != "webhookTimestamp"}).encode()
    assert hook.post(no_time) == 401
    assert events_of(host, team) == []
    assert hook.post(raw) == 200
    assert [e["message_id"] for e in events_of(host, team)] == [c["id"]]


def test_the_bots_own_comment_never_wakes_the_agent(host, lin, hook):
    team = lin.chat(3)
    wire_chat(host, "linear", f"linear:{team}", is_group=True)
    issue = lin.issue(team)
    lin.comment(issue["id"], "first")
    answer(lin, team, "echo: first")  # came back by webhook as Linear sends it: not stored
    mine = lin.comment(issue["id"], "a note I wrote myself", user=VIEWER)
    app = lin._add_comment(issue["id"], BOB, "from an integration")
    ev = lin.event(app)
    ev["data"]["botActor"] = {"id": "app-1", "name": "Some app", "type": "oauthClient"}
    hook.deliver(ev)
    lin.comment(issue["id"], "last")
    answer(lin, team, "echo: last")
    ids = [e["message_id"] for e in events_of(host, team)]
    assert mine["id"] not in ids and app["id"] not in ids and len(ids) == 2
    assert [s.text for s in lin.bot_sent(team)] == ["echo: first", "a note I wrote myself",
                                                   "echo: last"]
    assert not [e for e in inbound_events(host, "linear")
                if e["payload"].get("sender_id") == VIEWER["id"]]


# ---- in-process -----------------------------------------------------------------------
@pytest.fixture
def fake():
    f = FakeLinear().start()
    yield f
    f.stop()


@pytest.fixture
def settings(tmp_path, monkeypatch, fake):
    for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data", **fake.host_env()}.items():
        monkeypatch.setenv(k, str(v))
    return config.load()


def test_ratelimited_is_retry_after_and_a_refused_key_fails_for_good(settings, fake):
    team = fake.chat(4)
    issue = fake.issue(team)

    async def go():
        ch = LinearChannel(settings, None)
        await ch.setup()
        try:
            fake.inject("create", status=429, retry_after=30, team=team)
            with pytest.raises(RetryAfter) as limited:
                await ch.deliver(f"linear:{team}", issue["id"],
                                 OutboundMessage("a", "chat", {"text": "hi"}))
            got = await ch.deliver(f"linear:{team}", issue["id"],
                                   OutboundMessage("b", "chat", {"text": "hi again"}))
            fake.key = "lin_api_rotated"
            with pytest.raises(SendError) as refused:
                await ch.deliver(f"linear:{team}", issue["id"],
                                 OutboundMessage("c", "chat", {"text": "no key"}))
            return limited.value.seconds, got, refused.value
        finally:
            await ch.teardown()
    seconds, got, refused = asyncio.run(go())
    assert 25 <= seconds <= 30  # from X-RateLimit-Requests-Reset, not a guess
    assert [s.text for s in fake.bot_sent(team)] == ["hi again"] and got == fake.bot_sent(
        team)[0].id
    assert refused.permanent and "LINEAR_API_KEY" in str(refused)


def test_the_replay_window_is_checked_on_the_webhooks_own_clock(settings, fake):
    now = [1_800_000_000.0]
    hook = LinearWebhook(settings, None, clock=lambda: now[0])
    issue = fake.issue(fake.chat(5))
    ev = fake.event(fake._add_comment(issue["id"], ANN, "hi"), at=now[0])
    raw = json.dumps(ev).encode()
    headers = {"Linear-Signature": sign(raw, SECRET)}
    assert hook.verify(raw, headers)
    now[0] += 59
    assert hook.verify(raw, headers)
    now[0] += 2  # 61 s later: a replay
    assert not hook.verify(raw, headers)


# ---- the parser, fuzzed -----------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                        | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)
data = st.fixed_dictionaries({
    "id": st.sampled_from(["com-1", "", "../x"]) | anything,
    "body": st.text() | anything, "issueId": st.sampled_from(["iss-1"]) | anything,
    "userId": st.sampled_from(["user-ann"]) | anything, "updatedAt": st.text(max_size=30),
    "issue": st.fixed_dictionaries({"identifier": st.sampled_from(["ENG-1", "x", ""]) |
                                    anything, "team": st.fixed_dictionaries({
                                        "key": st.sampled_from(["ENG", "a b", ""]) | anything})})
    | anything}) | anything
body = st.fixed_dictionaries({"type": st.sampled_from(["Comment", "Issue"]) | anything,
                              "action": st.sampled_from(["create", "update", "remove"]),
                              "data": data, "actor": anything}) | anything


@hsettings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(b=body)
def test_a_webhook_body_parses_to_a_well_formed_comment_or_one_clear_error(b):
    try:
        c = parse(b)
    except BadPayload as e:
        assert "\n" not in str(e)
        return
    if c is not None:
        assert c.team and c.issue_id and c.id and c.user_id and c.key.startswith(c.id)
        assert c.platform_id == f"linear:{c.team}" and isinstance(c.body, str)
