"""The generic channel runner around an adapter, on a fake clock (nothing here waits in
real time): sends wait while nobody can receive them, `retry_after` is honoured to the
second, transient errors back off on the BACKOFF schedule, a send that keeps failing is
failed for good and the agent is told, typing is refreshed while an answer is awaited,
cold DMs are resolved once and cached."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from dbread import db_row
from fakes.clock import FakeClock
from nanoclaw import config
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.channels.base import Channel, RetryAfter, SendError, Unavailable
from nanoclaw.channels.runner import BACKOFF, PARK_SECONDS, TYPING_EVERY, TYPING_FOR, ChannelRunner
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.delivery.delivery import Delivery
from nanoclaw.routing.router import Event, Router
from nanoclaw.util import local_user_id


class Platform(Channel):
    """Stands in for a chat platform's API: scripted outcomes, every call recorded."""

    name = "fakechat"

    def __init__(self, settings, host, script, clock=time.time):
        super().__init__(settings, host)
        self.script, self.calls, self.dms, self.typed = list(script), [], [], []
        self.clock = clock

    async def deliver(self, platform_id, thread_id, message):
        self.calls.append((self.clock(), platform_id, message.content))
        outcome = self.script.pop(0) if self.script else "ok"
        if isinstance(outcome, Exception):
            raise outcome
        return f"pm-{len(self.calls)}"

    async def open_dm(self, handle):
        self.dms.append(handle)
        return f"fakechat:dm-{handle}"

    async def set_typing(self, platform_id, thread_id):
        self.typed.append((self.clock(), platform_id, thread_id))


@pytest.fixture
def env(tmp_path, monkeypatch):
    for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data", "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                 "NANOCLAW_GROUPS_DIR": tmp_path / "groups", "NANOCLAW_SEND_ATTEMPTS": "3"}.items():
        monkeypatch.setenv(k, str(v))
    s = config.load()
    store = Store.open(s.data_dir)
    ensure_defaults(store, s)
    return store, s


def _drive(runner: ChannelRunner, adapter: Platform, clock: FakeClock, until, passes=20):
    """Run passes of the runner, jumping the clock to the next retry between them."""
    async def go():
        runner.adapter = adapter
        for _ in range(passes):
            await runner.tick(clock())
            if until():
                return
            assert runner.next_due is not None, "nothing left to send, condition not reached"
            clock.to(runner.next_due)
        raise AssertionError("condition not reached")
    asyncio.run(go())


def _status(store: Store) -> str:
    return db_row(store, "SELECT status FROM channel_outbox")["status"]


def test_unavailable_parks_without_counting(env):
    store, s = env
    clock = FakeClock()
    store.enqueue_send("k1", "fakechat", "fakechat:1", None, "chat", {"text": "hi"})
    runner = ChannelRunner(store, s, "fakechat", clock=clock)
    adapter = Platform(s, runner, [Unavailable("nobody"), "ok"], clock)
    _drive(runner, adapter, clock, lambda: _status(store) == "sent")
    row = db_row(store, "SELECT * FROM channel_outbox")
    assert row["attempts"] == 1 and row["platform_message_id"] == "pm-2"
    (t1, _, _), (t2, _, _) = adapter.calls
    assert t2 - t1 == PARK_SECONDS


def test_retry_after_is_honoured(env):
    store, s = env
    clock = FakeClock()
    store.enqueue_send("k1", "fakechat", "fakechat:1", None, "chat", {"text": "hi"})
    runner = ChannelRunner(store, s, "fakechat", clock=clock)
    adapter = Platform(s, runner, [RetryAfter(1.0), "ok"], clock)
    _drive(runner, adapter, clock, lambda: _status(store) == "sent")
    (t1, _, _), (t2, _, _) = adapter.calls
    assert t2 - t1 == 1.0  # when the platform said: not before, not a poll later
    assert db_row(store, "SELECT attempts FROM channel_outbox")["attempts"] == 2


def test_nothing_is_sent_before_its_retry_time(env):
    store, s = env
    clock = FakeClock()
    store.enqueue_send("k1", "fakechat", "fakechat:1", None, "chat", {"text": "hi"})
    runner = ChannelRunner(store, s, "fakechat", clock=clock)
    adapter = Platform(s, runner, [RetryAfter(30.0)], clock)

    async def go():
        runner.adapter = adapter
        t0 = clock()
        await runner.tick(t0)
        for dt in (1.0, 10.0, 29.999):
            clock.to(t0 + dt)
            await runner.tick(clock())
        assert len(adapter.calls) == 1
        clock.to(t0 + 30.0)
        await runner.tick(clock())
        assert len(adapter.calls) == 2
    asyncio.run(go())
    assert _status(store) == "sent"


