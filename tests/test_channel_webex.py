"""Webex end to end against a fake Webex (tests/fakes/fake_webex.py): a real host whose
`channel:webex` worker registers a device, listens on its WebSocket and fetches each
message by id, and sends through the REST API; then a second host in webhook mode, whose
door takes `X-Spark-Signature`-signed webhooks. What every channel does is in
tests/test_channel_contract.py, `-k webex`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Host, wait_for

from fakes.fake_webex import ANN, BOT, FakeWebex, door_url, sign
from fakes.hosts import enqueue, inbound_events, outbox, session_inbound, wire_chat
from nanoclaw.channels.webex_api import store_message

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def start_host(base, fake: FakeWebex) -> tuple[Host, Any]:
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(base, model.url, {**fake.host_env(), "NANOCLAW_SEND_ATTEMPTS": "2",
                               "NANOCLAW_WEB_ENABLED": "false"})
    h.start()
    wait_for(lambda: fake.connected(h), 30, what="webex connected")
    return h, model


@pytest.fixture(scope="module")
def webex():
    fake = FakeWebex().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory, webex):
    h, model = start_host(tmp_path_factory.mktemp("webex"), webex)
    yield h
    h.cleanup()
    model.stop()


def pid(room: str) -> str:
    return f"webex:{room}"


def events(host: Host, room: str, kind: str | None = None) -> list[dict]:
    return [e for e in inbound_events(host, "webex", kind) if e["platform_id"] == pid(room)]


def reply(fake: FakeWebex, room: str, text: str, thread: str | None = None,
          timeout: float = 60):
    return wait_for(lambda: next((s for s in fake.bot_sent(room, thread) if s.text == text),
                                 None), timeout, what=f"{text!r} in {room}")


def test_a_new_user_in_a_direct_room_is_approved_then_answered(host, webex):
    dm = "DM-ANN1"
    m = webex.say(dm, "hello from Webex")
    card = wait_for(lambda: host.q("SELECT * FROM channel_outbox WHERE idem_key LIKE"
                                   " 'card:chan-%'"), 30, what="the owner's approval card")[0]
    assert card["channel_type"] == "cli"
    assert webex.bot_sent(dm) == []
    qid = json.loads(card["content"])["questionId"]
    r = host.cli("approvals", "approve", qid, "--agent", "main")
    assert r.returncode == 0, r.stderr
    reply(webex, dm, "echo: hello from Webex")
    (ev,) = events(host, dm)
    assert ev["message_id"] == m["id"]  # fetched by id after the socket's event
    assert ev["payload"]["sender_id"] == f"webex:{ANN}" and ev["payload"]["sender_name"] == "Ann"
    assert ev["payload"]["is_group"] is False and ev["payload"]["is_mention"] is True
    assert [c.params["id"] for c in webex.calls_of("get")][-1] == m["id"]


def test_a_mention_in_a_group_room_is_answered_in_its_thread(host, webex):
    room = "ROOM-TEAM"
    wire_chat(host, "webex", pid(room), is_group=True, engage_mode="mention")
    root = webex.new_thread(room)
    webex.say(room, "just chatting", parent=root)
    asked = webex.say(room, "Claw what time is it", parent=root, mentions=True)
    got = reply(webex, room, "echo: what time is it", root)
    assert got.raw["parentId"] == root
    evs = {e["message_id"]: e for e in events(host, room)}
    assert evs[asked["id"]]["payload"]["text"] == "what time is it"  # our name taken off
    assert evs[asked["id"]]["thread_id"] == root
    assert "echo: just chatting" not in [s.text for s in webex.bot_sent(room)]


def test_an_agents_question_card_is_answered_by_its_button(host, webex):
    dm = "DM-ANN2"
    wire_chat(host, "webex", pid(dm))
    q = {"title": "Lunch", "question": "Pizza or salad?", "timeout": 60,
         "options": [{"label": "Pizza", "value": "pizza"}, {"label": "Salad", "value": "salad"}]}
    webex.say(dm, f"[[tool:ask_user_question {json.dumps(q)}]]")
    card = wait_for(lambda: next((s for s in webex.bot_sent(dm) if s.buttons), None), 60,
                    what="question card")
    att = card.raw["attachments"][0]
    assert att["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert [t for t, _ in card.buttons] == ["Pizza", "Salad"]
    qid = host.q("SELECT question_id FROM pending_questions")[0]["question_id"]
    webex.submit(dm, card.raw, 1)
    rows = wait_for(lambda: [m for m in session_inbound(host, "webex", pid(dm))
                             if m["kind"] == "system"], 60, what="question_response row")
    assert json.loads(rows[0]["content"]) == {
        "type": "question_response", "questionId": qid, "selectedOption": "salad",
        "userId": f"webex:{ANN}"}
    assert webex.calls_of("action")  # the submit was fetched by id


def test_a_429_is_retried_after_its_retry_after(host, webex):
    room = "ROOM-RL"
    webex.rate_limit(room, 1)
    enqueue(host, "rl-w", "webex", pid(room), {"text": "slow"})
    wait_for(lambda: (outbox(host, "rl-w") or {}).get("status") == "sent", 30)
    calls = webex.send_calls(room)
    assert [c.outcome for c in calls] == ["injected:429", "ok"]
    assert calls[1].at - calls[0].at >= 0.9


def test_a_long_reply_is_split_at_7_kb_text_intact(host, webex):
    room = "ROOM-LONG"
    text = "\n\n".join(("Grüße aus München 🎉 " * n).strip() for n in (100, 500, 250))
    assert len(text.encode()) > 2.5 * 7_439
    enqueue(host, "long-w", "webex", pid(room), {"text": text})
    wait_for(lambda: (outbox(host, "long-w") or {}).get("status") == "sent", 60)
    got = [s.text for s in webex.bot_sent(room)]
    assert len(got) >= 4 and all(len(t.encode()) <= 7_000 for t in got)
    assert " ".join(got).split() == text.split()
    assert all(c.outcome == "ok" for c in webex.send_calls(room))


def test_a_stale_device_is_registered_afresh(host, webex):
    dm = "DM-ANN3"
    wire_chat(host, "webex", pid(dm))
    devices = len(webex.calls_of("device"))
    webex.forget_devices()
    webex.drop_sockets()  # the worker dies, restarts, finds its device gone (404)
    wait_for(lambda: len(webex.calls_of("device")) > devices and webex.online(), 60,
             what="a new device and socket")
    webex.say(dm, "still there?")
    reply(webex, dm, "echo: still there?")


def test_kill9_of_the_channel_worker_loses_and_doubles_nothing(host, webex):
    rooms = ["DM-K0", "DM-K1"]
    for r in rooms:
        wire_chat(host, "webex", pid(r))
        webex.say(r, "before")
        reply(webex, r, "echo: before")
    old = host.worker_pid("channel:webex")
    os.kill(old, signal.SIGKILL)
    missed = [webex.add(r, ANN, f"while down {r}") for r in rooms]  # no device: no event
    wait_for(lambda: host.worker_pid("channel:webex") not in (None, old), 30, what="restart")
    for r in rooms:  # caught up from the room's messages when the socket came back
        reply(webex, r, f"echo: while down {r}", timeout=60)
    for r, m in zip(rooms, missed):
        webex.say(r, "after")
        reply(webex, r, "echo: after")
        assert [e["message_id"] for e in events(host, r)].count(m["id"]) == 1
        out = [s.text for s in webex.bot_sent(r)]
        assert len(out) == len(set(out))


# ---- webhook mode ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hooked(tmp_path_factory):
    fake = FakeWebex(mode="webhook").start()
    h, model = start_host(tmp_path_factory.mktemp("webex-hook"), fake)
    yield fake, h
    h.cleanup()
    model.stop()
    fake.stop()


def test_webhook_mode_checks_the_signature_then_fetches_by_id(hooked):
    fake, host = hooked
    dm = "DM-HOOK1"
    wire_chat(host, "webex", pid(dm))
    m = fake.add(dm, ANN, "over a webhook")
    raw = json.dumps({"resource": "messages", "event": "created",
                      "data": {"id": m["id"], "roomId": dm}}).encode()
    sender = fake.attach(host)
    assert sender.post(raw, signature=None) == 401
    assert sender.post(raw, signature="0" * 40) == 401
    assert sender.post(raw, signature=sign(raw, "not-the-secret")) == 401
    assert not events(host, dm)
    assert sender.post(raw) == 200
    reply(fake, dm, "echo: over a webhook")
    assert sender.post(raw) == 200  # a redelivery: stored once
    assert [e["message_id"] for e in events(host, dm)] == [m["id"]]
    assert not fake.calls_of("device")  # no WebSocket in webhook mode


def test_webhook_mode_kill9_of_the_door_loses_and_doubles_nothing(hooked):
    fake, host = hooked
    dms = [f"DM-HK{i}" for i in range(3)]
    for d in dms:
        wire_chat(host, "webex", pid(d))
    sent: list[tuple[str, str]] = []
    done = threading.Event()

    def send() -> None:
        try:
            for i in range(18):
                d = dms[i % 3]
                fake.say(d, f"burst {i}")
                sent.append((d, f"burst {i}"))
                time.sleep(0.03)
        finally:
            done.set()

    threading.Thread(target=send, daemon=True).start()
    old = host.worker_pid("webhooks")
    wait_for(lambda: len(sent) >= 6, 60, what="6 webhooks")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: host.worker_pid("webhooks") not in (None, old), 30, what="restart")
    assert done.wait(120) and len(sent) == 18
    for d in dms:
        reply(fake, d, f"echo: {[x for v, x in sent if v == d][-1]}", timeout=90)
        rows = session_inbound(host, "webex", pid(d))
        for x in [x for v, x in sent if v == d]:
            assert sum(f'"{x}"' in (m["content"] or "") or f">{x}<" in (m["content"] or "")
                       for m in rows) == 1
    evs = [e for d in dms for e in events(host, d)]
    assert len(evs) == 18 and len({e["message_id"] for e in evs}) == 18
    assert door_url(host)


# ---- the message reader, fuzzed ----------------------------------------------------------
class _Api:
    def __init__(self, m: Any):
        self.m = m

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        return self.m

    async def whoami(self) -> dict[str, Any]:
        return {"id": BOT, "displayName": "Claw"}

    async def name(self, person: str) -> str:
        return "Ann"

    async def download(self, url: str) -> Any:
        raise ValueError("not in this test")


class _Host:
    def __init__(self) -> None:
        self.stored: list[tuple] = []
        self.store = SimpleNamespace(set_state=lambda k, v: None)

    async def inbound(self, platform_id, message_id, payload, thread_id=None, kind="chat"):
        self.stored.append((platform_id, message_id, payload, thread_id))
        return True


fuzz = hsettings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
anything = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(
                            st.text(max_size=8), c, max_size=3), max_leaves=8)
message = st.fixed_dictionaries({
    "id": st.just("MSG1") | anything, "roomId": st.sampled_from(["R1", "", "a b"]) | anything,
    "roomType": st.sampled_from(["direct", "group"]) | anything,
    "personId": st.sampled_from([ANN, BOT, ""]) | anything,
    "text": st.text(max_size=30) | anything, "parentId": st.just("P1") | anything,
    "mentionedPeople": st.lists(st.just(BOT) | anything, max_size=2) | anything,
    "files": st.lists(st.text(max_size=10) | anything, max_size=2) | anything,
    "created": anything}) | anything


@fuzz
@given(m=message)
def test_a_fetched_message_is_stored_well_formed_or_skipped(m):
    host = _Host()
    try:
        n = asyncio.run(store_message(_Api(m), host, "MSG1"))
    except AttributeError:
        assert not isinstance(m, dict)  # the REST answer is a dict (Webex.call checks)
        return
    assert n == len(host.stored) <= 1
    for platform_id, mid, payload, thread in host.stored:
        assert platform_id.startswith("webex:") and mid == "MSG1"
        assert isinstance(payload["text"], str) and payload["sender_id"] == f"webex:{ANN}"
        assert isinstance(payload["is_mention"], bool) and isinstance(payload["is_group"], bool)
        assert thread is None or isinstance(thread, str)
        assert all(isinstance(a, dict) for a in payload["attachments"])


@pytest.mark.parametrize("url, ok", [
    ("wss://mercury-connection-a.wbx2.com/v1/apps/wx2/registrations/x/messages", True),
    ("wss://wbx2.com/x", True),
    ("wss://evil.example/x", False),
    ("ws://mercury.wbx2.com/x", False),           # not TLS
    ("wss://wbx2.com.evil.example/x", False),
    ("wss://169.254.169.254/latest/meta-data", False),
    ("ws://127.0.0.1:1/x", False),                 # loopback, but not the device endpoint's
])
def test_a_websocket_the_platform_names_is_called_only_on_webex(url, ok, monkeypatch):
    """The device registration hands us a URL: decided without connecting to it."""
    from nanoclaw import config
    from nanoclaw.channels.webex import socket_allowed

    monkeypatch.setenv("WEBEX_DEVICE_URL", "https://wdm-a.wbx2.com/wdm/api/v1/devices")
    assert socket_allowed(url, config.load()) is ok
    monkeypatch.setenv("WEBEX_DEVICE_URL", "http://127.0.0.1:8443/devices")  # a fake's
    assert socket_allowed("ws://127.0.0.1:8443/socket", config.load())
