"""Slack end to end: a real host whose `channel:slack` worker drives the real slack-sdk
clients (Socket Mode + Web API) against a fake Slack on 127.0.0.1. One host for the
file; each test uses its own channel."""

from __future__ import annotations

import base64

import pytest
from conftest import Host, wait_for

from fakes.fake_slack import BOT_USER, FakeSlack
from fakes.hosts import (
    enqueue,
    error_log,
    inbound_events,
    outbox,
    session_inbound,
    wire_chat,
    worker,
)


@pytest.fixture(scope="module")
def sl():
    fake = FakeSlack().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory, sl):
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path_factory.mktemp("sl"), model.url, {
        "SLACK_BOT_TOKEN": sl.bot_token, "SLACK_APP_TOKEN": sl.app_token,
        "SLACK_API_BASE": sl.api_base, "NANOCLAW_SEND_ATTEMPTS": "2",
        "NANOCLAW_WEB_ENABLED": "false"})
    h.start()
    wait_for(lambda: sl.connections, 30, what="socket connected")
    yield h
    h.cleanup()
    model.stop()


def replies(sl: FakeSlack, channel: str) -> list[dict]:
    return [m for m in sl.sent(channel) if m.get("text")]


def first_reply(sl: FakeSlack, channel: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (replies(sl, channel) or [None])[0], timeout,
                    what=f"reply in {channel}")


def test_message_reaches_agent_and_reply_appears(host, sl):
    wire_chat(host, "slack", "slack:C301")
    ts = sl.user_message("C301", "hello slack")
    assert first_reply(sl, "C301")["text"] == "echo: hello slack"
    ev = [e for e in inbound_events(host, "slack") if e["message_id"] == ts][0]
    assert ev["payload"]["sender_name"] == "Ann" and ev["payload"]["is_group"] is True
    assert ts not in [e["payload"]["event"]["ts"] for e in sl.unacked.values()
                      if e["type"] == "events_api"]  # acknowledged once stored


def test_thread_reply_stays_in_the_thread_with_attachment(host, sl):
    wire_chat(host, "slack", "slack:C302", is_group=True, engage_mode="mention")
    root = sl.user_message("C302", "a thread root, no mention")
    ts = sl.user_message("C302", f"<@{BOT_USER}> in the thread", thread_ts=root,
                         file=("a.txt", b"attached", "text/plain"))
    r = first_reply(sl, "C302")
    assert r["text"].startswith("echo: @bot in the thread") and r.get("thread_ts") == root
    evs = {e["message_id"]: e for e in inbound_events(host, "slack")}
    assert evs[root]["payload"]["is_mention"] is False
    assert evs[ts]["thread_id"] == root
    assert base64.b64decode(evs[ts]["payload"]["attachments"][0]["data"]) == b"attached"


def test_long_reply_is_split_at_40000(host, sl):
    wire_chat(host, "slack", "slack:C303")
    text = "\n\n".join(f"paragraph {i} " + "word " * 1000 for i in range(9))  # ~45000
    sl.user_message("C303", text)
    # Markdown drops a paragraph's trailing space; nothing else may be lost
    want = "\n\n".join(p.rstrip() for p in f"echo: {text}".split("\n\n"))
    got = wait_for(lambda: [m["text"] for m in replies(sl, "C303")]
                   if sum(len(m["text"]) for m in replies(sl, "C303")) >= len(want) - 2 else None,
                   60, what="all chunks")
    assert len(got) == 2 and all(len(t) <= 40_000 for t in got)
    assert "\n\n".join(got) == want  # cut at a paragraph break


def test_button_click_becomes_an_action_event(host, sl):
    card = {"type": "ask_question", "questionId": "q-sl-1", "title": "Deploy?",
            "question": "Ship it now?", "options": [
                {"label": "Yes", "selectedLabel": "Shipping", "value": "yes"},
                {"label": "Later", "selectedLabel": "Postponed", "value": "later"}]}
    enqueue(host, "card:q-sl-1", "slack", "slack:C304", card, kind="chat-sdk")
    sent = wait_for(lambda: sl.sent("C304"), 30, what="card sent")[0]
    buttons = sent["blocks"][1]["elements"]
    assert [b["text"]["text"] for b in buttons] == ["Yes", "Later"]
    sl.click("C304", sent["ts"], buttons[1]["action_id"], user="UCLICK01")
    ev = wait_for(lambda: inbound_events(host, "slack", "action"), 30, what="action")[0]
    assert ev["payload"] == {"question_id": "q-sl-1", "option": "later", "user_id": "UCLICK01"}
    wait_for(lambda: "Postponed" in (sl.messages[sent["ts"]].get("text") or ""), 10,
             what="card updated")


