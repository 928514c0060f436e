"""Two restart schedules (issue 20, item 7). A worker that talks to an outside platform
keeps the seed's slow schedule, so a crash loop cannot get the machine banned; every
other worker is back within a second or two, capped so a true crash loop neither burns
the CPU nor goes unseen; a host restart is not a crash of each local worker.

Replayed on an injected clock with scripted processes, then once on a real host: after
two host crashes, the broker killed three times within a minute costs seconds."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_for
from fakes.clock import FakeClock

from nanoclaw.breaker import (
    LOCAL,
    LOCAL_CAP,
    LOCAL_PAUSE,
    LOCAL_PAUSE_AFTER,
    LOCAL_WINDOW,
    LOCAL_WORKERS,
    PLATFORM,
    SCHEDULE,
    WINDOW,
    delay_for,
    next_attempt,
    restart_kind,
)
from nanoclaw.channels import load_builtin
from nanoclaw.db.store import Store
from nanoclaw.host.registry import WORKERS
from nanoclaw.host.supervisor import Supervisor
from nanoclaw.log import logger

LOCALS = ["router", "delivery", "sweep", "containers", "broker", "webhooks", "egress",
          "channel:cli", "channel:web"]


# ---- the schedules and who gets which ---------------------------------------------------
def test_the_two_schedules():
    assert [delay_for(a, PLATFORM) for a in range(1, 10)] == [0, 0, 10, 30, 120, 300, 900,
                                                               900, 900]
    assert [delay_for(a) for a in range(1, 10)] == [delay_for(a, PLATFORM) for a in range(1, 10)]
    local = [delay_for(a, LOCAL) for a in range(1, 40)]
    assert local[:6] == [0, 0.5, 1, 2, 2, 2]
    assert max(local[:LOCAL_PAUSE_AFTER - 1]) == LOCAL_CAP == 2
    assert local[LOCAL_PAUSE_AFTER - 1:] == [LOCAL_PAUSE] * (40 - LOCAL_PAUSE_AFTER)
    assert LOCAL_PAUSE == 60
    # a local count restarts after a couple of quiet minutes, a platform one after an hour
    assert next_attempt(5, 1000.0, 1000.0 + LOCAL_WINDOW - 1, LOCAL) == 6
    assert next_attempt(5, 1000.0, 1000.0 + LOCAL_WINDOW, LOCAL) == 1
    assert next_attempt(5, 1000.0, 1000.0 + LOCAL_WINDOW, PLATFORM) == 6
    assert next_attempt(5, 1000.0, 1000.0 + WINDOW, PLATFORM) == 1
    assert LOCAL_PAUSE < LOCAL_WINDOW  # a paced loop keeps its count, so stays paced


def test_platform_channels_get_the_seeds_schedule_everything_else_is_local():
    assert {n: restart_kind(n) for n in LOCALS} == {n: LOCAL for n in LOCALS}
    assert LOCAL_WORKERS == set(LOCALS)
    assert set(WORKERS) <= LOCAL_WORKERS  # a new core worker is classified on purpose
    channels = load_builtin().names()
    assert all(n in WORKERS or n == "webhooks" or n.removeprefix("channel:") in channels
               for n in LOCALS)  # and every local name is one the registry can run
    platform = [f"channel:{c}" for c in load_builtin().names() if c not in ("cli", "web")]
    assert {"channel:telegram", "channel:discord", "channel:slack"} <= set(platform)
    assert {n: restart_kind(n) for n in platform} == {n: PLATFORM for n in platform}
    assert restart_kind("channel:something-new") == PLATFORM  # unknown: the cautious one
    assert restart_kind("crasher") == PLATFORM


# ---- the supervisor, on an injected clock -----------------------------------------------
def Clock() -> FakeClock:
    return FakeClock(start=1_000_000.0)


class FakeProc:
    pids = itertools.count(7000)

    def __init__(self) -> None:
        self.pid = next(self.pids)
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code

    def signal(self, sig: int) -> None:
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.code = -sig


class Scene:
    """A supervisor of `names` over a store (one host run); `crashing` workers die the
    moment they start."""

    def __init__(self, store: Store, clock: Clock, names: list[str],
                 crashing: tuple[str, ...] = ()) -> None:
        self.clock, self.store, self.crashing = clock, store, set(crashing)
        self.starts: dict[str, list[float]] = {n: [] for n in names}
        self.procs: dict[str, FakeProc] = {}
        self.sup = Supervisor(names, self.spawn, clock, store)

    def spawn(self, name: str) -> FakeProc:
        self.starts[name].append(self.clock.now)
        p = self.procs[name] = FakeProc()
        if name in self.crashing:
            p.code = 1
        return p

    def run(self, seconds: float, step: float = 0.25) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            for _ in range(3):  # reaps at once what died on starting (as SIGCHLD would)
                self.sup.tick()
            self.clock.now += step

    def kill(self, name: str) -> float:
        """Kill it now (reaped at the next tick); returns when."""
        self.procs[name].code = -signal.SIGKILL
        return self.clock.now

    def started_after(self, name: str, t: float) -> float:
        return round(min(s for s in self.starts[name] if s > t) - t, 2)

    def gaps(self, name: str) -> list[float]:
        s = self.starts[name]
        return [round(b - a, 2) for a, b in zip(s, s[1:])]

    def row(self, name: str) -> dict:
        return {w["name"]: w for w in self.store.workers()}[name]


@pytest.fixture
def errors():
    got: list[str] = []
    sink = logger.add(lambda m: got.append(m.rstrip("\n")), format="{message}", level="ERROR")
    yield got
    logger.remove(sink)


def test_a_crash_looping_local_worker_is_capped_then_paced_and_loud(tmp_path, errors):
    sc = Scene(Store.open(tmp_path), Clock(), ["broker", "router"], crashing=("broker",))
    sc.run(120)
    gaps = sc.gaps("broker")
    # back at once-ish, then never more than one start per LOCAL_CAP s ...
    assert gaps[:5] == [0.5, 1, 2, 2, 2]
    assert gaps[3:LOCAL_PAUSE_AFTER - 2] == [2.0] * (LOCAL_PAUSE_AFTER - 5)
    # ... until LOCAL_PAUSE_AFTER starts in a row: then a minute between starts
    assert gaps[LOCAL_PAUSE_AFTER - 2:] and set(gaps[LOCAL_PAUSE_AFTER - 2:]) == {LOCAL_PAUSE}
    assert len(sc.starts["broker"]) <= 120 / LOCAL_CAP
    assert sc.starts["router"] == sc.starts["router"][:1]  # a neighbour is untouched
    assert sc.row("broker")["state"] == "BACKOFF" and sc.row("broker")["next_start_at"]
    loud = [ln for ln in errors if ln.startswith("worker broker is crash-looping")]
    assert loud and len(loud) == len(gaps) - 3  # every death from the 5th start on
    assert loud[-1].endswith(" in 60s")


def test_a_crash_looping_platform_channel_keeps_the_seeds_schedule(tmp_path):
    sc = Scene(Store.open(tmp_path), Clock(), ["channel:telegram", "broker"],
               crashing=("channel:telegram",))
    sc.run(2000, step=1.0)
    assert sc.gaps("channel:telegram") == [0, 10, 30, 120, 300, 900]
    assert list(SCHEDULE) == [0, 0, 10, 30, 120, 300, 900]


def _host_crash(sc: Scene, names: list[str], crashing: tuple[str, ...] = ()) -> Scene:
    """The host dies (no reset: its workers die with it, the rows stay as they were) and a
    new one starts on the same store a little later."""
    sc.clock.now += 5
    return Scene(sc.store, sc.clock, names, crashing)


def test_a_host_restart_is_not_a_crash_of_each_local_worker(tmp_path):
    names = ["broker", "containers", "channel:telegram"]
    sc = Scene(Store.open(tmp_path), Clock(), names)
    sc.run(3)
    for _ in range(2):  # two host crashes
        sc = _host_crash(sc, names)
        sc.run(3)
    assert {n: sc.row(n)["attempt"] for n in names} == {
        "broker": 1, "containers": 1,
        "channel:telegram": 3}  # a platform channel counts every connect, as the seed did
    # the broker killed three times within a minute: back after 0.5, 1 and 2 s
    delays = []
    for _ in range(3):
        killed = sc.kill("broker")
        sc.run(10)
        delays.append(sc.started_after("broker", killed))
    assert delays == [0.5, 1, 2]  # the seed's schedule: 30, 120, 300
    assert sc.row("broker")["attempt"] == 4 and sc.row("broker")["restarts"] == 3
    # telegram after the same two host crashes: its next start waits the seed's 30 s
    killed = sc.kill("channel:telegram")
    sc.run(40)
    assert sc.started_after("channel:telegram", killed) == 30


def test_a_local_worker_crash_looping_before_the_host_died_keeps_its_count(tmp_path):
    names = ["broker", "router"]
    sc = Scene(Store.open(tmp_path), Clock(), names, crashing=("broker",))
    sc.run(20)
    before = sc.row("broker")
    assert before["state"] == "BACKOFF" and before["attempt"] >= 8
    sc = _host_crash(sc, names, crashing=("broker",))
    sc.run(0.5)
    # its first start in the new run is the restart it was waiting for: counted
    assert sc.sup.slots["broker"].attempt == before["attempt"] + 1
    assert sc.sup.slots["router"].attempt == 1
    sc.run(10)
    assert set(sc.gaps("broker")) == {LOCAL_CAP}
    # one long crash-looping past LOCAL_PAUSE_AFTER stays paced after a host crash
    sc.run(60)
    assert sc.sup.slots["broker"].attempt == LOCAL_PAUSE_AFTER - 1  # its next start: paced
    slot = sc.sup.slots["broker"]
    assert slot.next_start == slot.last_start + LOCAL_PAUSE and slot.next_start > sc.clock.now
    sc = _host_crash(sc, names, crashing=("broker",))
    sc.run(70)
    assert sc.gaps("broker") == [LOCAL_PAUSE]


def test_a_clean_host_stop_resets_every_count(tmp_path):
    names = ["broker", "channel:telegram"]
    sc = Scene(Store.open(tmp_path), Clock(), names)
    sc.run(2)
    sc = _host_crash(sc, names)
    sc.run(2)
    sc.kill("broker")
    sc.kill("channel:telegram")
    sc.run(2)
    sc.sup.stop_all()
    sc.run(1)
    sc.sup.reset_counts()
    assert all(w["attempt"] == 0 for w in sc.store.workers())
    sc = _host_crash(sc, names)
    sc.run(1)
    assert {n: s.attempt for n, s in sc.sup.slots.items()} == {"broker": 1, "channel:telegram": 1}


# ---- a real host --------------------------------------------------------------------------
def _restarted(h, old: dict[str, int]) -> bool:
    ws = h.workers()
    return bool(ws) and all(w["state"] == "RUNNING" and w["pid"] and w["pid"] != old.get(w["name"])
                            for w in ws)


def _log(h) -> list[str]:
    return (Path(h.base) / "logs" / "nanoclaw.log").read_text().splitlines()


def test_after_two_host_crashes_the_broker_killed_thrice_costs_seconds(host_factory):
    h = host_factory("kinds", NANOCLAW_WEB_ENABLED="false")
    h.start()
    c = h.client()
    c.wait_reply(c.send("before the crashes"), 60)
    for _ in range(2):  # two host crashes (the third start waits the host breaker's 10 s)
        old = {w["name"]: w["pid"] for w in h.workers()}
        h.kill9()
        h.start()
        wait_for(lambda: _restarted(h, old), 40, what="a new host's workers")
    ws = {w["name"]: w for w in h.workers()}
    assert {n: w["attempt"] for n, w in ws.items()} == {n: 1 for n in ws}  # all local here
    c = h.client("after")
    c.wait_reply(c.send("warm"), 60)  # an agent is up: what follows times the broker alone
    t_first = time.time()
    took = []
    for i in range(3):
        old_pid = h.worker_pid("broker")
        os.kill(old_pid, signal.SIGKILL)
        t0 = time.time()
        reply = c.wait_reply(c.send(f"after kill {i}"), 10)  # seconds, not minutes
        took.append(time.time() - t0)
        assert reply["text"] == f"echo: after kill {i}"
        wait_for(lambda: h.worker_pid("broker") not in (None, old_pid), 5, what="broker back")
    assert time.time() - t_first < 60, took
    broker = {w["name"]: w for w in h.workers()}["broker"]
    assert broker["restarts"] == 3 and broker["attempt"] == 4
    said = [ln.split("restart ", 1)[1] for ln in _log(h) if "worker broker died (" in ln]
    assert said == ["1 in 0.5s", "2 in 1s", "3 in 2s"], said
