"""The channel contract, once for every platform: a real host whose `channel:<name>`
worker drives the platform's real client library against its protocol-level fake
(tests/fakes/, through the `PlatformFake` interface of tests/fakes/contract.py). One
host per platform; each test uses a chat of its own.

What every channel does: a user's message is stored once (a redelivery is not a second
message) and answered in its chat, or in its thread; a long reply is cut within the
platform's limit and nothing is lost; a 429 is waited out as long as the platform said,
and the send is neither lost nor doubled; a refusal fails the send at once, a send that
keeps failing is failed after its attempts and the agent told; a user's edit reaches the
agent once, as an edit; the bot's own edits, reactions and files go out; a user's file
reaches the agent; a card's button maps back to its option and the card shows the
choice; typing is shown while an answer is awaited, where the platform has it. A send
whose post landed but whose answer was lost (the worker killed inside the call, or the
platform stalling until the send timed out) shows once where the platform can tell
(`idempotent_sends`: Discord's enforced nonce, Slack's metadata marker) and at least once
where it cannot (Telegram, WhatsApp Cloud: sent again, never lost).

What only one platform does (its markup, its gateway or socket, its liveness) stays in
tests/test_channel_<platform>.py. A platform without threads, user edits or bot edits
(WhatsApp Cloud) says so in its fake (`threads`, `edit_events`, `bot_edits`): the thread
and user-edit tests skip for it, and the bot-edit ones check that an edit fails, saying
so, instead; where every message is in a thread (GitHub issues, Linear issues:
`top_level` false), the first test checks the answer went to the message's thread.
WhatsApp Web cannot join: its fake is of our own client seam, in-process
(tests/test_channel_whatsapp.py says what that leaves uncovered)."""

from __future__ import annotations

import base64
import importlib
import os
import random
import signal

import pytest
from conftest import Host, wait_for

from fakes.contract import PlatformFake, Sent
from fakes.fake_bluebubbles import FakeBlueBubbles
from fakes.fake_discord import FakeDiscord
from fakes.fake_email import FakeEmail
from fakes.fake_github import FakeGitHub
from fakes.fake_google_chat import FakeGoogleChat
from fakes.fake_graph import FakeGraph
from fakes.fake_linear import FakeLinear
from fakes.fake_matrix import FakeMatrix
from fakes.fake_slack import FakeSlack
from fakes.fake_teams import FakeTeams
from fakes.fake_telegram import FakeTelegram
from fakes.fake_webex import FakeWebex
from fakes.hosts import (enqueue, error_log, inbound_events, log, outbox, session_inbound,
                         wire_chat)
from nanoclaw.channels import LAZY

FAKES = {"telegram": FakeTelegram, "discord": FakeDiscord, "slack": FakeSlack,
         "whatsapp-cloud": FakeGraph, "github": FakeGitHub,
         "linear": FakeLinear, "teams": FakeTeams, "googlechat": FakeGoogleChat,
         "webex": FakeWebex, "imessage": FakeBlueBubbles,
         "matrix": FakeMatrix, "email": FakeEmail}


@pytest.fixture(scope="module", params=sorted(FAKES))
def world(request, tmp_path_factory):
    from nanoclaw.devtools.fake_model import FakeModel

    fake: PlatformFake = FAKES[request.param]().start()
    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path_factory.mktemp(request.param), model.url, {
        **fake.host_env(), "NANOCLAW_SEND_ATTEMPTS": "2", "NANOCLAW_WEB_ENABLED": "false",
        "NANOCLAW_SEND_TIMEOUT": "5"})
    try:
        h.start()
        wait_for(lambda: fake.connected(h), 30, what=f"{request.param} connected")
        yield fake, h
    finally:
        h.cleanup()
        model.stop()
        fake.stop()  # type: ignore[attr-defined]


def wire(host: Host, fake: PlatformFake, chat: str, is_group: bool = False) -> str:
    return wire_chat(host, fake.channel, fake.platform_id(chat), is_group=is_group)


def events(host: Host, fake: PlatformFake, chat: str, kind: str | None = None) -> list[dict]:
    return [e for e in inbound_events(host, fake.channel, kind)
            if e["platform_id"] == fake.platform_id(chat)]


def answer(fake: PlatformFake, chat: str, text: str, thread: str | None = None,
           timeout: float = 60) -> Sent:
    return wait_for(lambda: next((s for s in fake.bot_sent(chat, thread) if s.text == text),
                                 None), timeout, what=f"{text!r} in {chat}")