def test_rate_limit_is_waited_out(host, sl):
    wire_chat(host, "slack", "slack:C305")
    sl.inject("chat.postMessage", status=429, retry_after=1, channel="C305")
    sl.user_message("C305", "slow down")
    assert first_reply(sl, "C305")["text"] == "echo: slow down"
    calls = [c for c in sl.calls_of("chat.postMessage", None) if c.params.get("channel") == "C305"]
    assert [c.outcome for c in calls] == ["injected:429", "ok"]
    assert calls[1].at - calls[0].at >= 0.9
    row = host.q("SELECT * FROM channel_outbox WHERE platform_id='slack:C305'")[0]
    assert row["attempts"] == 2 and row["status"] == "sent"


def test_send_that_keeps_failing_is_told_to_agent_and_logged(host, sl):
    wire_chat(host, "slack", "slack:C306")
    rule = sl.inject("chat.postMessage", count=50, status=500, channel="C306")
    sl.user_message("C306", "are you there")
    row = wait_for(lambda: (host.q("SELECT * FROM channel_outbox WHERE platform_id="
                                   "'slack:C306' AND status='failed'") or [None])[0], 60,
                   what="send failed for good")
    assert row["attempts"] == 2
    wait_for(lambda: any("could not be delivered" in (m["content"] or "")
                         for m in session_inbound(host, "slack", "slack:C306")), 30,
             what="agent told")
    assert "failed for good" in error_log(host)
    rule.count = 0


def test_edits_reactions_and_files_out(host, sl):
    enqueue(host, "f-307", "slack", "slack:C307",
            {"text": "report", "files": [{"name": "r.txt", "data": base64.b64encode(b"R").decode()}]})
    wait_for(lambda: (outbox(host, "f-307") or {}).get("status") == "sent", 30)
    ts = outbox(host, "f-307")["platform_message_id"]
    assert any(f.get("data") == b"R" and f.get("name") == "r.txt" for f in sl.files.values())
    enqueue(host, "e-307", "slack", "slack:C307", {"operation": "edit", "messageId": ts,
                                                   "text": "report v2"})
    enqueue(host, "r-307", "slack", "slack:C307", {"operation": "reaction", "messageId": ts,
                                                   "emoji": "👍"})
    wait_for(lambda: sl.messages[ts].get("text") == "report v2", 30, what="edit")
    wait_for(lambda: sl.messages[ts].get("reactions") == ["+1"], 30, what="reaction")


def test_agent_markdown_goes_out_as_mrkdwn(host, sl):
    wire_chat(host, "slack", "slack:C310")
    sl.user_message("C310",
                    "make it **bold**, _soft_, ~~gone~~ & `a<b`: [docs](https://example.com)")
    assert first_reply(sl, "C310")["text"] == (
        "echo: make it *bold*, _soft_, ~gone~ &amp; `a&lt;b`: <https://example.com|docs>")


def test_long_formatted_text_is_split_with_code_blocks_closed(host, sl):
    code = "\n".join(f"row_{i} = load({i}) & 0xff  # <{i}>" for i in range(1500))  # ~50000
    md = f"**Dump** follows:\n\n```\n{code}\n```\n\n_done_"
    enqueue(host, "long-md-311", "slack", "slack:C311", {"text": md})
    wait_for(lambda: (outbox(host, "long-md-311") or {}).get("status") == "sent", 30)
    got = [m["text"] for m in replies(sl, "C311")]
    assert len(got) >= 2 and all(len(t) <= 40_000 for t in got)
    assert got[0].startswith("*Dump* follows:\n\n```\n") and got[-1].endswith("```\n\n_done_")
    assert all(t.count("```") == 2 for t in got)  # every part opens and closes its block
    lines = [ln for t in got for ln in t.split("\n") if ln.startswith("row_")]
    assert lines == [ln.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                     for ln in code.split("\n")]


def test_card_text_is_mrkdwn_within_a_block(host, sl):
    card = {"type": "ask_question", "questionId": "q-sl-2", "title": "**Pick**",
            "question": "Which one? " * 400, "options": ["A", "B"]}
    enqueue(host, "card:q-sl-2", "slack", "slack:C312", card, kind="chat-sdk")
    sent = wait_for(lambda: sl.sent("C312"), 30, what="card sent")[0]
    section = sent["blocks"][0]["text"]["text"]
    assert section.startswith("*Pick*\n\nWhich one?") and len(section) <= 3000


def test_dropped_socket_reconnects_and_nothing_is_lost(host, sl):
    wire_chat(host, "slack", "slack:C308")
    before = sl.connections
    sl.drop()
    # sent while no socket is open: held as unacknowledged, redelivered on reconnect
    sl.envelope("events_api", {"type": "event_callback", "event": {
        "type": "message", "channel": "C308", "user": "UANN0001", "text": "while away",
        "ts": sl.ts()}})
    wait_for(lambda: sl.connections > before, 30, what="reconnect")
    assert first_reply(sl, "C308")["text"] == "echo: while away"
    assert worker(host, "channel:slack")["restarts"] == 0


