"""Telegram end to end: a real host whose `channel:telegram` worker drives the real
python-telegram-bot client against a fake Bot API on 127.0.0.1. One host for the file;
each test uses its own chat id."""

from __future__ import annotations

import base64
import random

import pytest

from conftest import Host, wait_for
from fakes.fake_telegram import BOT, FakeTelegram
from fakes.hosts import (enqueue, error_log, inbound_events, log, outbox, session_inbound,
                         wire_chat, worker)


@pytest.fixture(scope="module")
def tg():
    fake = FakeTelegram().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory, tg):
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path_factory.mktemp("tg"), model.url, {
        "TELEGRAM_BOT_TOKEN": tg.token, "TELEGRAM_API_BASE": tg.url,
        "NANOCLAW_TELEGRAM_POLL_TIMEOUT": "1", "NANOCLAW_SEND_ATTEMPTS": "2",
        "NANOCLAW_CHANNEL_LIVENESS": "5", "NANOCLAW_WEB_ENABLED": "false"})
    h.start()
    wait_for(lambda: tg.calls_of("getUpdates"), 30, what="first poll")
    yield h
    h.cleanup()
    model.stop()


def texts(tg: FakeTelegram, chat: int) -> list[str]:
    return [m.get("text") or "" for m in tg.sent(chat)]


def reply_to(tg: FakeTelegram, chat: int, mid: int, timeout: float = 60) -> dict:
    return wait_for(lambda: next((m for m in tg.sent(chat) if m.get("reply_to_message_id") == mid),
                                 None), timeout, what=f"reply to {mid} in {chat}")


def test_message_reaches_agent_and_reply_appears(host, tg):
    wire_chat(host, "telegram", "telegram:101")
    mid = tg.user_message(101, "hello there")
    r = reply_to(tg, 101, mid)
    assert r["text"] == "echo: hello there"
    assert any(str(c.params.get("chat_id")) == "101" for c in tg.calls_of("sendChatAction"))
    row = host.q("SELECT * FROM channel_outbox WHERE platform_id='telegram:101'")[0]
    assert row["status"] == "sent" and row["platform_message_id"] == str(r["message_id"])
    ev = inbound_events(host, "telegram")[0]
    assert ev["message_id"] == str(mid) and ev["payload"]["sender_name"] == "Ann"


def test_group_needs_a_mention_when_wired_so(host, tg):
    wire_chat(host, "telegram", "telegram:-102", is_group=True, engage_mode="mention")
    quiet = tg.user_message(-102, "just chatting", user_id=55, chat_type="supergroup")
    loud = tg.user_message(-102, f"@{BOT['username']} ping", user_id=55, chat_type="supergroup")
    r = reply_to(tg, -102, loud)
    assert r["text"].startswith("echo:") and "ping" in r["text"]
    assert not any(m.get("reply_to_message_id") == quiet for m in tg.sent(-102))
    evs = {e["message_id"]: e for e in inbound_events(host, "telegram")}
    assert evs[str(quiet)]["payload"]["is_mention"] is False
    assert evs[str(loud)]["payload"]["is_group"] is True


def test_long_reply_is_split_at_paragraphs(host, tg):
    wire_chat(host, "telegram", "telegram:103")
    words = random.Random(3).choices(["alpha", "beta", "gamma", "delta"], k=1300)
    para1 = " ".join(words[:500])          # ~2900 characters
    para2 = " ".join(words[500:])          # ~4600 characters: needs a cut at a space
    mid = tg.user_message(103, f"{para1}\n\n{para2}")
    reply_to(tg, 103, mid)
    want = f"echo: {para1}\n\n{para2}"
    got = wait_for(lambda: texts(tg, 103) if sum(map(len, texts(tg, 103))) >= len(want) - 5
                   else None, 30, what="all chunks")
    assert len(got) == 3 and all(len(t) <= 4096 for t in got)
    assert got[0] == f"echo: {para1}"  # cut at the paragraph break
    assert " ".join(got[1:]) == para2  # then at a space; nothing lost


