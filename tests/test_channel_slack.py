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


def test_an_event_is_acknowledged_once_stored(host, sl):
    wire_chat(host, "slack", "slack:C301")
    ts = sl.user_message("C301", "hello slack")
    assert first_reply(sl, "C301")["text"] == "echo: hello slack"
    ev = [e for e in inbound_events(host, "slack") if e["message_id"] == ts][0]
    assert ev["payload"]["is_group"] is True  # a channel, not a DM
    assert ts not in [e["payload"]["event"]["ts"] for e in sl.unacked.values()
                      if e["type"] == "events_api"]


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
