"""Telegram end to end: a real host whose `channel:telegram` worker drives the real
python-telegram-bot client against a fake Bot API on 127.0.0.1. One host for the file;
each test uses its own chat id."""

from __future__ import annotations

import base64
import random

import pytest
from conftest import Host, wait_for

from fakes.fake_telegram import BOT, FakeTelegram
from fakes.hosts import (
    enqueue,
    error_log,
    inbound_events,
    log,
    outbox,
    session_inbound,
    wire_chat,
    worker,
)


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


def sends(tg: FakeTelegram, chat: int, outcome: str | None = "ok") -> list[dict]:
    return [c.params for c in tg.calls_of("sendMessage", outcome)
            if str(c.params.get("chat_id")) == str(chat)]


def test_agent_markdown_goes_out_as_html(host, tg):
    wire_chat(host, "telegram", "telegram:112")
    mid = tg.user_message(112, "make it **bold** & `a<b`, see [docs](https://example.com/?q=1)")
    r = reply_to(tg, 112, mid)
    sent = sends(tg, 112)[-1]
    assert sent["parse_mode"] == "HTML" and sent["text"] == (
        'echo: make it <b>bold</b> &amp; <code>a&lt;b</code>, see'
        ' <a href="https://example.com/?q=1">docs</a>')
    assert r["text"] == "echo: make it bold & a<b, see docs"  # as Telegram shows it
    assert {(e["type"], e.get("url")) for e in r["entities"]} == {
        ("bold", None), ("code", None), ("text_link", "https://example.com/?q=1")}


def test_long_formatted_text_is_split_without_breaking_tags(host, tg):
    code = "\n".join(f"total_{i} = price[{i}] * qty & mask  # <{i}>" for i in range(300))
    md = f"**Report** for *today*:\n\n```python\n{code}\n```\n\nSee [more](https://example.com)."
    enqueue(host, "long-md-113", "telegram", "telegram:113", {"text": md})
    wait_for(lambda: (outbox(host, "long-md-113") or {}).get("status") == "sent", 30)
    calls = sends(tg, 113)
    assert len(calls) >= 3 and not sends(tg, 113, "injected:400")
    assert all(c["parse_mode"] == "HTML" and len(c["text"]) <= 4096 for c in calls)
    assert calls[0]["text"].startswith("<b>Report</b> for <i>today</i>:\n\n<pre><code")
    assert all(c["text"].startswith('<pre><code class="language-python">') for c in calls[1:])
    assert calls[-1]["text"].endswith('See <a href="https://example.com">more</a>.')
    shown = tg.sent(113)  # each chunk parsed on its own: no tag or entity was cut
    pre = ["".join(m["text"][e["offset"]:e["offset"] + e["length"]] for e in m["entities"]
                   if e["type"] == "pre") for m in shown]
    assert "\n".join(pre) == code  # the code block continues across messages


def test_html_telegram_cannot_parse_is_sent_as_plain_text(host, tg):
    tg.inject("sendMessage", status=400, parse_mode="HTML", chat_id=114, description=(
        'Bad Request: can\'t parse entities: Unsupported start tag "blockquote" at byte offset 0'))
    enqueue(host, "plain-114", "telegram", "telegram:114",
            {"text": "> **Careful**: read [the docs](https://example.com) first"})
    wait_for(lambda: (outbox(host, "plain-114") or {}).get("status") == "sent", 30)
    calls = [c for c in tg.calls_of("sendMessage", None) if str(c.params.get("chat_id")) == "114"]
    assert [c.outcome for c in calls] == ["injected:400", "ok"]
    assert calls[0].params["parse_mode"] == "HTML"
    assert "parse_mode" not in calls[1].params
    assert calls[1].params["text"] == "Careful: read the docs (https://example.com) first"
    row = outbox(host, "plain-114")
    assert row["attempts"] == 1 and row["platform_message_id"] == str(tg.sent(114)[0]["message_id"])


def test_edited_message_reaches_the_agent_once(host, tg):
    wire_chat(host, "telegram", "telegram:115")
    mid = tg.user_message(115, "meet at 5")
    assert reply_to(tg, 115, mid)["text"] == "echo: meet at 5"
    uid = tg.edit_message(mid, "meet at 6")
    key = f"edit{uid}:{mid}"
    ev = wait_for(lambda: next((e for e in inbound_events(host, "telegram")
                                if e["message_id"] == key), None), 30, what="edit stored")
    assert ev["payload"]["text"] == "[edited] meet at 6"
    assert ev["payload"]["edited"] is True and ev["payload"]["edit_of"] == str(mid)
    wait_for(lambda: [m for m in tg.sent(115) if m.get("reply_to_message_id") == mid
                      and m["text"] == "echo: [edited] meet at 6"], 60, what="reply to the edit")
    tg.redeliver(uid)  # Telegram sends the same update again
    after = tg.user_message(115, "and one more")
    reply_to(tg, 115, after)  # updates are handled in order: the replay came first
    returned = [u for c in tg.calls_of("getUpdates") for u in c.params["returned"]]
    assert returned.count(uid) == 2
    assert [e["message_id"] for e in inbound_events(host, "telegram")].count(key) == 1
    rows = session_inbound(host, "telegram", "telegram:115")
    assert sum("[edited] meet at 6" in (m["content"] or "") for m in rows) == 1
    assert [m["text"] for m in tg.sent(115)].count("echo: [edited] meet at 6") == 1


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

    out = host.data / "sessions" / sess["agent_group_id"] / sess["id"] / "db" / "outbound.db"

    def acked():  # the blocked tool found the answer and took it
        c = sqlite3.connect(out)
        try:
            return c.execute("SELECT status FROM processing_ack WHERE message_id=?",
                             (rows[0]["id"],)).fetchone()
        finally:
            c.close()
    assert wait_for(acked, 30, what="tool took the answer")[0] == "completed"
    assert not host.q("SELECT * FROM pending_questions")
