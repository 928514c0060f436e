"""The pure parts of the runner: prompt formatting, reply parsing, addressing, inbox
attachments and pre-task scripts (the container cases of reference §13)."""

from __future__ import annotations

import base64
import os
import sys
from zoneinfo import ZoneInfo

from nanoclaw.devtools.runner_harness import ROOT

sys.path.insert(0, str(ROOT / "container"))

from agent_runner import inbox  # noqa: E402
from agent_runner.batch import Batch  # noqa: E402
from agent_runner.db import Address, Destination, InboundRow  # noqa: E402
from agent_runner.formatter import (  # noqa: E402
    format_batch,
    format_row,
    local_time,
    system_prompt,
)
from agent_runner.replies import parse_reply  # noqa: E402
from agent_runner.scripts import run_script  # noqa: E402

DESTS = [Destination("family", "Family chat", "channel", "telegram", "tg:1", None),
         Destination("helper", None, "agent", "agent", "ag-2", "ag-2")]
NY = ZoneInfo("America/New_York")


def row(seq=2, kind="chat", channel=("telegram", "tg:1"), thread=None, trigger=True,
        ts="2025-01-05T20:04:00.000Z", rid=None, **content) -> InboundRow:
    content.setdefault("sender", "Alice")
    return InboundRow(id=rid or f"m{seq}", seq=seq, kind=kind, timestamp=ts, trigger=trigger,
                      channel_type=channel[0], platform_id=channel[1], thread_id=thread,
                      source_session_id=None, on_wake=False, content=content)


def test_timezone_header_and_12_hour_local_time():
    out = format_batch([row(text="hi")], DESTS, "America/New_York")
    assert out.startswith('<context timezone="America/New_York"/>\n<message ')
    assert 'time="Jan 5, 2025, 3:04 PM"' in out
    assert local_time("2025-01-05T05:00:00Z", NY) == "Jan 5, 2025, 12:00 AM"
    assert local_time("2025-07-01 16:30:00", NY) == "Jul 1, 2025, 12:30 PM"  # DST, no zone = UTC
    assert local_time("garbage", NY) == "garbage"
    assert format_batch([row(text="x")], [], "Not/AZone").startswith(
        '<context timezone="Not/AZone"/>')


def test_from_is_the_destination_name_or_unknown():
    assert 'from="family" sender="Alice"' in format_row(row(text="x"), DESTS, NY)
    assert 'from="helper"' in format_row(row(channel=("agent", "ag-2"), text="x"), DESTS, NY)
    assert 'from="unknown:discord:D1"' in format_row(row(channel=("discord", "D1"), text="x"),
                                                      DESTS, NY)


def test_escaping_of_text_and_attributes():
    out = format_row(row(text='<b>"hi"</b> & </message>', senderName='Bob "the" <b>'),
                     DESTS, NY)
    assert "&lt;b&gt;\"hi\"&lt;/b&gt; &amp; &lt;/message&gt;" in out
    assert 'sender="Bob &quot;the&quot; &lt;b&gt;"' in out
    assert out.count("</message>") == 1


def test_replies_are_quoted():
    out = format_row(row(text="yes!", replyTo={"id": "tg-7", "senderName": "Bob",
                                              "text": "lunch <at> noon?"}), DESTS, NY)
    assert 'reply_to="tg-7"' in out
    assert '<quoted_message sender="Bob">lunch &lt;at&gt; noon?</quoted_message>yes!' in out
    assert 'reply_to="tg-8"' in format_row(row(text="ok", replyTo="tg-8"), DESTS, NY)


def test_several_rows_are_wrapped_and_ordered():
    out = format_batch([row(2, text="one"), row(4, text="two")], DESTS, "UTC")
    assert "<messages>\n<message id=\"2\"" in out and out.endswith("</message>\n</messages>")
    assert out.index("one") < out.index("two")


