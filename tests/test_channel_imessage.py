"""iMessage end to end against a fake BlueBubbles Server (tests/fakes/fake_bluebubbles.py):
a real host whose `channel:imessage` worker polls the REST API and sends through it;
then a second host with BLUEBUBBLES_WEBHOOK_SECRET, whose door takes BlueBubbles'
webhooks (the secret in the URL). What every channel does is in
tests/test_channel_contract.py, `-k imessage`. Last, every reader of what BlueBubbles
hands us, fuzzed: bad input is skipped (one log line), never a crash."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import signal
import time
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Host, wait_for
from fakes.fake_bluebubbles import ANN, SECRET, FakeBlueBubbles, dm
from fakes.hosts import enqueue, inbound_events, outbox, wire_chat

from nanoclaw.channels.imessage_api import parse_message
from nanoclaw.channels.imessage_inbound import BAD, OLD, PENDING, SEEN, SKIP, STORED, Inbound
from nanoclaw.channels.webhook import BadPayload

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

WAIT = 3.0  # BLUEBUBBLES_ATTACHMENT_WAIT for these hosts


def start_host(base, fake: FakeBlueBubbles) -> tuple[Host, Any]:
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(base, model.url, {**fake.host_env(), "NANOCLAW_SEND_ATTEMPTS": "2",
                               "NANOCLAW_WEB_ENABLED": "false",
                               "BLUEBUBBLES_ATTACHMENT_WAIT": str(WAIT)})
    h.start()
    wait_for(lambda: fake.connected(h), 30, what="imessage connected")
    return h, model


@pytest.fixture(scope="module")
def polled(tmp_path_factory):
    fake = FakeBlueBubbles().start()
    h, model = start_host(tmp_path_factory.mktemp("imessage"), fake)
    yield fake, h
    h.cleanup()
    model.stop()
    fake.stop()


def pid(chat: str) -> str:
    return f"imessage:{chat}"


def events(host: Host, chat: str, kind: str | None = None) -> list[dict]:
    return [e for e in inbound_events(host, "imessage", kind) if e["platform_id"] == pid(chat)]


def reply(fake: FakeBlueBubbles, chat: str, text: str, timeout: float = 30):
    return wait_for(lambda: next((s for s in fake.bot_sent(chat) if s.text == text), None),
                    timeout, what=f"{text!r} in {chat}")


def polls(fake: FakeBlueBubbles, n: int = 3) -> None:
    """Wait until the worker has polled `n` more times."""
    seen = len(fake.calls_of("query"))
    wait_for(lambda: len(fake.calls_of("query")) >= seen + n, 10, what=f"{n} polls")


# ---- polling (the default) -----------------------------------------------------------------
def test_a_new_message_is_answered_by_polling_and_our_own_never_fed_back(polled):
    fake, host = polled
    chat = dm("+15550002001")
    wire_chat(host, "imessage", pid(chat))
    m = fake.say(chat, "hello from iMessage")
    got = reply(fake, chat, "echo: hello from iMessage")
    (ev,) = events(host, chat)
    assert ev["message_id"] == m["guid"]
    assert ev["payload"]["sender_id"] == "imessage:+15550002001"
    assert ev["payload"]["sender_name"] == "Ann"
    assert ev["payload"]["is_group"] is False and ev["payload"]["is_mention"] is True
    sent = [c for c in fake.calls_of("send") if c.params["chat"] == chat]
    assert sent[0].params["method"] == "apple-script" and sent[0].params["guid"] == got.id
    assert len(sent[0].params["tempGuid"]) == 25  # the part's key
    fake.add(chat, None, "typed on the Mac itself")  # isFromMe: never fed back
    polls(fake)
    assert [e["message_id"] for e in events(host, chat)] == [m["guid"]]
    assert not host.q("SELECT 1 FROM inbound_events WHERE channel_type='imessage' AND"
                      " payload LIKE '%echo: hello%'")


def test_a_group_is_answered_when_the_assistant_is_named(polled):
    fake, host = polled
    group = "iMessage;+;chat493827161"
    wire_chat(host, "imessage", pid(group), is_group=True, engage_mode="mention")
    fake.say(group, "just chatting", sender=ANN)
    asked = fake.say(group, "Andy what time is it", sender=ANN)
    reply(fake, group, "echo: Andy what time is it")
    evs = {e["message_id"]: e["payload"] for e in events(host, group)}
    assert evs[asked["guid"]]["is_group"] is True and evs[asked["guid"]]["is_mention"] is True
    assert [p["is_mention"] for p in evs.values()] == [False, True]
    assert "echo: just chatting" not in [s.text for s in fake.bot_sent(group)]


def test_an_attachment_that_arrives_late_is_fetched_once_it_exists(polled):
    fake, host = polled
    chat = dm("+15550002003")
    wire_chat(host, "imessage", pid(chat))
    m = fake.say(chat, "look at this", file=("cat.jpg", b"\xff\xd8JPEG", "image/jpeg"),
                 late=True)  # reported before the Mac has it: transferState 3, 0 bytes
    wait_for(lambda: m["guid"] in (host.q("SELECT value FROM host_state WHERE"
                                          " key='imessage:pending'") or [{"value": ""}])[0]
             ["value"] or "", 10, what="the message waits for its file")
    assert not events(host, chat) and not fake.calls_of("download", None)
    # the server now says it is done, but the download still 404s for a moment
    (att,) = fake.messages[m["guid"]]["attachments"]
    att.update(transferState=5, totalBytes=8)
    wait_for(lambda: fake.calls_of("download", "injected:404"), 10, what="a 404 download")
    assert not events(host, chat)
    fake.arrive(m)
    got = wait_for(lambda: next((s for s in fake.bot_sent(chat) if "look at this" in s.text),
                                None), 30, what="the reply")
    assert "cat.jpg" in got.text  # the agent saw the file
    (ev,) = events(host, chat)
    (a,) = ev["payload"]["attachments"]
    assert a["name"] == "cat.jpg" and base64.b64decode(a["data"]) == b"\xff\xd8JPEG"
    assert len(fake.calls_of("download")) == 1  # fetched once, once it existed
    assert not (host.q("SELECT value FROM host_state WHERE key='imessage:pending'")
                or [{"value": None}])[0]["value"]


def test_an_attachment_that_never_arrives_is_given_up_and_the_user_told(polled):
    fake, host = polled
    chat = dm("+15550002004")
    wire_chat(host, "imessage", pid(chat))
    t0 = time.time()
    m = fake.say(chat, "", file=("voice.caf", b"AUDIO", "audio/x-caf"), late=True)
    told = wait_for(lambda: next((s for s in fake.bot_sent(chat) if "could not get" in s.text),
                                 None), 30, what="the user told")
    assert time.time() - t0 >= WAIT - 0.5  # waited for it first
    assert "voice.caf" in told.text
    (ev,) = events(host, chat)
    assert ev["message_id"] == m["guid"]
    (a,) = ev["payload"]["attachments"]
    assert a["name"] == "voice.caf" and "data" not in a and "not fetched" in a["error"]


def test_tapbacks_in_and_out(polled):
    fake, host = polled
    chat = dm("+15550002005")
    wire_chat(host, "imessage", pid(chat))
    fake.say(chat, "rate me")
    ours = reply(fake, chat, "echo: rate me")
    tap = fake.say(chat, "", tapback="love", target=ours.id)
    ev = wait_for(lambda: next((e for e in events(host, chat) if e["message_id"] == tap["guid"]),
                               None), 30, what="tapback stored")
    assert ev["payload"]["text"] == '[reacted ❤️ to "echo: rate me"]'
    assert ev["payload"]["reaction"] == {"emoji": "❤️", "removed": False,
                                         "message_id": ours.id}
    enqueue(host, "tap-ok", "imessage", pid(chat), {"operation": "reaction",
                                                    "messageId": ours.id, "emoji": "😂"})
    enqueue(host, "tap-no", "imessage", pid(chat), {"operation": "reaction",
                                                    "messageId": ours.id, "emoji": "🎉"})
    wait_for(lambda: (outbox(host, "tap-no") or {}).get("status") == "failed", 30)
    assert "tapback" in outbox(host, "tap-no")["error"]
    wait_for(lambda: (outbox(host, "tap-ok") or {}).get("status") == "sent", 30)
    assert "😂" in next(s for s in fake.bot_sent(chat) if s.id == ours.id).reactions


def test_kill9_of_the_channel_worker_loses_and_doubles_nothing(polled):
    fake, host = polled
    chats = [dm("+15550002010"), dm("+15550002011")]
    for c in chats:
        wire_chat(host, "imessage", pid(c))
        fake.say(c, "before")
        reply(fake, c, "echo: before")
    old = host.worker_pid("channel:imessage")
    os.kill(old, signal.SIGKILL)
    missed = [fake.say(c, f"while down {i}") for i, c in enumerate(chats)]
    enqueue(host, "k9-out", "imessage", pid(chats[0]), {"text": "queued while down"})
    wait_for(lambda: host.worker_pid("channel:imessage") not in (None, old), 30,
             what="restart")
    for i, c in enumerate(chats):  # found by the poll from its stored cursor
        reply(fake, c, f"echo: while down {i}")
    reply(fake, chats[0], "queued while down")
    for i, (c, m) in enumerate(zip(chats, missed)):
        fake.say(c, "after")
        reply(fake, c, "echo: after")
        assert [e["message_id"] for e in events(host, c)].count(m["guid"]) == 1
        out = [s.text for s in fake.bot_sent(c)]
        assert len(out) == len(set(out)), out  # nothing doubled
        assert out[:1] == ["echo: before"]  # nothing old replayed after the restart


# ---- webhook mode --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hooked(tmp_path_factory):
    fake = FakeBlueBubbles(mode="webhook").start()
    h, model = start_host(tmp_path_factory.mktemp("imessage-hook"), fake)
    yield fake, h
    h.cleanup()
    model.stop()
    fake.stop()


def test_webhook_mode_wants_the_secret_then_answers(hooked):
    fake, host = hooked
    chat = dm("+15550003001")
    wire_chat(host, "imessage", pid(chat))
    forged = fake.add(chat, "+15550003001", "let me in")
    del fake.messages[forged["guid"]]  # not on the Mac: only the door could store it
    raw = json.dumps({"type": "new-message", "data": forged}).encode()
    sender = fake.attach(host)
    assert sender.post(raw, secret=None) == 401
    assert sender.post(raw, secret="not-the-secret") == 401
    assert sender.post(raw, secret=SECRET[:-1]) == 401
    assert not events(host, chat)
    m = fake.say(chat, "over a webhook")  # posted with the right secret
    reply(fake, chat, "echo: over a webhook")
    assert [e["message_id"] for e in events(host, chat)] == [m["guid"]]
    assert "let me in" not in json.dumps([e["payload"] for e in events(host, chat)])


def test_a_resent_old_event_is_not_answered_again(hooked):
    fake, host = hooked
    chat = dm("+15550003002")
    wire_chat(host, "imessage", pid(chat))
    m = fake.say(chat, "once only")
    reply(fake, chat, "echo: once only")
    fake.resend_old(1)  # BlueBubbles re-sends it after a reconnect
    fake.resend_old(1)
    ancient = fake.add(chat, "+15550003002", "from last year")  # never stored here
    ancient["dateCreated"] -= 365 * 86400 * 1000
    fake.notify(ancient)  # re-sent by the server after a restart: older than the cursor
    after = fake.say(chat, "and a new one")
    reply(fake, chat, "echo: and a new one")
    assert [e["message_id"] for e in events(host, chat)] == [m["guid"], after["guid"]]
    assert [s.text for s in fake.bot_sent(chat)] == ["echo: once only", "echo: and a new one"]


@pytest.mark.parametrize("status, message, permanent, after", [
    (400, "Message is already queued to be sent! (Temp GUID: abc)", False, None),  # in flight
    (400, "Chat does not exist!", True, None),
    (401, "Unauthorized", True, None),
    (500, "Message Send Error", False, None),
    (429, "slow down", None, 7.0),
])
def test_errors_are_sorted_by_what_the_runner_does_next(status, message, permanent, after):
    from nanoclaw.channels.base import RetryAfter, SendError
    from nanoclaw.channels.imessage import IMessageChannel
    from nanoclaw.channels.imessage_api import BBError

    e = IMessageChannel(_settings(), _Host())._mapped(BBError(status, message, after))
    if after is not None:
        assert isinstance(e, RetryAfter) and e.seconds == after
    else:
        assert isinstance(e, SendError) and e.permanent is permanent


# ---- the readers, fuzzed -------------------------------------------------------------------
class _Api:
    async def name(self, address: str) -> str:
        return "Ann"

    async def download(self, att: Any) -> bytes:
        return b"data"


class _Host:
    def __init__(self) -> None:
        self.stored: list[tuple] = []
        self.store = SimpleNamespace(
            inbound_seen=lambda *a: False, sent_content=lambda *a: None, is_wired=lambda *a: False,
            latest_sent_question=lambda *a: None, get_state=lambda k: None,
            enqueue_send=lambda *a, **k: None)

    async def inbound(self, platform_id, message_id, payload, thread_id=None, kind="chat"):
        self.stored.append((platform_id, message_id, payload, kind))
        return True

    def question(self, *a):
        return None


@functools.lru_cache(maxsize=None)
def _settings(url: str = "http://127.0.0.1:9", password: str = "p") -> Any:
    from nanoclaw import config

    return config.Settings(bluebubbles_url=url, bluebubbles_password=password,
                           bluebubbles_webhook_secret="s")


def test_a_refused_password_stops_the_worker_at_start(polled):
    from nanoclaw.channels.imessage import IMessageChannel
    from nanoclaw.errors import ConfigError

    fake, _ = polled
    channel = IMessageChannel(_settings(fake.url, "wrong"), _Host())
    with pytest.raises(ConfigError, match="BLUEBUBBLES_PASSWORD was refused"):
        asyncio.run(channel.setup(poll=False))
    assert fake.calls_of("info", "injected:401")


fuzz = hsettings(max_examples=100, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
anything = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(
                            st.text(max_size=8), c, max_size=3), max_leaves=8)
attachment = st.fixed_dictionaries({
    "guid": st.just("at_0_A1") | anything, "transferName": st.text(max_size=12) | anything,
    "mimeType": st.just("image/png") | anything, "totalBytes": st.integers(-1, 10) | anything,
    "transferState": st.sampled_from([0, 3, 5]) | anything}) | anything
message = st.fixed_dictionaries({
    "guid": st.just("ABC-1") | anything,
    "chats": st.lists(st.fixed_dictionaries({"guid": st.sampled_from(
        ["iMessage;-;+15551234567", "iMessage;+;chat1", "bad guid"]) | anything}) | anything,
        max_size=2) | anything,
    "handle": st.fixed_dictionaries({"address": st.just("+15551234567") | anything}) | anything,
    "text": st.text(max_size=30) | anything, "isFromMe": st.booleans() | anything,
    "dateCreated": st.integers(-5, 2 ** 41) | anything, "itemType": st.just(0) | anything,
    "associatedMessageType": st.sampled_from([None, "love", "-like", 2003, 3005, 1000])
    | anything,
    "associatedMessageGuid": st.just("p:0/ABC-0") | anything,
    "threadOriginatorGuid": st.just("ABC-0") | anything,
    "attachments": st.lists(attachment, max_size=2) | anything}) | anything


@fuzz
@given(m=message)
def test_a_message_is_stored_well_formed_or_skipped(m):
    host = _Host()
    settings: Any = SimpleNamespace(assistant_name="Andy")
    inbound = Inbound(settings, host, _Api())  # type: ignore[arg-type]
    got = asyncio.run(inbound.handle(m, give_up=True, horizon=10))
    assert got in (STORED, SEEN, SKIP, PENDING, OLD, BAD)
    assert len(host.stored) == (got == STORED)
    for platform_id, mid, payload, kind in host.stored:
        parsed = parse_message(m)
        assert parsed is not None and not parsed.from_me
        assert platform_id == f"imessage:{parsed.chat}" and mid == parsed.guid
        assert kind == "chat" and isinstance(payload["text"], str)
        assert isinstance(payload["is_mention"], bool) and isinstance(payload["is_group"], bool)
        assert all(isinstance(a, dict) and isinstance(a["name"], str)
                   for a in payload["attachments"])


class _QueryApi(_Api):
    def __init__(self, items: list[Any]):
        self.items = items

    async def query(self, body: dict[str, Any]) -> list[Any]:
        return self.items if body.get("offset") == 0 else []

    async def message(self, guid: str) -> Any:
        return None


@hsettings(fuzz, max_examples=50)
@given(items=st.lists(message, max_size=4))
def test_a_query_answer_is_read_or_skipped_never_a_crash(items):
    from nanoclaw.channels.imessage import IMessageChannel

    host = _Host()
    state = {"imessage:since": "1000"}
    host.store.get_state = state.get
    host.store.set_state = state.__setitem__
    channel = IMessageChannel(_settings(), host)
    channel.api = _QueryApi(items)  # type: ignore[assignment]
    channel.inbound = Inbound(_settings(), host, channel.api)  # type: ignore[arg-type]
    stored = asyncio.run(channel.poll(time.time()))
    assert stored == len(host.stored)
    assert int(state["imessage:since"]) >= 1000  # the cursor never goes back


@fuzz
@given(body=st.fixed_dictionaries({"type": st.sampled_from(
    ["new-message", "updated-message", "typing-indicator"]) | anything,
    "data": message}) | anything)
def test_a_webhook_body_is_stored_refused_or_ignored_never_a_crash(body):
    from nanoclaw.channels.imessage_webhook import IMessageWebhook

    hook = IMessageWebhook(_settings(), _Host())
    hook.inbound.api = _Api()  # type: ignore[assignment]

    async def go() -> int:
        try:
            return await hook.receive(json.dumps(body).encode(), {})
        finally:
            await hook.close()
    try:
        assert asyncio.run(go()) in (0, 1)
    except BadPayload:
        assert not (isinstance(body, dict) and body.get("type") == "new-message"
                    and isinstance(body.get("data"), dict))
