"""Discord end to end: a real host whose `channel:discord` worker drives the real
discord.py client against a fake Discord (REST + gateway websocket) on 127.0.0.1; and
the crash loop: a worker that fails right after IDENTIFY, restarted by the supervisor
on an injected clock, identifies no more often than the breaker schedule allows."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, Host, clean_env, wait_for

from fakes.fake_discord import BOT, FakeDiscord, edit_key
from fakes.hosts import (
    enqueue,
    inbound_events,
    log,
    outbox,
    session_inbound,
    wire_chat,
    worker,
)


@pytest.fixture(scope="module")
def dc():
    fake = FakeDiscord().start()
    yield fake
    fake.stop()


def discord_env(dc: FakeDiscord, **extra: str) -> dict[str, str]:
    return {"DISCORD_BOT_TOKEN": dc.token, "DISCORD_API_BASE": dc.api_base,
            "DISCORD_GATEWAY_URL": dc.gateway_url, "NANOCLAW_DISCORD_HEARTBEAT_TIMEOUT": "2",
            "NANOCLAW_WEB_ENABLED": "false", **extra}


@pytest.fixture(scope="module")
def host(tmp_path_factory, dc):
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path_factory.mktemp("dc"), model.url,
             discord_env(dc, NANOCLAW_SEND_ATTEMPTS="2", NANOCLAW_DISCORD_RECONNECTS="20"))
    h.start()
    wait_for(lambda: dc.calls_of("IDENTIFY"), 30, what="IDENTIFY")
    wait_for(lambda: "discord connected" in log(h), 30, what="READY")
    yield h
    h.cleanup()
    model.stop()


def reply_to(dc: FakeDiscord, channel: str, mid: str, timeout: float = 60) -> dict:
    return wait_for(lambda: next((m for m in dc.sent(channel)
                                  if str((m.get("message_reference") or {}).get("message_id")) == mid),
                                 None), timeout, what=f"reply to {mid}")


def test_a_clicked_card_loses_its_buttons(host, dc):
    card = {"type": "ask_question", "questionId": "q-dc-2", "title": "Deploy?",
            "question": "Ship it now?", "options": ["Yes", "Later"]}
    enqueue(host, "card:q-dc-2", "discord", "discord:204", card, kind="chat-sdk")
    sent = wait_for(lambda: dc.sent("204"), 30, what="card sent")[0]
    dc.click(sent["id"], sent["components"][0]["components"][0]["custom_id"], user_id="31")
    wait_for(lambda: dc.messages[sent["id"]]["components"] == [], 10, what="buttons gone")
    assert dc.callbacks[-1]["type"] == 7  # answered by updating the message in place


def test_guild_mention_and_attachment(host, dc):
    wire_chat(host, "discord", "discord:202", is_group=True, engage_mode="mention")
    quiet = dc.user_message("202", "no mention here", guild_id="77")
    mid = dc.user_message("202", "look at this", guild_id="77", mention_bot=True,
                          attachment=("a.txt", b"attached", "text/plain"))
    r = reply_to(dc, "202", mid)
    assert r["content"].startswith(f"echo: @{BOT['username']} look at this")
    assert "a.txt" in r["content"]  # the agent saw the attachment
    evs = {e["message_id"]: e["payload"] for e in inbound_events(host, "discord")}
    assert evs[quiet]["is_mention"] is False and evs[quiet]["is_group"] is True
    assert base64.b64decode(evs[mid]["attachments"][0]["data"]) == b"attached"


def test_markdown_passes_through_and_code_blocks_survive_the_split(host, dc):
    code = "\n".join(f"    row_{i} = load({i}) & 0xff  # <{i}>" for i in range(150))  # ~5000
    md = f"**Dump** of [data](https://example.com):\n\n```python\n{code}\n```\n\n_done_"
    enqueue(host, "long-md-209", "discord", "discord:209", {"text": md})
    wait_for(lambda: (outbox(host, "long-md-209") or {}).get("status") == "sent", 30)
    got = [m["content"] for m in dc.sent("209")]
    assert len(got) >= 3 and all(len(t) <= 2000 for t in got)
    assert got[0].startswith("**Dump** of [data](https://example.com):\n\n```python\n")
    assert got[-1].endswith("\n```\n\n_done_")  # Markdown as written: Discord renders it
    for t in got:  # each message opens its block with the language and closes it
        assert t.count("```") == 2 and "```python\n" in t
        assert t.removesuffix("\n\n_done_").endswith("\n```")
    lines = [ln for t in got for ln in t.split("\n") if ln.startswith("    row_")]
    assert lines == code.split("\n")


def test_zombie_gateway_is_resumed_without_losing_a_message(host, dc):
    wire_chat(host, "discord", "discord:208")
    resumes, identifies = dc.resumes, dc.identifies
    dc.zombie = True  # the connection stays open but nothing comes back: no ACKs, no events
    mid = dc.user_message("208", "sent into the void")
    wait_for(lambda: dc.resumes > resumes, 30, what="RESUME after missed ACKs")
    dc.zombie = False
    assert reply_to(dc, "208", mid)["content"] == "echo: sent into the void"
    assert dc.identifies == identifies  # resumed, not re-identified
    assert "gateway disconnected" in log(host)  # noticed (missed ACKs or silence), resumed
    assert worker(host, "channel:discord")["restarts"] == 0


def test_malformed_gateway_frames_never_crash_the_worker(host, dc):
    wire_chat(host, "discord", "discord:209")
    for raw in ("{not json", "[]", '{"op": 0, "t": "MESSAGE_CREATE", "s": 1, "d": {"id": "x"}}',
                '{"op": 0, "t": "INTERACTION_CREATE", "s": 2, "d": {"type": 3}}',
                '{"op": 0, "t": "MESSAGE_CREATE", "s": 3, "d": null}', '{"op": 77}',
                '{"op": 0, "t": "MESSAGE_UPDATE", "s": 4, "d": {"id": "1", "channel_id": "209",'
                ' "embeds": []}}'):
        dc.send_raw(raw)
    dc.dispatch("MESSAGE_CREATE", {"id": "1", "channel_id": "209", "content": 5, "author": {}})
    mid = dc.user_message("209", "still alive?")
    assert reply_to(dc, "209", mid)["content"] == "echo: still alive?"
    assert worker(host, "channel:discord")["restarts"] == 0



def test_edited_message_reaches_the_agent_once(host, dc):
    wire_chat(host, "discord", "discord:210")
    mid = dc.user_message("210", "meet at 5")
    first = reply_to(dc, "210", mid)
    assert first["content"] == "echo: meet at 5"
    link = {"embeds": [{"type": "link", "url": "https://example.com", "title": "Example"}]}
    dc.edit_message(mid, "meet at 5", edited=False, raw=link)  # an unfurl: not an edit
    data = dc.edit_message(mid, "meet at 6")
    key = edit_key(data)
    ev = wait_for(lambda: next((e for e in inbound_events(host, "discord")
                                if e["message_id"] == key), None), 30, what="edit stored")
    assert ev["payload"]["text"] == "[edited] meet at 6"
    assert ev["payload"]["edited"] is True and ev["payload"]["edit_of"] == mid
    assert ev["platform_id"] == "discord:210" and ev["thread_id"] is None
    wait_for(lambda: [m for m in dc.sent("210") if m["content"] == "echo: [edited] meet at 6"
                      and str(m["message_reference"]["message_id"]) == mid], 60,
             what="reply to the edit, answering the original")
    dc.dispatch("MESSAGE_UPDATE", data)  # the gateway sends the same update again
    dc.edit_message(mid, "meet at 6", edited=False, raw=link)  # unfurl after the edit
    enqueue(host, "own-210", "discord", "discord:210",  # our own edit: MESSAGE_UPDATE too
            {"operation": "edit", "messageId": first["id"], "text": "echo: changed"})
    wait_for(lambda: dc.messages[first["id"]]["content"] == "echo: changed", 30, what="own edit")
    after = dc.user_message("210", "and one more")
    reply_to(dc, "210", after)  # gateway events are handled in order: the replays came first
    evs = [e for e in inbound_events(host, "discord") if e["platform_id"] == "discord:210"]
    assert [e["message_id"] for e in evs] == [mid, key, after]
    rows = session_inbound(host, "discord", "discord:210")
    assert sum("[edited] meet at 6" in (m["content"] or "") for m in rows) == 1
    assert [m["content"] for m in dc.sent("210")].count("echo: [edited] meet at 6") == 1


def test_thread_messages_belong_to_the_parent_and_replies_go_to_the_thread(host, dc):
    wire_chat(host, "discord", "discord:211", is_group=True)
    old = dc.snowflake()  # a thread that was already active when the bot joined
    dc.guild("78", ["211"], threads=[(old, "211")])
    new = dc.start_thread("78", "211")
    asked = {t: dc.user_message(t, f"hello from {t}", guild_id="78") for t in (old, new)}
    for t, mid in asked.items():
        assert reply_to(dc, t, mid)["content"] == f"echo: hello from {t}"
    evs = {e["message_id"]: e for e in inbound_events(host, "discord")}
    for t, mid in asked.items():
        assert (evs[mid]["platform_id"], evs[mid]["thread_id"]) == ("discord:211", t)
        assert evs[mid]["payload"]["is_group"] is True
    posts = {c.params["channel_id"] for c in dc.calls_of("POST /channels/{id}/messages")}
    assert {old, new} <= posts and "211" not in posts  # sent to the threads, not the parent
    assert dc.sent("211") == []
    key = edit_key(dc.edit_message(asked[new], "edited in the thread"))
    ev = wait_for(lambda: next((e for e in inbound_events(host, "discord")
                                if e["message_id"] == key), None), 30, what="edit stored")
    assert (ev["platform_id"], ev["thread_id"]) == ("discord:211", new)
    wait_for(lambda: [m for m in dc.sent(new)
                      if m["content"] == "echo: [edited] edited in the thread"], 60,
             what="reply to the edit in the thread")


# ---- the crash loop ---------------------------------------------------------------------

CHILD = """
import sys
from nanoclaw import config, log
from nanoclaw.host.runner import run
from nanoclaw.host.registry import make_worker
s = config.load()
log.setup('channel:discord', s.logs_dir, 'INFO', stderr=True)
sys.exit(run(make_worker('channel:discord', s)))
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Child:
    """A real channel worker process for the supervisor (its process interface)."""

    def __init__(self, env: dict[str, str], out) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=ROOT,
                                  stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.p.pid

    def poll(self):
        return self.p.poll()

    def signal(self, sig):
        try:
            self.p.send_signal(sig)
        except ProcessLookupError:
            pass