def test_send_that_keeps_failing_is_told_to_the_agent(env):
    store, s = env
    owner = local_user_id().split(":", 1)[1]
    (sid,) = Router(store, s).route(Event("cli", "local", "m1", text="hi", sender_id=owner,
                                          is_mention=True))
    sess = store.session(sid)
    p = sessiondb.SessionPaths(str(s.session_dir(sess["agent_group_id"], sid)))
    store.enqueue_send(f"{sid}:out-1", "fakechat", "fakechat:1", None, "chat", {"text": "x"},
                       session_id=sid, message_out_id="out-1")
    clock = FakeClock()
    runner = ChannelRunner(store, s, "fakechat", clock=clock)
    adapter = Platform(s, runner, [SendError("boom")] * 2 + [SendError("gone", permanent=True)],
                       clock)
    _drive(runner, adapter, clock, lambda: _status(store) == "failed")
    at = [t for t, _, _ in adapter.calls]
    assert [b - a for a, b in zip(at, at[1:])] == list(BACKOFF[:2])  # 1 s, then 5 s
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
    clock = FakeClock()
    runner = ChannelRunner(store, s, "fakechat", clock=clock)
    adapter = Platform(s, runner, [], clock)
    _drive(runner, adapter, clock, lambda: _status(store) == "sent")
    assert adapter.dms == ["alice"]
    assert adapter.calls[0][1] == "fakechat:dm-alice"
    dm = db_row(store, "SELECT m.platform_id FROM user_dms d JOIN messaging_groups m ON"
                  " m.id=d.messaging_group_id WHERE d.user_id='fakechat:alice'")
    assert dm["platform_id"] == "fakechat:dm-alice"
    from nanoclaw.approvals.requests import dm_address

    assert dm_address(store, "fakechat:alice") == ("fakechat", "fakechat:dm-alice")


def test_transient_errors_back_off_on_the_schedule_until_the_last_attempt(env, monkeypatch):
    store, s = env
    monkeypatch.setattr(s, "send_attempts", 6)
    clock = FakeClock()
    store.enqueue_send("k1", "fakechat", "fakechat:1", None, "chat", {"text": "hi"})
    runner = ChannelRunner(store, s, "fakechat", clock=clock)
    adapter = Platform(s, runner, [SendError("flaky")] * 3 + [OSError("adapter bug")] * 3,
                       clock)
    _drive(runner, adapter, clock, lambda: _status(store) == "failed")
    at = [t for t, _, _ in adapter.calls]
    assert [b - a for a, b in zip(at, at[1:])] == [1.0, 5.0, 15.0, 60.0, 300.0]
    row = db_row(store, "SELECT * FROM channel_outbox")
    assert row["attempts"] == 6 and "adapter bug" in row["error"]


def _wired_chat(store: Store, s) -> None:
    ag = db_row(store, "SELECT id FROM agent_groups WHERE folder='main'")["id"]
    mg = store.create_messaging_group("fakechat", "fakechat:1", "fake 1", False, policy="public")
    store.wire(mg, ag, destination="fake-1", engage_mode="pattern", engage_pattern=".")


def test_typing_is_refreshed_while_an_answer_is_awaited_and_then_stops(env):
    store, s = env
    _wired_chat(store, s)
    clock = FakeClock()
    runner = ChannelRunner(store, s, "fakechat", clock=clock)
    adapter = Platform(s, runner, [], clock)
    t0 = clock()

    async def go():
        runner.adapter = adapter
        assert await runner.inbound("fakechat:1", "m1", {"text": "hi", "is_mention": True,
                                                          "is_group": False})
        assert not await runner.inbound("fakechat:1", "m1", {"text": "hi"})  # a redelivery
        while clock() <= t0 + TYPING_FOR + 5:
            await runner.tick(clock())
            clock.advance(1.0)
    asyncio.run(go())
    shown = [t - t0 for t, _, _ in adapter.typed]
    assert shown == [i * TYPING_EVERY for i in range(int(TYPING_FOR / TYPING_EVERY))]
    assert runner.typing == {}


