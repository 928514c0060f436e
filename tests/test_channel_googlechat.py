"""Google Chat end to end: a real host whose `webhooks` worker (the door) takes events
signed as Google signs them (classic Chat tokens and Workspace add-on ID tokens, both
from the fake's own keys served as certificates) and whose `channel:googlechat` worker
calls a fake Chat API as the service account, whose key's `token_uri` points at the
fake (tests/fakes/fake_google_chat.py). One host for the file; chats of their own.
What every channel does is in tests/test_channel_contract.py, `-k googlechat`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import Host, wait_for

from fakes.fake_google_chat import (ADDON, APP_URL, CHAT_ISSUER, PROJECT, FakeGoogleChat,
                                    chat_token, door_url, id_token, new_key)
from fakes.hosts import enqueue, inbound_events, log, outbox, session_inbound, wire_chat
from nanoclaw.channels.googlechat_webhook import parse
from nanoclaw.channels.webhook import BadPayload

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def google():
    fake = FakeGoogleChat().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory, google):
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path_factory.mktemp("gchat"), model.url, {
        **google.host_env(), "NANOCLAW_SEND_ATTEMPTS": "2", "NANOCLAW_WEB_ENABLED": "false"})
    h.start()
    wait_for(lambda: google.connected(h), 30, what="door up and a token fetched")
    yield h
    h.cleanup()
    model.stop()


@pytest.fixture(scope="module")
def gs(host, google):
    return google.attach(host)


def pid(space: str) -> str:
    return f"googlechat:{space}"


def events(host: Host, space: str, kind: str | None = None) -> list[dict]:
    return [e for e in inbound_events(host, "googlechat", kind) if e["platform_id"] == pid(space)]


def reply(google: FakeGoogleChat, space: str, text: str, thread: str | None = None,
          timeout: float = 60):
    return wait_for(lambda: next((s for s in google.bot_sent(space, thread) if s.text == text),
                                 None), timeout, what=f"{text!r} in {space}")


def test_a_new_user_in_a_dm_is_approved_then_answered(host, google, gs):
    dm = "spaces/DM1"
    ev = google.message(dm, "hello from Chat", dm=True)
    gs.deliver(ev)
    card = wait_for(lambda: host.q("SELECT * FROM channel_outbox WHERE idem_key LIKE"
                                   " 'card:chan-%'"), 30, what="the owner's approval card")[0]
    assert card["channel_type"] == "cli"
    assert google.bot_sent(dm) == []  # nothing reaches the agent before the owner says so
    qid = json.loads(card["content"])["questionId"]
    r = host.cli("approvals", "approve", qid, "--agent", "main")
    assert r.returncode == 0, r.stderr
    got = reply(google, dm, "echo: hello from Chat")
    (stored,) = events(host, dm)
    assert stored["message_id"] == ev["message"]["name"]
    assert stored["payload"]["sender_id"] == "googlechat:users/ann"
    assert stored["payload"]["is_group"] is False and stored["payload"]["is_mention"] is True
    assert got.thread == stored["thread_id"]  # in the message's thread


def test_a_mention_in_a_space_is_answered_in_its_thread_add_on_tokens_too(host, google, gs):
    space = "spaces/TEAM"
    wire_chat(host, "googlechat", pid(space), is_group=True, engage_mode="mention")
    thread = google.new_thread(space)
    quiet = google.message(space, "just chatting", thread=thread)
    gs.deliver(quiet)
    asked = google.message(space, "what time is it", thread=thread, mention=True)
    gs.deliver(google.addon(asked))  # the 2026 envelope, an ID token for the app URL
    got = reply(google, space, "echo: what time is it", thread)
    assert got.thread == thread and all(s.thread == thread for s in google.bot_sent(space))
    evs = {e["message_id"]: e for e in events(host, space)}
    a = evs[asked["message"]["name"]]
    assert a["payload"]["text"] == "what time is it" and a["payload"]["is_mention"] is True
    assert a["thread_id"] == thread
    assert evs[quiet["message"]["name"]]["payload"]["is_mention"] is False
    assert "echo: just chatting" not in [s.text for s in google.bot_sent(space)]
    reqs = [c for c in google.calls_of("messages") if c.params["space"] == space]
    assert reqs and all(c.params["requestId"] for c in reqs)  # every part is keyed


def test_an_agents_question_card_is_answered_by_its_button(host, google, gs):
    dm = "spaces/DM2"
    wire_chat(host, "googlechat", pid(dm))
    q = {"title": "Lunch", "question": "Pizza or salad?", "timeout": 60,
         "options": [{"label": "Pizza", "value": "pizza"}, {"label": "Salad", "value": "salad"}]}
    gs.deliver(google.message(dm, f"[[tool:ask_user_question {json.dumps(q)}]]", dm=True))
    card = wait_for(lambda: next((s for s in google.bot_sent(dm) if s.buttons), None), 60,
                    what="question card")
    assert card.raw["cardsV2"][0]["card"]["header"]["title"] == "Lunch"
    assert [t for t, _ in card.buttons] == ["Pizza", "Salad"]
    qid = host.q("SELECT question_id FROM pending_questions")[0]["question_id"]
    gs.deliver(google.addon(google.click(dm, card.raw, 1, dm=True)))  # add-on shape
    rows = wait_for(lambda: [m for m in session_inbound(host, "googlechat", pid(dm))
                             if m["kind"] == "system"], 60, what="question_response row")
    assert json.loads(rows[0]["content"]) == {
        "type": "question_response", "questionId": qid, "selectedOption": "salad",
        "userId": "googlechat:users/ann"}
    wait_for(lambda: "Salad" in next(s.text for s in google.bot_sent(dm) if s.id == card.id),
             30, what="the card shows the choice")


def test_a_429_is_retried_after_its_retry_after(host, google):
    space = "spaces/RL"
    google.rate_limit(space, 1)
    enqueue(host, "rl-g", "googlechat", pid(space), {"text": "slow"})
    wait_for(lambda: (outbox(host, "rl-g") or {}).get("status") == "sent", 30)
    calls = google.send_calls(space)
    assert [c.outcome for c in calls] == ["injected:429", "ok"]
    assert calls[1].at - calls[0].at >= 0.9
    assert [s.text for s in google.bot_sent(space)] == ["slow"]


def test_a_long_reply_is_split_within_32000_bytes_text_intact(host, google):
    space = "spaces/LONG"
    text = "\n\n".join(("Grüße aus München 🎉 " * n).strip() for n in (300, 1600, 900))
    assert len(text.encode()) > 2 * 32_000
    enqueue(host, "long-g", "googlechat", pid(space), {"text": text})
    wait_for(lambda: (outbox(host, "long-g") or {}).get("status") == "sent", 60)
    got = [s.text for s in google.bot_sent(space)]
    assert len(got) >= 3 and all(len(t.encode()) <= 30_000 for t in got)
    assert " ".join(got).split() == text.split()
    assert all(c.outcome == "ok" for c in google.send_calls(space))


def test_a_cold_dm_is_found_for_an_approval_card(host, google):
    enqueue(host, "dm-g", "googlechat", "@dm:googlechat:users/bob", {"text": "psst"})
    wait_for(lambda: (outbox(host, "dm-g") or {}).get("status") == "sent", 30)
    assert [c.params["user"] for c in google.calls_of("finddm")] == ["users/bob"]
    assert [s.text for s in google.bot_sent("spaces/DMbob")] == ["psst"]


@pytest.mark.parametrize("case, check", [
    ("no token", "no bearer token"),
    ("expired", "expired"),
    ("wrongly signed", "signature"),
    ("unknown key", "unknown signing key"),
    ("wrong project", "audience"),
    ("wrong issuer", "issuer"),
    ("add-on: wrong app URL", "audience"),
    ("add-on: wrong signer", "signer"),
    ("add-on: signed with Chat's key", "unknown signing key"),
])
def test_a_bad_token_gets_401_stores_nothing_and_the_log_names_the_check(
        host, google, gs, case, check):
    space = f"spaces/F{abs(hash(case)) % 10**8}"
    ev = google.message(space, f"forged: {case}", dm=True)
    raw = json.dumps(ev).encode()
    token = {"expired": lambda: chat_token(exp=time.time() - 3600),
             "wrongly signed": lambda: chat_token(key=new_key()),
             "unknown key": lambda: chat_token(kid="nope"),
             "wrong project": lambda: chat_token(aud="999999999999"),
             "wrong issuer": lambda: chat_token(iss="evil@example.com"),
             "add-on: wrong app URL": lambda: id_token(aud="https://elsewhere.example/hook"),
             "add-on: wrong signer": lambda: id_token(email="mallory@gmail.com"),
             "add-on: signed with Chat's key": lambda: id_token(kid="chat-1"),
             }.get(case, lambda: None)()
    assert gs.post(raw, token) == 401
    assert not events(host, space)
    wait_for(lambda: f"check failed: {check}" in log(host), 10, what=f"log names {check!r}")
    assert gs.post(raw, chat_token()) == 200  # the same body, signed right
    wait_for(lambda: events(host, space), 10, what="stored")
    assert CHAT_ISSUER and ADDON and PROJECT and APP_URL


def test_the_service_account_token_and_the_certificates_are_cached(host, google, gs):
    dm = "spaces/DM3"
    wire_chat(host, "googlechat", pid(dm))
    tokens, certs = len(google.calls_of("token")), len(google.calls_of("certs"))
    for i in range(3):
        gs.deliver(google.message(dm, f"cached {i}", dm=True))
        reply(google, dm, f"echo: cached {i}")
    assert len(google.calls_of("token")) == tokens
    assert len(google.calls_of("certs")) == certs


def test_kill9_of_the_door_and_the_channel_worker_loses_and_doubles_nothing(host, google, gs):
    dms = [f"spaces/DMK{i}" for i in range(3)]
    for d in dms:
        wire_chat(host, "googlechat", pid(d))
    sent: list[tuple[str, str]] = []
    done = threading.Event()

    def send() -> None:
        try:
            for i in range(24):
                d = dms[i % 3]
                gs.deliver(google.message(d, f"burst {i}", dm=True), deadline=90)
                sent.append((d, f"burst {i}"))
                time.sleep(0.03)
        finally:
            done.set()

    threading.Thread(target=send, daemon=True).start()
    for after, worker in ((6, "webhooks"), (14, "channel:googlechat")):
        old = host.worker_pid(worker)
        wait_for(lambda: len(sent) >= after, 60, what=f"{after} events")
        assert not done.is_set()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: host.worker_pid(worker) not in (None, old), 30, what="restart")
    assert done.wait(120) and len(sent) == 24
    for d in dms:
        last = [x for v, x in sent if v == d][-1]
        reply(google, d, f"echo: {last}", timeout=90)
    for d in dms:
        rows = session_inbound(host, "googlechat", pid(d))
        for x in [x for v, x in sent if v == d]:
            assert sum(f'"{x}"' in (m["content"] or "") or f">{x}<" in (m["content"] or "")
                       for m in rows) == 1, (x, [m["content"] for m in rows])
        out = [s.text for s in google.bot_sent(d)]
        assert len(out) == len(set(out))
    evs = [e for d in dms for e in events(host, d)]
    assert len(evs) == 24 and len({e["message_id"] for e in evs}) == 24
    assert door_url(host)


def test_a_storage_failure_answers_503_and_googles_retry_is_stored_once(
        tmp_path, google, monkeypatch):
    """The door in-process (as test_webhook_door.py runs it), our Google Chat webhook
    behind it, its store failing once."""
    import test_webhook_door as twd

    from nanoclaw.config import Settings

    monkeypatch.setattr(twd, "TARGETS", {
        "googlechat": "nanoclaw.channels.googlechat_webhook:ChatWebhook"})
    env = google.host_env()
    settings = Settings(data_dir=tmp_path / "data", webhook_port=0,
                        google_chat_credentials=env["GOOGLE_CHAT_CREDENTIALS"],
                        google_chat_api_base=google.url,
                        google_chat_audience=env["GOOGLE_CHAT_AUDIENCE"],
                        google_chat_certs_url=env["GOOGLE_CHAT_CERTS_URL"],
                        google_chat_id_certs_url=env["GOOGLE_CHAT_ID_CERTS_URL"])
    door = twd.DoorThread(settings)
    try:
        store = door.hooks["googlechat"].host.store
        real = store.enqueue_inbound

        def locked(*a, **kw):
            raise sqlite3.OperationalError("database is locked")
        monkeypatch.setattr(store, "enqueue_inbound", locked)
        raw = json.dumps(google.message("spaces/S503", "hi", dm=True)).encode()

        def post() -> int:
            req = urllib.request.Request(f"{door.url}/webhook/googlechat", data=raw,
                                         method="POST", headers={
                                             "Authorization": f"Bearer {chat_token()}"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code
        assert post() == 503  # Google retries a 5xx
        assert door.stored() == []
        monkeypatch.setattr(store, "enqueue_inbound", real)
        assert post() == 200 and post() == 200
        assert [m for _, _, m in door.stored()] == [json.loads(raw)["message"]["name"]]
    finally:
        door.close()


# ---- the parser, fuzzed ----------------------------------------------------------------
fuzz = hsettings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
anything = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(
                            st.text(max_size=8), c, max_size=3), max_leaves=8)
space = st.fixed_dictionaries({"name": st.sampled_from(["spaces/A", "spaces/../x", ""])
                               | anything, "spaceType": st.sampled_from(
                                   ["DIRECT_MESSAGE", "SPACE"]) | anything}) | anything
user = st.fixed_dictionaries({"name": st.sampled_from(["users/1", "users/", "x"]) | anything,
                              "type": st.sampled_from(["HUMAN", "BOT"]) | anything}) | anything
message = st.fixed_dictionaries({
    "name": st.sampled_from(["spaces/A/messages/m1", "spaces/B/messages/m1", "m"]) | anything,
    "sender": user, "text": st.text(max_size=30) | anything,
    "argumentText": st.text(max_size=30) | anything,
    "thread": st.fixed_dictionaries({"name": st.sampled_from(
        ["spaces/A/threads/t1", "spaces/A/threads/", "t"]) | anything}) | anything,
    "annotations": st.lists(st.fixed_dictionaries({"type": st.just("USER_MENTION") | anything,
                                                   "userMention": anything}), max_size=2)
    | anything, "attachment": st.lists(anything, max_size=2) | anything}) | anything
classic = st.fixed_dictionaries({
    "type": st.sampled_from(["MESSAGE", "CARD_CLICKED", "ADDED_TO_SPACE"]) | anything,
    "message": message, "space": space, "user": user,
    "action": st.fixed_dictionaries({"parameters": st.lists(st.fixed_dictionaries({
        "key": st.just("ncq") | anything, "value": st.just("ncq:q:0") | anything}),
        max_size=2) | anything}) | anything})
addon = st.fixed_dictionaries({"chat": st.fixed_dictionaries({
    "user": user, "messagePayload": st.fixed_dictionaries({"message": message, "space": space})
    | anything, "buttonClickedPayload": anything}) | anything,
    "commonEventObject": anything})


@fuzz
@given(body=classic | addon | anything)
def test_an_event_parses_to_a_well_formed_event_or_one_clear_error(body):
    try:
        got = parse(body)
    except BadPayload as e:
        assert "\n" not in str(e)
        return
    if got is None:
        return
    assert got.kind in ("chat", "action")
    assert got.platform_id.startswith("googlechat:spaces/") and got.key and got.user
    assert isinstance(got.text, str) and isinstance(got.is_mention, bool)
    assert got.thread is None or "/" not in got.thread
    assert all(isinstance(a, dict) for a in got.files) and isinstance(got.choice, str)
