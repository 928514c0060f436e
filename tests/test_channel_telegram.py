"""Telegram end to end: a real host whose `channel:telegram` worker drives the real
python-telegram-bot client against a fake Bot API on 127.0.0.1. One host for the file;
each test uses its own chat id."""

from __future__ import annotations

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


def test_a_click_is_answered_and_button_data_fits_64_bytes(host, tg):
    card = {"type": "ask_question", "questionId": "q-tg-2-" + "x" * 40, "title": "Deploy?",
            "question": "Ship it now?", "options": ["Yes", "Later"]}
    enqueue(host, "card:q-tg-2", "telegram", "telegram:104", card, kind="chat-sdk")
    sent = wait_for(lambda: tg.sent(104), 30, what="card sent")[0]
    data = [row[0]["callback_data"] for row in sent["reply_markup"]["inline_keyboard"]]
    assert len(data) == 2 and all(len(d.encode()) <= 64 for d in data)
    cq = tg.click(104, sent["message_id"], data[0], user_id=9)
    wait_for(lambda: [c for c in tg.calls_of("answerCallbackQuery")
                      if c.params.get("callback_query_id") == cq], 30,
             what="the click answered (the button stops spinning)")


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


@pytest.mark.slow  # waits out a stalled long poll in real time
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


@pytest.mark.slow  # NANOCLAW_CHANNEL_LIVENESS (5 s) of failed polls, then a restart
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


def test_a_chat_that_refuses_every_send_does_not_loop_the_agent(host, tg):
    """The agent is told its answer was refused; its answer to that note goes to the same
    chat and is refused too, and it is not told again (within ten minutes): two sends,
    one note, then quiet, instead of an agent answering its own failure notes."""
    import time

    chat = 131
    wire_chat(host, "telegram", f"telegram:{chat}")
    rule = tg.inject("sendMessage", count=100, status=403, chat_id=str(chat))  # every send
    tg.user_message(chat, "hello?")

    def failed() -> list[dict]:
        return host.q("SELECT * FROM channel_outbox WHERE platform_id=? AND status='failed'",
                      (f"telegram:{chat}",))

    try:
        wait_for(lambda: len(failed()) >= 2, 60, what="the answer and its note's answer fail")
        time.sleep(3)  # an agent turn here takes well under a second: a loop would show
        assert len(failed()) == 2, [r["content"] for r in failed()]
    finally:
        rule.count = 0
    notes = [m for m in session_inbound(host, "telegram", f"telegram:{chat}")
             if "could not be delivered" in (m["content"] or "")]
    assert len(notes) == 1, notes
    assert "not telling its agent again of a failed send" in log(host)