def test_a_reply_ends_typing_and_unwired_chats_never_show_it(env):
    store, s = env
    _wired_chat(store, s)
    clock = FakeClock()
    runner = ChannelRunner(store, s, "fakechat", clock=clock)
    adapter = Platform(s, runner, [], clock)

    async def go():
        runner.adapter = adapter
        await runner.inbound("fakechat:2", "m0", {"text": "nobody listens", "is_group": False})
        await runner.inbound("fakechat:1", "m1", {"text": "hi", "is_group": False})
        await runner.tick(clock())
        clock.advance(TYPING_EVERY)
        store.enqueue_send("r1", "fakechat", "fakechat:1", None, "chat", {"text": "answer"})
        runner.wakeup.set()  # delivery's nudge (our own write does not move data_version)
        await runner.tick(clock())
        clock.advance(TYPING_EVERY)
        await runner.tick(clock())
    asyncio.run(go())
    assert [(t, pid) for t, pid, _ in adapter.typed] == [(clock() - 2 * TYPING_EVERY,
                                                         "fakechat:1")]
    assert [c[1] for c in adapter.calls] == ["fakechat:1"] and runner.typing == {}


class SplitPlatform(Channel):
    """A platform that takes a send in three parts; `crash_after` parts in, the worker
    "dies" (the attempt never returns); `shown` is what users see. It cannot tell what
    it already has (Telegram, WhatsApp): no `find_sent`."""

    name = "fakechat"

    def __init__(self, settings, host, crash_after=None):
        super().__init__(settings, host)
        self.crash_after = crash_after
        self.shown: list[tuple[str, int, str]] = []  # (send key, part, platform id)
        self.asked: list[float] = []

    async def deliver(self, platform_id, thread_id, message):
        for i in range(3):
            if i < len(message.parts):
                continue
            pid = f"pm-{len(self.shown) + 1}"
            self.shown.append((message.idem_key, i, pid))  # it reached the platform…
            if self.crash_after is not None and len(self.shown) == self.crash_after:
                self.crash_after = None
                raise asyncio.CancelledError  # …and the worker died before it heard back
            message.sent(pid)
        return message.parts[0]


class HistoryPlatform(SplitPlatform):
    """One that can tell, from its history (Slack's marker)."""

    async def find_sent(self, platform_id, thread_id, message, since):
        self.asked.append(since)
        return {i: pid for key, i, pid in self.shown if key == message.idem_key}


class BrokenHistoryPlatform(SplitPlatform):
    """One whose history cannot be read just now (a missing scope, an outage)."""

    async def find_sent(self, platform_id, thread_id, message, since):
        self.asked.append(since)
        raise ConnectionError("history unavailable")


def _crash_then_restart(env, kind: type[SplitPlatform]) -> tuple[Store, SplitPlatform]:
    store, s = env
    clock = FakeClock()
    store.enqueue_send("k1", "fakechat", "fakechat:1", None, "chat", {"text": "long"})
    first = ChannelRunner(store, s, "fakechat", clock=clock)
    dying = kind(s, first, crash_after=2)

    async def crash():
        first.adapter = dying
        with pytest.raises(asyncio.CancelledError):
            await first.tick(clock())
    asyncio.run(crash())
    row = db_row(store, "SELECT * FROM channel_outbox")
    assert row["status"] == "pending" and row["attempt_at"] and json.loads(row["parts"]) == ["pm-1"]
    second = ChannelRunner(store, s, "fakechat", clock=clock)  # the restarted worker
    after = kind(s, second)
    after.shown = list(dying.shown)  # the same platform
    _drive(second, after, clock, lambda: _status(store) == "sent")
    row = db_row(store, "SELECT * FROM channel_outbox")
    assert row["platform_message_id"] == "pm-1" and row["attempt_at"] is None
    return store, after


def test_a_split_send_cut_off_by_a_crash_resumes_and_shows_each_part_once(env):
    store, after = _crash_then_restart(env, HistoryPlatform)
    assert [(i, pid) for _, i, pid in after.shown] == [(0, "pm-1"), (1, "pm-2"), (2, "pm-3")]
    assert len(after.asked) == 1  # the part in flight was looked for, once
    parts = json.loads(db_row(store, "SELECT parts FROM channel_outbox")["parts"])
    assert parts == ["pm-1", "pm-2", "pm-3"]


@pytest.mark.parametrize("kind", [SplitPlatform, BrokenHistoryPlatform])
def test_where_the_platform_cannot_tell_only_the_part_in_flight_goes_again(env, kind):
    store, after = _crash_then_restart(env, kind)
    assert [i for _, i, _ in after.shown] == [0, 1, 1, 2]  # at least once; part 0 never again
    assert len(after.asked) == (kind is BrokenHistoryPlatform)