def test_button_click_becomes_an_action_event(host, tg):
    card = {"type": "ask_question", "questionId": "q-tg-1", "title": "Deploy?",
            "question": "Ship it now?", "options": [
                {"label": "Yes", "selectedLabel": "Shipping", "value": "yes"},
                {"label": "Later", "selectedLabel": "Postponed", "value": "later"}]}
    enqueue(host, "card:q-tg-1", "telegram", "telegram:104", card, kind="chat-sdk")
    sent = wait_for(lambda: tg.sent(104), 30, what="card sent")[0]
    buttons = [b[0] for b in sent["reply_markup"]["inline_keyboard"]]
    assert [b["text"] for b in buttons] == ["Yes", "Later"]
    assert all(len(b["callback_data"].encode()) <= 64 for b in buttons)
    tg.click(104, sent["message_id"], buttons[1]["callback_data"], user_id=9)
    ev = wait_for(lambda: inbound_events(host, "telegram", "action"), 30, what="action event")[0]
    assert ev["platform_id"] == "telegram:104"
    assert ev["payload"] == {"question_id": "q-tg-1", "option": "later", "user_id": "9"}
    wait_for(lambda: "Postponed" in (tg.messages[sent["message_id"]].get("text") or ""), 10,
             what="card edited to show the choice")
    assert tg.calls_of("answerCallbackQuery")


def test_rate_limit_is_waited_out(host, tg):
    wire_chat(host, "telegram", "telegram:105")
    tg.inject("sendMessage", status=429, retry_after=1, chat_id=105)
    mid = tg.user_message(105, "slow down")
    r = reply_to(tg, 105, mid)
    assert r["text"] == "echo: slow down"
    limited = [c for c in tg.calls_of("sendMessage", None) if str(c.params.get("chat_id")) == "105"]
    assert [c.outcome for c in limited] == ["injected:429", "ok"]
    assert limited[1].at - limited[0].at >= 0.9  # retry_after honoured, not hammered
    row = host.q("SELECT * FROM channel_outbox WHERE platform_id='telegram:105'")[0]
    assert row["attempts"] == 2 and row["status"] == "sent"


def test_send_that_keeps_failing_is_told_to_agent_and_logged(host, tg):
    wire_chat(host, "telegram", "telegram:106")
    rule = tg.inject("sendMessage", count=50, status=502, chat_id=106)
    tg.user_message(106, "are you there")
    row = wait_for(lambda: (host.q("SELECT * FROM channel_outbox WHERE platform_id="
                                   "'telegram:106' AND status='failed'") or [None])[0], 60,
                   what="send failed for good")
    assert row["attempts"] == 2 and "Bad Gateway" in row["error"]
    wait_for(lambda: any("could not be delivered" in (m["content"] or "")
                         for m in session_inbound(host, "telegram", "telegram:106")), 30,
             what="agent told")
    assert "failed for good" in error_log(host)
    rule.count = 0


def test_attachments_edits_and_reactions(host, tg):
    wire_chat(host, "telegram", "telegram:107")
    mid = tg.user_message(107, "see file", document=("notes.txt", b"file body", "text/plain"))
    reply_to(tg, 107, mid)
    ev = next(e for e in inbound_events(host, "telegram") if e["message_id"] == str(mid))
    att = ev["payload"]["attachments"][0]
    assert att["name"] == "notes.txt" and base64.b64decode(att["data"]) == b"file body"
    enqueue(host, "file-out-107", "telegram", "telegram:107",
            {"text": "here", "files": [{"name": "out.txt",
                                        "data": base64.b64encode(b"result").decode()}]})
    wait_for(lambda: (outbox(host, "file-out-107") or {}).get("status") == "sent", 30)
    doc = next(m for m in tg.sent(107) if "document" in m)
    assert tg.files[doc["document"]["file_id"]][1] == b"result"
    target = outbox(host, "file-out-107")["platform_message_id"]
    enqueue(host, "edit-107", "telegram", "telegram:107",
            {"operation": "edit", "messageId": target, "text": "here, edited"})
    enqueue(host, "react-107", "telegram", "telegram:107",
            {"operation": "reaction", "messageId": target, "emoji": "👍"})
    wait_for(lambda: tg.messages[int(target)].get("text") == "here, edited", 30, what="edit")
    wait_for(lambda: tg.messages[int(target)].get("reactions"), 30, what="reaction")


def test_stalled_long_poll_is_detected_and_nothing_is_lost(host, tg):
    wire_chat(host, "telegram", "telegram:108")
    tg.inject("getUpdates", stall=True)
    wait_for(lambda: tg.calls_of("getUpdates", "stalled"), 30, what="a stalled poll")
    mid = tg.user_message(108, "during the stall")
    r = reply_to(tg, 108, mid)
    assert r["text"] == "echo: during the stall"
    assert "long poll stalled" in log(host)
    assert worker(host, "channel:telegram")["restarts"] == 0  # recovered in-process
    tg.release()