def sent_row(host: Host, idem: str, status: str = "sent") -> dict:
    return wait_for(lambda: (r := outbox(host, idem)) and r["status"] == status and r, 60,
                    what=f"{idem} {status}")


def test_a_message_is_stored_once_and_answered_in_its_chat(world):
    fake, host = world
    chat = fake.chat(1)
    wire(host, fake, chat)
    mid = fake.user_says(chat, "hello there")
    reply = answer(fake, chat, "echo: hello there")
    if fake.reply_refs:
        assert reply.reply_to == mid
    (ev,) = events(host, fake, chat)
    assert ev["message_id"] == mid and ev["kind"] == "chat"
    assert ev["thread_id"] == (None if fake.top_level else reply.thread)  # answered in it
    assert ev["payload"]["text"] == "hello there" and ev["payload"]["sender_name"] == "Ann"
    # the platform shows the reply a moment before the worker stores its result
    row = wait_for(lambda: (rows := host.q("SELECT * FROM channel_outbox WHERE platform_id=?",
                                           (fake.platform_id(chat),)))
                   and rows[0]["status"] == "sent" and rows, 30, what="the send's result")
    assert [(r["status"], r["platform_message_id"]) for r in row] == [("sent", reply.id)]
    fake.redeliver_last()  # the platform sends the same message again
    after = fake.user_says(chat, "and one more")
    answer(fake, chat, "echo: and one more")  # handled in order: the replay came first
    assert [e["message_id"] for e in events(host, fake, chat)] == [mid, after]
    assert [s.text for s in fake.bot_sent(chat)] == ["echo: hello there", "echo: and one more"]
    assert fake.bot_sent(fake.chat(99)) == []  # nothing went anywhere else


def test_a_message_in_a_thread_is_answered_in_that_thread(world):
    fake, host = world
    if not fake.threads:
        pytest.skip(f"{fake.channel} chats have no threads")
    chat = fake.chat(2)
    wire(host, fake, chat, is_group=True)
    thread = fake.new_thread(chat)
    mid = fake.user_says(chat, "in the thread", thread=thread)
    reply = answer(fake, chat, "echo: in the thread", thread)
    (ev,) = events(host, fake, chat)
    assert (ev["message_id"], ev["thread_id"]) == (mid, thread)  # the chat is the parent
    assert reply.thread == thread
    assert all(s.thread == thread for s in fake.bot_sent(chat))  # none outside it


def test_a_long_reply_is_cut_within_the_limit_and_nothing_is_lost(world):
    fake, host = world
    chat = fake.chat(3)
    rng = random.Random(3)
    paras, size = [], 0
    while size < 2.3 * fake.limit:  # paragraphs of ~0.3 limit, one of ~0.6: cut inside it
        n = int((0.6 if len(paras) == 2 else 0.3) * fake.limit / 6)
        paras.append(" ".join(rng.choices(["alpha", "beta", "gamma", "delta"], k=n)))
        size += len(paras[-1]) + 2
    text = "\n\n".join(paras)
    enqueue(host, "long-3", fake.channel, fake.platform_id(chat), {"text": text})
    sent_row(host, "long-3")
    got = [s.text for s in fake.bot_sent(chat)]
    assert len(got) >= 3 and all(len(t) <= fake.limit for t in got)
    assert " ".join(got).split() == text.split()  # every word, in order, once
    assert got[0] == "\n\n".join(paras[:len(got[0].split("\n\n"))])  # cut at a paragraph


def test_a_rate_limit_is_waited_out_and_the_send_neither_lost_nor_doubled(world):
    fake, host = world
    chat = fake.chat(4)
    fake.rate_limit(chat, 1)
    enqueue(host, "slow-4", fake.channel, fake.platform_id(chat), {"text": "slow down"})
    row = sent_row(host, "slow-4")
    calls = fake.send_calls(chat)
    assert [c.outcome for c in calls] == ["injected:429", "ok"]
    assert calls[1].at - calls[0].at >= 0.9  # as long as the platform said, not hammered
    assert [s.text for s in fake.bot_sent(chat)] == ["slow down"]
    assert row["platform_message_id"] == fake.bot_sent(chat)[0].id