def test_malformed_envelopes_never_crash_the_worker(host, sl):
    wire_chat(host, "slack", "slack:C309")
    for raw in ("{not json", "[]", '{"type": "events_api"}',
                '{"type": "events_api", "envelope_id": "x1", "payload": {"event": {"type":'
                ' "message", "channel": 5, "user": [], "ts": null}}}',
                '{"type": "interactive", "envelope_id": "x2", "payload": {"type": "block_actions",'
                ' "actions": [{"action_id": "ncq:nope:0"}, null, 7]}}',
                '{"type": "events_api", "envelope_id": "x3", "payload": {"event": {"type":'
                ' "message", "channel": "C309", "user": "U1", "text": 5, "ts": "1.0"}}}'):
        sl.send_raw(raw)
    sl.user_message("C309", "still alive?")
    assert first_reply(sl, "C309")["text"] == "echo: still alive?"
    assert worker(host, "channel:slack")["restarts"] == 0


def test_edited_message_reaches_the_agent_once(host, sl):
    wire_chat(host, "slack", "slack:C313")
    ts = sl.user_message("C313", "meet at 5")
    assert first_reply(sl, "C313")["text"] == "echo: meet at 5"
    unfurl = sl.edit_message(ts, "meet at 5", edited=False,  # Slack's change, not the user's
                             raw={"attachments": [{"title": "a link preview"}]})
    eid = sl.edit_message(ts, "meet at 6")
    key = f"edit{sl.messages[ts]['edited']['ts']}:{ts}"
    ev = wait_for(lambda: next((e for e in inbound_events(host, "slack")
                                if e["message_id"] == key), None), 30, what="edit stored")
    assert ev["payload"]["text"] == "[edited] meet at 6"
    assert ev["payload"]["edited"] is True and ev["payload"]["edit_of"] == ts
    assert ev["thread_id"] is None and ev["payload"]["sender_name"] == "Ann"
    wait_for(lambda: [m for m in replies(sl, "C313") if m["text"] == "echo: [edited] meet at 6"],
             60, what="reply to the edit")
    again = sl.redeliver(eid)  # Slack retries the same event under a new envelope
    unfurl2 = sl.edit_message(ts, "meet at 6", edited=False,  # keeps the earlier `edited`
                              raw={"attachments": [{"title": "another preview"}]})
    gone = sl.delete_message(ts)
    wait_for(lambda: {unfurl, again, unfurl2, gone} <= set(sl.acked), 30,
             what="all acknowledged")
    after = sl.user_message("C313", "and one more")
    wait_for(lambda: [m for m in replies(sl, "C313") if m["text"] == "echo: and one more"], 60,
             what="reply to the next message")
    evs = [e for e in inbound_events(host, "slack") if e["platform_id"] == "slack:C313"]
    assert [e["message_id"] for e in evs] == [ts, key, after]  # no unfurl, replay, delete
    rows = session_inbound(host, "slack", "slack:C313")
    assert sum("[edited] meet at 6" in (m["content"] or "") for m in rows) == 1
    assert [m["text"] for m in replies(sl, "C313")].count("echo: [edited] meet at 6") == 1


def test_an_edit_that_adds_a_mention_engages_in_its_thread(host, sl):
    wire_chat(host, "slack", "slack:C314", is_group=True, engage_mode="mention")
    root = sl.user_message("C314", "a thread root")
    ts = sl.user_message("C314", "what do you think?", thread_ts=root)
    sl.edit_message(ts, f"<@{BOT_USER}> what do you think?")
    r = first_reply(sl, "C314")
    assert r["text"] == "echo: [edited] @bot what do you think?" and r.get("thread_ts") == root
    evs = {e["message_id"]: e for e in inbound_events(host, "slack")
           if e["platform_id"] == "slack:C314"}
    assert evs[ts]["payload"]["is_mention"] is False
    (edit,) = [e for e in evs.values() if e["payload"].get("edit_of") == ts]
    assert edit["payload"]["is_mention"] is True and edit["thread_id"] == root


def test_the_bots_own_edits_are_not_input(host, sl):
    enqueue(host, "own-315", "slack", "slack:C315", {"text": "draft"})
    wait_for(lambda: (outbox(host, "own-315") or {}).get("status") == "sent", 30)
    ts = outbox(host, "own-315")["platform_message_id"]
    enqueue(host, "own-edit-315", "slack", "slack:C315",
            {"operation": "edit", "messageId": ts, "text": "final"})
    def changes():
        evs = {eid: env["payload"].get("event") or {} for eid, env in list(sl.envelopes.items())}
        return [eid for eid, ev in evs.items() if ev.get("subtype") == "message_changed"
                and ev["message"]["ts"] == ts]

    changed = wait_for(changes, 30, what="Slack's message_changed for our own edit")
    assert sl.envelopes[changed[0]]["payload"]["event"]["message"]["bot_id"]
    wait_for(lambda: changed[0] in sl.acked, 30, what="acknowledged")
    assert not [e for e in inbound_events(host, "slack") if e["platform_id"] == "slack:C315"]