def test_tasks_webhooks_and_host_notes():
    task = format_row(row(kind="task", prompt="water <plants>", scriptOutput={"rain": False}),
                      DESTS, NY)
    assert task.startswith('<task id="2" from="family" time=')
    assert 'Script output: {"rain": false}\n\nwater &lt;plants&gt;</task>' in task
    hook = format_row(row(kind="webhook", source="github", event="push", text="3 commits"),
                      DESTS, NY)
    assert hook.startswith('<webhook id="2" from="family" source="github" event="push"')
    note = format_row(row(channel=("agent", "system"), sender="system", text="Task created."),
                      DESTS, NY)
    assert note.startswith('<system id="2" time=') and note.endswith("Task created.</system>")
    resp = format_row(row(kind="system", action="install_packages", status="failed",
                          error="build broke"), DESTS, NY)
    assert resp.startswith('<system_response action="install_packages" status="failed"')
    assert "build broke" in resp


def test_attachments_are_saved_to_the_inbox(tmp_path):
    session = str(tmp_path)
    os.makedirs(tmp_path / "inbox" / "m2")
    (tmp_path / "inbox" / "m2" / "a.pdf").write_text("pdf")
    r = row(text="see files", attachments=[
        {"type": "image", "name": "../../cat.png", "data": base64.b64encode(b"PNG").decode()},
        {"type": "file", "name": "a.pdf", "localPath": "inbox/m2/a.pdf"},
        {"type": "file", "name": "escape", "localPath": "../outside"},
        {"type": "link", "name": "doc", "url": "https://x.test/doc"}])
    prepared = inbox.prepare(r, session)
    saved = tmp_path / "inbox" / "m2" / "cat.png"
    assert saved.read_bytes() == b"PNG"
    out = format_row(prepared, DESTS, NY)
    assert f"[image: ../../cat.png — saved to {saved}]" in out
    assert f"[file: a.pdf — saved to {tmp_path}/inbox/m2/a.pdf]" in out
    assert "[file: escape — not available]" in out
    assert "[link: doc — https://x.test/doc]" in out
    assert "data" not in prepared.content["attachments"][0]
    assert inbox.prepare(r, session).content["attachments"][0]["localPath"] == str(saved)


def test_system_prompt_lists_destinations_and_rules():
    text = system_prompt("Andy", DESTS, "/workspace/agent", "MEMORY HERE")
    assert text.startswith("You are Andy")
    assert '- "family" (Family chat): channel' in text and '- "helper": agent' in text
    assert '<message to="NAME">' in text and "<internal>" in text
    assert text.endswith("MEMORY HERE")
    assert '- (none)' in system_prompt("Andy", [], "/w")


def test_reply_parsing():
    p = parse_reply('<internal>thinking</internal>Hi <message to="family">one</message>'
                    "<message to='helper'> two </message><internal>unclosed")
    assert p.blocks == [("family", "one"), ("helper", "two")] and p.bare == "Hi"
    assert parse_reply('<message to="family">   </message>').blocks == []
    assert parse_reply("just text").bare == "just text"


def test_addressing_follows_the_latest_row_of_each_channel():
    rows = [row(2, thread="t1", text="a"), row(4, channel=("agent", "ag-2"), text="b"),
            row(6, thread="t2", trigger=False, text="c")]
    b = Batch(rows, DESTS, Address("telegram", "tg:1"))
    assert b.address_for(("telegram", "tg:1")) == (Address("telegram", "tg:1", "t2"), "m6")
    assert b.address_for(("agent", "ag-2")) == (Address("agent", "ag-2"), "m4")
    assert b.asker_id == "m4"
    assert b.origin() == (Address("agent", "ag-2"), "m4")  # the latest *triggering* row
    assert b.sole_origin() is None  # two channels: a bare reply has no single home
    note = Batch([row(2, channel=("agent", "system"), text="x")], DESTS,
                 Address("telegram", "tg:1"))
    assert note.origin() == (Address("telegram", "tg:1"), "m2")  # never back to the host


def test_task_scripts(tmp_path):
    assert run_script('echo x; echo \'{"wakeAgent": true, "data": [1]}\'', str(tmp_path)) \
        .data == [1]
    assert not run_script('echo \'{"wakeAgent": false}\'', str(tmp_path)).wake
    bad = run_script("echo not json", str(tmp_path))
    assert not bad.wake and "wakeAgent" in bad.error
    failed = run_script("echo oops >&2; exit 3", str(tmp_path))
    assert not failed.wake and failed.error == "exit code 3: oops"
    slow = run_script("sleep 5", str(tmp_path), timeout_s=0.2)
    assert not slow.wake and "timed out" in slow.error