def test_a_refused_send_fails_at_once_and_is_recorded(world):
    fake, host = world
    chat = fake.chat(5)
    fake.refuse_sends(chat)
    enqueue(host, "refused-5", fake.channel, fake.platform_id(chat), {"text": "hello?"})
    row = sent_row(host, "refused-5", "failed")
    assert row["attempts"] == 1 and row["error"] and row["next_attempt_at"] is None
    assert [c.outcome for c in fake.send_calls(chat)] == [
        fake.send_calls(chat)[0].outcome]  # tried once, never again
    assert fake.send_calls(chat)[0].outcome.startswith("injected:")
    assert fake.bot_sent(chat) == []


def test_a_send_that_keeps_failing_is_failed_and_the_agent_told(world):
    fake, host = world
    chat = fake.chat(6)
    wire(host, fake, chat)
    rule = fake.fail_sends(chat, 50)
    try:
        fake.user_says(chat, "are you there")
        row = wait_for(lambda: (host.q("SELECT * FROM channel_outbox WHERE platform_id=? AND"
                                       " status='failed'", (fake.platform_id(chat),))
                                or [None])[0], 60, what="send failed for good")
        assert row["attempts"] == 2 and row["error"]  # NANOCLAW_SEND_ATTEMPTS
        wait_for(lambda: any("could not be delivered" in (m["content"] or "")
                             for m in session_inbound(host, fake.channel,
                                                      fake.platform_id(chat))), 30,
                 what="agent told")
        assert "failed for good" in error_log(host)
    finally:
        rule.count = 0


def test_a_users_edit_reaches_the_agent_once_as_an_edit(world):
    fake, host = world
    if not fake.edit_events:
        pytest.skip(f"{fake.channel} does not tell bots of a user's edit")
    chat = fake.chat(7)
    wire(host, fake, chat)
    mid = fake.user_says(chat, "meet at 5")
    answer(fake, chat, "echo: meet at 5")
    key = fake.user_edits(chat, mid, "meet at 6")
    ev = wait_for(lambda: next((e for e in events(host, fake, chat) if e["message_id"] == key),
                               None), 30, what="edit stored")
    assert ev["payload"]["text"] == "[edited] meet at 6"
    assert ev["payload"]["edited"] is True and ev["payload"]["edit_of"] == mid
    edited = answer(fake, chat, "echo: [edited] meet at 6")
    if fake.reply_refs:
        assert edited.reply_to == mid  # answers the message that was edited
    fake.redeliver_last()  # the platform sends the edit again
    after = fake.user_says(chat, "and one more")
    answer(fake, chat, "echo: and one more")
    assert [e["message_id"] for e in events(host, fake, chat)] == [mid, key, after]
    rows = session_inbound(host, fake.channel, fake.platform_id(chat))
    assert sum("[edited] meet at 6" in (m["content"] or "") for m in rows) == 1
    assert [s.text for s in fake.bot_sent(chat)].count("echo: [edited] meet at 6") == 1


def test_the_bots_edits_reactions_and_files_go_out(world):
    fake, host = world
    chat = fake.chat(8)
    pid = fake.platform_id(chat)
    enqueue(host, "f-8", fake.channel, pid, {"text": "report", "files": [
        {"name": "r.txt", "data": base64.b64encode(b"R").decode()}]})
    target = sent_row(host, "f-8")["platform_message_id"]
    assert ("r.txt", b"R") in [f for s in fake.bot_sent(chat) for f in s.files]
    enqueue(host, "e-8", fake.channel, pid, {"operation": "edit", "messageId": target,
                                             "text": "report v2"})
    enqueue(host, "r-8", fake.channel, pid, {"operation": "reaction", "messageId": target,
                                             "emoji": "👍"})
    sent_row(host, "r-8", "sent" if fake.bot_reactions else "failed")

    def shown() -> Sent | None:
        return next((s for s in fake.bot_sent(chat) if s.id == target), None)
    if fake.bot_edits:
        sent_row(host, "e-8")
        wait_for(lambda: (s := shown()) and s.text == "report v2", 30, what="edited in place")
    else:  # the platform cannot edit: the edit fails for good, saying so, nothing resent
        assert "edit" in sent_row(host, "e-8", "failed")["error"]
    if fake.bot_reactions:
        wait_for(lambda: (s := shown()) and s.reactions, 30, what="reaction")
    assert "report v2" not in [s.text for s in fake.bot_sent(chat) if s.id != target]


