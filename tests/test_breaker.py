"""The crash-loop breaker: the pure schedule, the host's file, and the supervisor
restarting real crashing processes on an injected clock."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import pytest
from conftest import wait_for

from nanoclaw.breaker import SCHEDULE, WINDOW, HostBreaker, delay_for, next_attempt
from nanoclaw.db.store import Store
from nanoclaw.host.supervisor import Supervisor


def test_schedule_and_cap():
    assert [delay_for(a) for a in range(1, 10)] == [0, 0, 10, 30, 120, 300, 900, 900, 900]
    assert SCHEDULE == (0, 0, 10, 30, 120, 300, 900)


def test_window_counts_up_inside_and_resets_outside():
    assert next_attempt(0, None, 1000.0) == 1
    assert next_attempt(3, 1000.0, 1000.0 + 3599.0) == 4  # 59m59s still inside
    assert next_attempt(3, 1000.0, 1000.0 + WINDOW) == 1
    assert next_attempt(3, 5000.0, 1000.0) == 1  # clock went backwards: start again


def test_host_breaker_file(tmp_path):
    b = HostBreaker(tmp_path / "missing-dir" / "circuit-breaker.json")
    t = 10_000.0
    got = [b.enter(t + i) for i in range(8)]
    assert [a for a, _ in got] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [d for _, d in got] == [0, 0, 10, 30, 120, 300, 900, 900]
    data = json.loads(b.path.read_text())
    assert data["attempt"] == 8 and data["timestamp"] == t + 7
    assert b.enter(t + 7 + WINDOW) == (1, 0)
    b.reset()
    assert not b.path.exists()
    assert b.enter(t) == (1, 0)
    b.path.write_text("{not json")
    assert b.enter(t + 1) == (1, 0)  # malformed counts as missing
    b.reset()
    b.reset()  # idempotent


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class RealProc:
    """A real forked process running `target`; the supervisor's process interface."""

    ctx = multiprocessing.get_context("fork")

    def __init__(self, target):
        self.p = self.ctx.Process(target=target)
        self.p.start()
        self.pid = self.p.pid

    def poll(self):
        return self.p.exitcode

    def signal(self, sig):
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


def _crash():
    os._exit(3)


def _healthy():
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        time.sleep(0.05)


def _config_error():
    os._exit(78)


def test_crashing_worker_follows_schedule_and_others_are_unaffected(tmp_path):
    store = Store.open(tmp_path)
    clock = Clock()
    starts: dict[str, list[float]] = {"crasher": [], "steady": []}

    def spawn(name):
        starts[name].append(clock.now)
        return RealProc(_crash if name == "crasher" else _healthy)

    sup = Supervisor(["crasher", "steady"], spawn, clock, store, grace=1.0)
    t0 = clock.now
    # Drive the supervisor: each tick, wait for the real crash, then advance the clock
    # one second at a time (so a start is observed within 1 s of its due time).
    while len(starts["crasher"]) < 8:
        sup.tick()
        slot = sup.slots["crasher"]
        if slot.proc is not None:
            wait_for(lambda: slot.proc.poll() is not None, 10, what="crash")
            sup.tick()
        else:
            clock.now += 1.0
    offsets = [round(s - t0) for s in starts["crasher"]]
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert gaps == [0, 10, 30, 120, 300, 900, 900], offsets
    assert len(starts["steady"]) == 1  # never restarted
    steady = sup.slots["steady"]
    assert steady.proc is not None and steady.proc.poll() is None
    row = {w["name"]: w for w in store.workers()}
    assert row["crasher"]["attempt"] == 8 and row["crasher"]["restarts"] == 8
    assert row["steady"]["restarts"] == 0
    # clean shutdown resets the counts
    sup.stop_all()
    wait_for(lambda: (sup.tick() or True) and not sup.running(), 10, what="stop")
    sup.reset_counts()
    assert all(w["attempt"] == 0 and w["restarts"] == 0 for w in store.workers())
    # and a later start of the crasher begins the schedule again
    sup2 = Supervisor(["crasher"], spawn, clock, store)
    sup2.tick()
    assert sup2.slots["crasher"].attempt == 1


def test_count_survives_a_host_crash(tmp_path):
    store = Store.open(tmp_path)
    clock = Clock()
    sup = Supervisor(["w"], lambda n: RealProc(_crash), clock, store)
    for _ in range(3):
        sup.tick()
        wait_for(lambda: sup.slots["w"].proc is None or sup.slots["w"].proc.poll() is not None, 10)
        sup.tick()
        clock.now = sup.slots["w"].next_start
    # the host dies here (no reset); a new supervisor reads the persisted count
    sup2 = Supervisor(["w"], lambda n: RealProc(_crash), clock, Store.open(tmp_path))
    assert sup2.slots["w"].attempt == sup.slots["w"].attempt >= 3


def test_bad_configuration_is_not_restart_looped(tmp_path):
    clock = Clock()
    n = {"starts": 0}

    def spawn(name):
        n["starts"] += 1
        return RealProc(_config_error)

    sup = Supervisor(["w"], spawn, clock, Store.open(tmp_path))
    sup.tick()
    wait_for(lambda: sup.slots["w"].proc.poll() is not None, 10)
    sup.tick()
    assert sup.slots["w"].state == "FATAL"
    clock.now += 5000
    sup.tick()
    assert n["starts"] == 1
    assert sup.request("w", "restart") is None
    sup.tick()
    assert n["starts"] == 2
    assert sup.request("nope", "restart") == "unknown worker 'nope'"


def test_clean_exit_resets_the_count(tmp_path):
    clock = Clock()
    plan = [_crash, _crash, lambda: os._exit(0), _crash]
    sup = Supervisor(["w"], lambda n: RealProc(plan.pop(0)), clock, Store.open(tmp_path))
    attempts = []
    while plan:
        sup.tick()
        slot = sup.slots["w"]
        if slot.proc is not None:
            attempts.append(slot.attempt)
            wait_for(lambda: slot.proc.poll() is not None, 10)
        clock.now += 1.0
    assert attempts == [1, 2, 3, 1]  # the 3rd run exited cleanly: the 4th starts afresh