def test_crash_loop_identifies_at_the_breaker_pace(tmp_path, dc):
    from nanoclaw.db.store import Store
    from nanoclaw.host.supervisor import Supervisor

    env = {**clean_env(), **discord_env(dc, NANOCLAW_DISCORD_RECONNECTS="0"),
           "NANOCLAW_DATA_DIR": str(tmp_path / "data"), "NANOCLAW_LOGS_DIR": str(tmp_path / "logs")}
    store = Store.open(tmp_path / "data")
    out = open(tmp_path / "workers.out", "ab")
    clock = Clock()
    starts: list[float] = []
    base = dc.identifies
    dc.close_after_identify = 4000  # every connection dies right after IDENTIFY
    try:
        def spawn(name: str) -> Child:
            starts.append(clock.now)
            return Child(env, out)

        sup = Supervisor(["channel:discord"], spawn, clock, store, grace=2.0)
        t0 = clock.now
        while clock.now - t0 < 200:  # 200 s of injected time: starts at 0, 0, 10, 40, 160
            sup.tick()
            slot = sup.slots["channel:discord"]
            if slot.proc is not None:
                wait_for(lambda: slot.proc.poll() is not None, 60, what="worker exit")
                assert slot.proc.poll() == 1  # dead connection: non-zero, not a config error
                sup.tick()
            else:
                clock.now += 1.0
        gaps = [round(b - a) for a, b in zip(starts, starts[1:])]
        assert gaps == [0, 10, 30, 120], gaps
        assert dc.identifies - base == len(starts)  # one IDENTIFY per start, no more
        # a clean shutdown resets the count: the next start is attempt 1, without delay
        sup.stop_all()
        sup.tick()
        sup.reset_counts()
        sup2 = Supervisor(["channel:discord"], spawn, clock, store)
        n = len(starts)
        sup2.tick()
        assert sup2.slots["channel:discord"].attempt == 1 and len(starts) == n + 1
        wait_for(lambda: sup2.slots["channel:discord"].proc.poll() is not None, 60)
    finally:
        dc.close_after_identify = None
        for s in (locals().get("sup"), locals().get("sup2")):
            for slot in (s.slots.values() if s else []):
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.signal(signal.SIGKILL)
        out.close()
        store.close()