def test_a_users_file_reaches_the_agent(world):
    fake, host = world
    chat = fake.chat(9)
    wire(host, fake, chat)
    mid = fake.user_says(chat, "see file", file=("a.txt", b"attached", "text/plain"))
    ev = wait_for(lambda: next((e for e in events(host, fake, chat) if e["message_id"] == mid),
                               None), 30, what="message stored")
    (att,) = ev["payload"]["attachments"]
    assert att["name"] == "a.txt" and base64.b64decode(att["data"]) == b"attached"
    reply = wait_for(lambda: next((s for s in fake.bot_sent(chat) if "see file" in s.text),
                                  None), 60, what="reply")
    assert "a.txt" in reply.text  # the agent saw the attachment


def test_a_card_button_maps_back_to_its_option_and_the_card_shows_it(world):
    fake, host = world
    chat = fake.chat(10)
    qid = f"q-{fake.channel}-1"
    card = {"type": "ask_question", "questionId": qid, "title": "Deploy?",
            "question": "Ship it now?", "options": [
                {"label": "Yes", "selectedLabel": "Shipping", "value": "yes"},
                {"label": "Later", "selectedLabel": "Postponed", "value": "later"}]}
    enqueue(host, f"card:{qid}", fake.channel, fake.platform_id(chat), card, kind="chat-sdk")
    shown = wait_for(lambda: fake.bot_sent(chat), 30, what="card sent")[0]
    assert [label for label, _ in shown.buttons] == ["Yes", "Later"]
    fake.press(chat, shown, 1)
    (ev,) = wait_for(lambda: events(host, fake, chat, "action"), 30, what="action event")
    assert ev["payload"] == {"question_id": qid, "option": "later",
                             "user_id": fake.clicker(chat)}
    if not fake.bot_edits:
        return  # the card stays as sent: the platform cannot edit it
    wait_for(lambda: "Postponed" in next(s.text for s in fake.bot_sent(chat) if s.id == shown.id),
             10, what="the card shows the choice")


def test_typing_is_shown_while_an_answer_is_awaited(world):
    fake, host = world
    module, _, cls = LAZY[fake.channel][0].partition(":")
    adapter = getattr(importlib.import_module(module), cls)
    if not fake.typing:  # the platform has no indicator for bots: the adapter offers none
        assert not hasattr(adapter, "set_typing")
        return
    chat = fake.chat(11)
    wire(host, fake, chat)
    fake.user_says(chat, "think first")
    answer(fake, chat, "echo: think first")
    assert fake.typing_calls(chat)
    assert fake.typing_calls(fake.chat(98)) == []  # only where an answer is awaited


def _once_or_again(fake: PlatformFake, host: Host, chat: str, idem: str, text: str) -> None:
    """After a send whose answer was lost: one message where the platform can tell, else
    the same message again (at least once); never none, and the row says which."""
    row = sent_row(host, idem)
    shown = [s for s in fake.bot_sent(chat) if s.text == text]
    if fake.idempotent_sends:
        assert len(shown) == 1, [s.text for s in fake.bot_sent(chat)]
    else:
        assert len(shown) == 2, [s.text for s in fake.bot_sent(chat)]
    assert row["platform_message_id"] in [s.id for s in shown]
    assert row["attempt_at"] is None  # nothing is uncertain any more


def test_a_send_cut_off_by_a_crash_inside_the_call_is_not_doubled_where_it_can_tell(world):
    fake, host = world
    chat = fake.chat(12)
    name = f"channel:{fake.channel}"
    before = host.worker_pid(name)
    fake.land_then_stall(chat)  # the post is made; its answer never comes
    try:
        enqueue(host, "cut-12", fake.channel, fake.platform_id(chat), {"text": "only once"})
        wait_for(lambda: fake.bot_sent(chat), 30, what="the post landed")
        assert outbox(host, "cut-12")["attempt_at"]  # recorded before the call
        os.kill(before, signal.SIGKILL)  # inside the call: the platform has it, we don't know
        wait_for(lambda: host.worker_pid(name) not in (None, before), 30, what="restarted")
    finally:
        fake.release()
    _once_or_again(fake, host, chat, "cut-12", "only once")


def test_a_send_whose_answer_stalls_is_given_up_then_retried_and_not_doubled(world):
    fake, host = world
    chat = fake.chat(13)
    fake.land_then_stall(chat)
    try:
        enqueue(host, "stall-13", fake.channel, fake.platform_id(chat), {"text": "held up"})
        row = sent_row(host, "stall-13")  # NANOCLAW_SEND_TIMEOUT: 5 s, then the retry
        assert row["attempts"] == 2
        assert "did not answer within 5s" in log(host)
    finally:
        fake.release()
    _once_or_again(fake, host, chat, "stall-13", "held up")
