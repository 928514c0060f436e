"""WhatsApp Cloud API end to end: a real host whose `webhooks` worker (the door) takes
Meta-signed webhooks from `MetaSender` over HTTP and whose `channel:whatsapp-cloud`
worker POSTs to a fake Graph API on 127.0.0.1 (tests/fakes/fake_graph.py). One host for
the file; each test uses users of its own."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import threading
import time

import pytest
from conftest import Host, wait_for

from fakes.fake_graph import VERIFY, FakeGraph, MetaSender, door_url, sign
from fakes.hosts import enqueue, error_log, inbound_events, outbox, session_inbound, wire_chat


@pytest.fixture(scope="module")
def graph():
    fake = FakeGraph().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory, graph):
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path_factory.mktemp("wac"), model.url, {
        **graph.host_env(), "NANOCLAW_SEND_ATTEMPTS": "2", "NANOCLAW_WEB_ENABLED": "false",
        "WHATSAPP_TEMPLATE": "come_back:en"})
    h.start()
    graph.attach(h)
    wait_for(lambda: graph.connected(h), 30, what="door up and the adapter's first call")
    yield h
    h.cleanup()
    model.stop()


@pytest.fixture(scope="module")
def meta(host, graph) -> MetaSender:
    assert graph.sender is not None
    return graph.sender


def pid(user: str) -> str:
    return f"whatsapp-cloud:{user}"


def texts(graph: FakeGraph, user: str) -> list[str]:
    return [s.text for s in graph.bot_sent(user)]


def says(graph: FakeGraph, meta: MetaSender, user: str, text: str) -> str:
    ev = graph.text(user, text)
    meta.deliver([ev])
    return ev["message"]["id"]


def reply(graph: FakeGraph, user: str, text: str, timeout: float = 60):
    return wait_for(lambda: next((s for s in graph.bot_sent(user) if s.text == text), None),
                    timeout, what=f"{text!r} to {user}")


def test_a_new_user_is_approved_from_the_terminal_then_answered(host, graph, meta):
    user = "15551110001"
    wamid = says(graph, meta, user, "hello from WhatsApp")
    card = wait_for(lambda: host.q("SELECT * FROM channel_outbox WHERE idem_key LIKE"
                                   " 'card:chan-%'"), 30, what="the owner's approval card")[0]
    assert card["channel_type"] == "cli"  # the owner's terminal
    assert texts(graph, user) == []  # nothing reaches the agent before the owner says so
    qid = json.loads(card["content"])["questionId"]
    r = host.cli("approvals", "approve", qid, "--agent", "main")
    assert r.returncode == 0, r.stderr
    got = reply(graph, user, "echo: hello from WhatsApp")
    assert got.reply_to == wamid  # quoted: it answers that message
    (ev,) = [e for e in inbound_events(host, "whatsapp-cloud") if e["platform_id"] == pid(user)]
    assert ev["message_id"] == wamid and ev["payload"]["sender_id"] == user
    assert ev["payload"]["sender_name"] == "Ann"
    # wired now: the next message gets its read receipt and "typing…" at once
    second = says(graph, meta, user, "and again")
    reply(graph, user, "echo: and again")
    reads = [c for c in graph.calls_of("read") if c.params.get("message_id") == second]
    assert reads and reads[0].params["typing_indicator"] == {"type": "text"}
    assert reads[0].at <= next(c.at for c in graph.calls_of("messages")
                               if c.params.get("to") == user and "and again" in json.dumps(
                                   c.params))


def test_a_long_reply_is_split_and_a_redelivery_answered_once(host, graph, meta):
    user = "15551110002"
    wire_chat(host, "whatsapp-cloud", pid(user))
    rng = random.Random(2)
    text = "\n\n".join(" ".join(rng.choices(["alpha", "beta", "gamma", "delta"], k=200))
                       for _ in range(5))
    assert len(text) > 5000
    says(graph, meta, user, text)
    wait_for(lambda: host.q("SELECT 1 FROM channel_outbox WHERE platform_id=? AND"
                            " status='sent'", (pid(user),)), 60, what="reply sent")
    got = texts(graph, user)
    assert len(got) >= 2 and all(len(t) <= 4096 for t in got)
    assert " ".join(got).split() == ("echo: " + text).split()  # every word, once, in order
    meta.post(meta.last)  # Meta delivers the same webhook again
    assert meta.post(meta.last) == 200
    says(graph, meta, user, "next")
    reply(graph, user, "echo: next")
    assert len([e for e in inbound_events(host, "whatsapp-cloud")
                if e["platform_id"] == pid(user)]) == 2
    assert texts(graph, user)[len(got):] == ["echo: next"]


def test_bad_signatures_get_401_and_the_handshake_wants_the_token(host, graph, meta):
    user = "15551110003"
    ev = graph.text(user, "forged")
    raw = meta.envelope([ev])
    assert meta.post(raw, signature=None) == 401
    assert meta.post(raw, signature="sha256=" + "0" * 64) == 401
    assert meta.post(raw, signature=sign(raw, "not-the-app-secret")) == 401
    assert meta.post(raw.replace(b"forged", b"FORGED"), signature=sign(raw)) == 401
    assert meta.post(raw, signature=sign(raw).removeprefix("sha256=")) == 401
    assert not [e for e in inbound_events(host, "whatsapp-cloud")
                if e["platform_id"] == pid(user)]  # nothing stored
    assert meta.post(raw) == 200
    assert [e["message_id"] for e in inbound_events(host, "whatsapp-cloud")
            if e["platform_id"] == pid(user)] == [ev["message"]["id"]]
    assert meta.handshake(VERIFY, "31337") == (200, "31337")
    assert meta.handshake("not-the-token", "31337")[0] == 403
    assert meta.handshake(VERIFY, "31337", mode="unsubscribe")[0] == 403


def test_cards_go_out_as_buttons_or_a_list_and_a_click_answers(host, graph, meta):
    user = "15551110004"

    def card(qid: str, n: int) -> dict:
        opts = [{"label": f"Option number {i} with a long label", "value": f"v{i}"}
                for i in range(n)]
        c = {"type": "ask_question", "questionId": qid, "title": "Pick", "question": "Which?",
             "options": opts}
        enqueue(host, f"card:{qid}", "whatsapp-cloud", pid(user), c, kind="chat-sdk")
        return wait_for(lambda: next((s for s in graph.bot_sent(user) if qid in json.dumps(
            s.raw) or f"{n}. Option number {n - 1}" in s.text), None), 30, what=qid)

    def clicked(qid: str) -> dict:
        return wait_for(lambda: next((e for e in inbound_events(host, "whatsapp-cloud", "action")
                                      if e["payload"]["question_id"] == qid), None), 30,
                        what=f"click on {qid}")

    two = card("q-wa-2", 2)
    assert two.raw["interactive"]["type"] == "button" and len(two.buttons) == 2
    assert all(len(t) <= 20 for t, _ in two.buttons)
    meta.deliver([graph.click_message(user, two.raw, 1)])
    assert clicked("q-wa-2")["payload"] == {"question_id": "q-wa-2", "option": "v1",
                                            "user_id": user}
    five = card("q-wa-5", 5)
    assert five.raw["interactive"]["type"] == "list" and len(five.buttons) == 5
    meta.deliver([graph.click_message(user, five.raw, 3)])
    assert clicked("q-wa-5")["payload"]["option"] == "v3"
    twelve = card("q-wa-12", 12)  # more than a list holds: numbered text
    assert twelve.raw["type"] == "text" and "12. Option number 11" in twelve.text
    says(graph, meta, user, "7")
    assert clicked("q-wa-12")["payload"]["option"] == "v6"
    says(graph, meta, user, "8")  # answered once: a later number is just a message
    wait_for(lambda: any(e["payload"].get("text") == "8"
                         for e in inbound_events(host, "whatsapp-cloud", "chat")
                         if e["platform_id"] == pid(user)), 30, what="plain '8'")
    # a click on a card sent to another chat maps to nothing (H3)
    meta.deliver([graph.click_message("15551110099", two.raw, 0)])
    time.sleep(0.3)
    assert not [e for e in inbound_events(host, "whatsapp-cloud", "action")
                if e["platform_id"] == pid("15551110099")]


def test_rate_limits_are_waited_out_and_an_expired_token_fails_for_good(host, graph, meta):
    user = "15551110005"
    graph.graph_error("messages", 130429, to=user)  # no Retry-After: the adapter's pause
    enqueue(host, "rl-5", "whatsapp-cloud", pid(user), {"text": "slow"})
    wait_for(lambda: (outbox(host, "rl-5") or {}).get("status") == "sent", 30)
    calls = [c for c in graph.calls_of("messages", None) if c.params.get("to") == user]
    assert [c.outcome for c in calls] == ["injected:400", "ok"]
    assert calls[1].at - calls[0].at >= 1.9
    graph.graph_error("messages", 131056, status=400, retry_after=1, to=user)  # pair rate
    enqueue(host, "rl-5b", "whatsapp-cloud", pid(user), {"text": "slower"})
    wait_for(lambda: (outbox(host, "rl-5b") or {}).get("status") == "sent", 30)
    assert texts(graph, user) == ["slow", "slower"]
    graph.expired = True
    try:
        enqueue(host, "tok-5", "whatsapp-cloud", pid(user), {"text": "no token"})
        enqueue(host, "tok-5b", "whatsapp-cloud", pid(user), {"text": "still none"})
        for k in ("tok-5", "tok-5b"):
            wait_for(lambda: (outbox(host, k) or {}).get("status") == "failed", 30)
            row = outbox(host, k)
            assert row["attempts"] == 1 and "WHATSAPP_ACCESS_TOKEN" in row["error"]
    finally:
        graph.expired = False
    assert error_log(host).count("Meta rejected WHATSAPP_ACCESS_TOKEN") == 1


def test_outside_the_24_hour_window_the_agent_is_told_and_the_template_sent(host, graph, meta):
    user = "15551110006"
    wire_chat(host, "whatsapp-cloud", pid(user))
    says(graph, meta, user, "hi")
    reply(graph, user, "echo: hi")
    graph.close_window(user)  # a day passes
    enqueue(host, "late-6", "whatsapp-cloud", pid(user), {"text": "a day later"})
    wait_for(lambda: (outbox(host, "late-6") or {}).get("status") == "failed", 30)
    row = outbox(host, "late-6")
    assert row["attempts"] == 1 and "24-hour window" in row["error"]
    assert "come_back" in row["error"]
    tpl = [m for m in graph.sent if m.get("to") == user and m.get("type") == "template"]
    assert tpl and tpl[0]["template"] == {"name": "come_back", "language": {"code": "en"}}


def test_media_in_and_out_reactions_both_ways(host, graph, meta):
    user = "15551110007"
    wire_chat(host, "whatsapp-cloud", pid(user))
    ev = graph.file_message(user, "notes.txt", b"file body", "text/plain", caption="see file")
    meta.deliver([ev])
    got = wait_for(lambda: next((e for e in inbound_events(host, "whatsapp-cloud")
                                 if e["message_id"] == ev["message"]["id"]), None), 30)
    (att,) = got["payload"]["attachments"]
    assert att["name"] == "notes.txt" and base64.b64decode(att["data"]) == b"file body"
    answer = wait_for(lambda: next((s for s in graph.bot_sent(user) if "see file" in s.text),
                                   None), 60, what="reply")
    # a media URL off WHATSAPP_MEDIA_HOSTS is not fetched; the message still arrives
    graph.media_url = lambda n: f"http://localhost:{graph.port}/download/{n}"
    try:
        bad = graph.file_message(user, "x.pdf", b"%PDF", "application/pdf", caption="odd")
        downloads = len(graph.calls_of("download"))
        meta.deliver([bad])
        got = wait_for(lambda: next((e for e in inbound_events(host, "whatsapp-cloud")
                                     if e["message_id"] == bad["message"]["id"]), None), 30)
        (att,) = got["payload"]["attachments"]
        assert "WHATSAPP_MEDIA_HOSTS" in att["error"] and "data" not in att
        assert len(graph.calls_of("download")) == downloads
    finally:
        graph.media_url = None
    # files out: uploaded, then sent by media id
    enqueue(host, "f-7", "whatsapp-cloud", pid(user), {"text": "report", "files": [
        {"name": "r.txt", "data": base64.b64encode(b"R" * 10).decode()}]})
    wait_for(lambda: (outbox(host, "f-7") or {}).get("status") == "sent", 30)
    assert ("r.txt", b"R" * 10) in [f for s in graph.bot_sent(user) for f in s.files]
    # reactions: ours go out, theirs reach the agent saying what was reacted to
    enqueue(host, "re-7", "whatsapp-cloud", pid(user), {"operation": "reaction",
                                                         "messageId": answer.id, "emoji": "👍"})
    wait_for(lambda: next(s for s in graph.bot_sent(user) if s.id == answer.id).reactions, 30)
    re = graph.message(user, "reaction", reaction={"message_id": answer.id, "emoji": "❤️"})
    meta.deliver([re])
    ev = wait_for(lambda: next((e for e in inbound_events(host, "whatsapp-cloud")
                                if e["message_id"] == re["message"]["id"]), None), 30)
    assert ev["payload"]["text"].startswith("[reacted ❤️ to") and ev["payload"]["reaction"] == {
        "emoji": "❤️", "message_id": answer.id}


def test_kill9_of_the_door_while_events_arrive_loses_and_doubles_nothing(host, graph, meta):
    users = [f"1555222000{i}" for i in range(3)]
    for u in users:
        wire_chat(host, "whatsapp-cloud", pid(u))
    sent: list[tuple[str, str]] = []
    done = threading.Event()

    def send() -> None:
        try:
            for i in range(24):
                u = users[i % 3]
                ev = graph.text(u, f"burst {i}")
                meta.deliver([ev], deadline=90)  # until 2xx, as Meta retries
                sent.append((u, f"burst {i}"))
                time.sleep(0.03)
        finally:
            done.set()

    retries = meta.retries
    t = threading.Thread(target=send, daemon=True)
    t.start()
    for after in (6, 14):  # twice: the second restart waits out the breaker's 10 s
        old = host.worker_pid("webhooks")
        wait_for(lambda: len(sent) >= after, 60, what=f"{after} events")
        assert not done.is_set()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: host.worker_pid("webhooks") not in (None, old), 30, what="restart")
    assert done.wait(120) and len(sent) == 24
    assert meta.retries > retries  # some arrived while the door was down: Meta retried
    for u in users:  # the last of each chat is answered (earlier ones may share a turn)
        last = [x for v, x in sent if v == u][-1]
        reply(graph, u, f"echo: {last}", 90)
    for u in users:  # every event reached the agent exactly once
        rows = session_inbound(host, "whatsapp-cloud", pid(u))
        said = [x for v, x in sent if v == u]
        for x in said:
            assert sum(f'"{x}"' in (m["content"] or "") or f">{x}<" in (m["content"] or "")
                       for m in rows) == 1, (x, [m["content"] for m in rows])
        out = texts(graph, u)
        assert len(out) == len(set(out))  # no reply twice
    evs = [e for e in inbound_events(host, "whatsapp-cloud") if e["platform_id"] in
           {pid(u) for u in users}]
    assert len(evs) == 24 and len({e["message_id"] for e in evs}) == 24
    assert door_url(host)


def test_an_agents_question_is_answered_by_a_button(host, graph, meta):
    """ask_user_question (the real tool in the agent) → reply buttons on WhatsApp → the
    user's tap (a signed webhook) → the blocked tool gets the choice."""
    user = "15551110008"
    wire_chat(host, "whatsapp-cloud", pid(user))
    q = {"title": "Lunch", "question": "Pizza or salad?", "timeout": 60,
         "options": [{"label": "Pizza", "value": "pizza"}, {"label": "Salad", "value": "salad"}]}
    says(graph, meta, user, f"[[tool:ask_user_question {json.dumps(q)}]]")
    card = wait_for(lambda: next((s for s in graph.bot_sent(user) if s.buttons), None), 60,
                    what="question card")
    assert card.raw["interactive"]["type"] == "button"
    assert [t for t, _ in card.buttons] == ["Pizza", "Salad"]
    qid = host.q("SELECT question_id FROM pending_questions")[0]["question_id"]
    meta.deliver([graph.click_message(user, card.raw, 1)])
    rows = wait_for(lambda: [m for m in session_inbound(host, "whatsapp-cloud", pid(user))
                             if m["kind"] == "system"], 60, what="question_response row")
    assert json.loads(rows[0]["content"]) == {
        "type": "question_response", "questionId": qid, "selectedOption": "salad",
        "userId": f"whatsapp-cloud:{user}"}
    wait_for(lambda: not host.q("SELECT * FROM pending_questions"), 30, what="tool took it")