def test_malformed_updates_never_crash_the_worker(host, tg):
    wire_chat(host, "telegram", "telegram:109")
    rng = random.Random(9)
    junk = [None, 1, "x", [], {}, {"a": {"b": []}}, -1, 2 ** 70, "\x00", True]
    good = {"message_id": 1, "from": {"id": 109, "first_name": "A"},
            "chat": {"id": 109, "type": "private"}, "date": 0, "text": "hi",
            "reply_to_message": {"message_id": 0}, "photo": [{"file_id": "nope"}],
            "entities": [{"type": "mention", "offset": 0, "length": 3}]}
    bodies = [{"message": "x"}, {"callback_query": {"data": 5}}, {"callback_query": {
        "id": "c", "data": "ncq:unknown:0", "message": {"chat": {"id": 109}, "message_id": 1}}},
        {"edited_message": {"text": 1}}]
    for i in range(60):
        m = dict(good, message_id=90000 + i)
        for key in rng.sample(sorted(m), 2):
            m[key] = rng.choice(junk)
        bodies.append({"message": m})
    for b in bodies:
        tg.push(b)
    mid = tg.user_message(109, "still alive?")
    assert reply_to(tg, 109, mid)["text"] == "echo: still alive?"
    assert worker(host, "channel:telegram")["restarts"] == 0


def test_dead_api_makes_the_worker_exit_and_restart(host, tg):
    """Last: polls fail for longer than NANOCLAW_CHANNEL_LIVENESS (5 s), so the worker
    exits non-zero and the orchestrator restarts it; a message sent meanwhile arrives."""
    wire_chat(host, "telegram", "telegram:110")
    before = worker(host, "channel:telegram")["restarts"]
    rule = tg.inject("getUpdates", count=10_000, status=502)
    mid = tg.user_message(110, "sent while down")
    wait_for(lambda: worker(host, "channel:telegram")["restarts"] > before, 60,
             what="worker restarted")
    assert "no successful poll" in error_log(host)
    rule.count = 0
    assert reply_to(tg, 110, mid)["text"] == "echo: sent while down"


def test_agent_question_is_answered_by_a_click_end_to_end(host, tg):
    """ask_user_question (real tool in the agent) → card on the platform → a user's click
    → router → question_response row → the blocked tool returns the choice."""
    import json

    wire_chat(host, "telegram", "telegram:111")
    q = {"title": "Lunch", "question": "Pizza or salad?", "timeout": 60,
         "options": [{"label": "Pizza", "value": "pizza"}, {"label": "Salad", "value": "salad"}]}
    tg.user_message(111, f"[[tool:ask_user_question {json.dumps(q)}]]")
    card = wait_for(lambda: next((m for m in tg.sent(111) if m.get("reply_markup")), None), 60,
                    what="question card")
    buttons = [b[0] for b in card["reply_markup"]["inline_keyboard"]]
    assert [b["text"] for b in buttons] == ["Pizza", "Salad"]
    qid = host.q("SELECT question_id FROM pending_questions")[0]["question_id"]
    tg.click(111, card["message_id"], buttons[1]["callback_data"], user_id=12)
    rows = wait_for(lambda: [m for m in session_inbound(host, "telegram", "telegram:111")
                             if m["kind"] == "system"], 60, what="question_response row")
    assert json.loads(rows[0]["content"]) == {
        "type": "question_response", "questionId": qid, "selectedOption": "salad",
        "userId": "telegram:12"}
    sess = host.q("SELECT s.* FROM sessions s JOIN messaging_groups m ON"
                  " m.id=s.messaging_group_id WHERE m.platform_id='telegram:111'")[0]
    import sqlite3

    out = host.data / "sessions" / sess["agent_group_id"] / sess["id"] / "outbound.db"

    def acked():  # the blocked tool found the answer and took it
        c = sqlite3.connect(out)
        try:
            return c.execute("SELECT status FROM processing_ack WHERE message_id=?",
                             (rows[0]["id"],)).fetchone()
        finally:
            c.close()
    assert wait_for(acked, 30, what="tool took the answer")[0] == "completed"
    assert not host.q("SELECT * FROM pending_questions")
