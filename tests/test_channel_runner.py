"""The generic channel runner around an adapter: sends wait while nobody can receive
them, `retry_after` is honoured, a send that keeps failing is failed for good and the
agent is told, cold DMs are resolved once and cached."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from nanoclaw import config
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.channels.base import Channel, RetryAfter, SendError, Unavailable
from nanoclaw.channels.runner import ChannelRunner
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.delivery.delivery import Delivery
from nanoclaw.routing.router import Event, Router
from nanoclaw.util import local_user_id


class Platform(Channel):
    """Stands in for a chat platform's API: scripted outcomes, every call recorded."""

    name = "fakechat"

    def __init__(self, settings, host, script):
        super().__init__(settings, host)
        self.script, self.calls, self.dms = list(script), [], []

    async def deliver(self, platform_id, thread_id, message):
        self.calls.append((time.time(), platform_id, message.content))
        outcome = self.script.pop(0) if self.script else "ok"
        if isinstance(outcome, Exception):
            raise outcome
        return f"pm-{len(self.calls)}"

    async def open_dm(self, handle):
        self.dms.append(handle)
        return f"fakechat:dm-{handle}"


@pytest.fixture
def env(tmp_path, monkeypatch):
    for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data", "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                 "NANOCLAW_GROUPS_DIR": tmp_path / "groups", "NANOCLAW_SEND_ATTEMPTS": "3"}.items():
        monkeypatch.setenv(k, str(v))
    s = config.load()
    store = Store.open(s.data_dir)
    ensure_defaults(store, s)
    return store, s


def _drive(runner: ChannelRunner, adapter: Platform, until, timeout=20.0):
    async def go():
        runner.adapter = adapter
        deadline = time.time() + timeout
        while time.time() < deadline:
            runner.version = -1  # our own writes do not move data_version
            await runner.send_due(time.time())
            if until():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("condition not reached")
    asyncio.run(go())


def test_unavailable_parks_without_counting(env):
    store, s = env
    store.enqueue_send("k1", "fakechat", "fakechat:1", None, "chat", {"text": "hi"})
    runner = ChannelRunner(store, s, "fakechat")
    adapter = Platform(s, runner, [Unavailable("nobody"), "ok"])
    _drive(runner, adapter, lambda: store.q1("SELECT status FROM channel_outbox")["status"]
           == "sent")
    row = store.q1("SELECT * FROM channel_outbox")
    assert row["attempts"] == 1 and row["platform_message_id"] == "pm-2"


def test_retry_after_is_honoured(env):
    store, s = env
    store.enqueue_send("k1", "fakechat", "fakechat:1", None, "chat", {"text": "hi"})
    runner = ChannelRunner(store, s, "fakechat")
    adapter = Platform(s, runner, [RetryAfter(1.0), "ok"])
    _drive(runner, adapter, lambda: store.q1("SELECT status FROM channel_outbox")["status"]
           == "sent")
    (t1, _, _), (t2, _, _) = adapter.calls
    assert t2 - t1 >= 1.0  # not before the platform said


def test_send_that_keeps_failing_is_told_to_the_agent(env, monkeypatch):
    store, s = env
    owner = local_user_id().split(":", 1)[1]
    (sid,) = Router(store, s).route(Event("cli", "local", "m1", text="hi", sender_id=owner,
                                          is_mention=True))
    sess = store.session(sid)
    p = sessiondb.SessionPaths(str(s.session_dir(sess["agent_group_id"], sid)))
    store.enqueue_send(f"{sid}:out-1", "fakechat", "fakechat:1", None, "chat", {"text": "x"},
                       session_id=sid, message_out_id="out-1")
    runner = ChannelRunner(store, s, "fakechat")
    adapter = Platform(s, runner, [SendError("boom")] * 2 + [SendError("gone", permanent=True)])
    # keep the test short; the backoff schedule itself is not under test
    monkeypatch.setattr("nanoclaw.channels.runner.BACKOFF", (0.05,))
    _drive(runner, adapter, lambda: store.q1("SELECT status FROM channel_outbox")["status"]
           == "failed")
    assert len(adapter.calls) == 3
    Delivery(store, s).pass_once(time.time())
    with sessiondb.opened(p.inbound, readonly=True) as c:
        d = c.execute("SELECT status, error FROM delivered WHERE message_out_id='out-1'").fetchone()
        notes = [json.loads(x[0])["text"] for x in c.execute(
            "SELECT content FROM messages_in WHERE channel_type='agent'")]
    assert d[0] == "failed" and "gone" in d[1]
    assert any("could not be delivered" in n and "gone" in n for n in notes)


def test_cold_dm_resolved_once_and_cached(env):
    store, s = env
    store.enqueue_send("card:1", "fakechat", "@dm:alice", None, "chat-sdk", {"text": "approve?"})
    runner = ChannelRunner(store, s, "fakechat")
    adapter = Platform(s, runner, [])
    _drive(runner, adapter, lambda: store.q1("SELECT status FROM channel_outbox")["status"]
           == "sent")
    assert adapter.dms == ["alice"]
    assert adapter.calls[0][1] == "fakechat:dm-alice"
    dm = store.q1("SELECT m.platform_id FROM user_dms d JOIN messaging_groups m ON"
                  " m.id=d.messaging_group_id WHERE d.user_id='fakechat:alice'")
    assert dm["platform_id"] == "fakechat:dm-alice"
    from nanoclaw.approvals.requests import dm_address

    assert dm_address(store, "fakechat:alice") == ("fakechat", "fakechat:dm-alice")
