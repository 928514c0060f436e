"""Hung workers are found: every worker touches its heartbeat file (the runner, sync and
async alike), and the supervisor kills one that stops beating and restarts it under the
breaker. The decision is replayed on an injected clock; a real host proves it end to end
with a worker stopped by SIGSTOP (a stopped process beats no more than a stuck one)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, wait_for
from fakes.clock import FakeClock
from nanoclaw.db.store import Store
from nanoclaw.host.runner import heartbeat_path, last_beat
from nanoclaw.host.supervisor import Supervisor, silence, verdict
from nanoclaw.log import logger

BOUND = 10.0


# ---- the decision, on a fake clock ---------------------------------------------------
def Clock() -> FakeClock:
    return FakeClock(start=1_000_000.0)


class FakeProc:
    """The supervisor's process interface, scripted: SIGKILL makes it exit at once."""

    pids = itertools.count(4000)

    def __init__(self) -> None:
        self.pid = next(self.pids)
        self.code: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.code

    def signal(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.code = -signal.SIGKILL


class Scene:
    """A supervisor of `names` on a fake clock with scripted heartbeats."""

    def __init__(self, tmp_path: Path, names: list[str], grace: float = 5.0) -> None:
        self.clock = Clock()
        self.beats: dict[str, float] = {}
        self.spawned: dict[str, list[FakeProc]] = {n: [] for n in names}
        self.store = Store.open(tmp_path)
        self.sup = Supervisor(names, self.spawn, self.clock, self.store, grace=grace,
                              hung_after=BOUND, beats=self.beats.get)

    def spawn(self, name: str) -> FakeProc:
        p = FakeProc()
        self.spawned[name].append(p)
        return p

    def run(self, seconds: float, beating: tuple[str, ...] = (), step: float = 1.0) -> None:
        """Advance the clock `step` at a time, ticking; `beating` workers beat each step."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now += step
            for n in beating:
                self.beats[n] = self.clock.now
            self.sup.tick()

    def state(self, name: str) -> str:
        return {w["name"]: w for w in self.store.workers()}[name]["state"]


@pytest.fixture
def lines():
    got: list[str] = []
    sink = logger.add(lambda m: got.append(m.rstrip("\n")), format="{message}", level="INFO")
    yield got
    logger.remove(sink)


def test_silence_counts_from_the_last_beat_or_the_start():
    assert silence(100.0, since=90.0, beat=None) == 10.0      # never beat: from its start
    assert silence(100.0, since=90.0, beat=50.0) == 10.0      # a predecessor's beat: ignored
    assert silence(100.0, since=90.0, beat=97.0) == 3.0       # its own beat
    assert [verdict(q, BOUND) for q in (0, 4.9, 5, 9.9, 10, 50)] == \
        ["ok", "ok", "HUNG", "HUNG", "kill", "kill"]


def test_a_stale_worker_is_shown_hung_then_killed_and_restarted(tmp_path, lines):
    sc = Scene(tmp_path, ["stuck", "fine"])
    sc.sup.tick()  # both start
    sc.run(3, beating=("stuck", "fine"))
    assert sc.state("stuck") == "RUNNING" and sc.state("fine") == "RUNNING"
    first = sc.spawned["stuck"][0]

    sc.run(4, beating=("fine",))  # 4 s without a beat: still fine
    assert sc.state("stuck") == "RUNNING" and first.signals == []
    sc.run(1, beating=("fine",))  # 5 s: half the bound
    assert sc.state("stuck") == "HUNG" and first.signals == []
    assert [ln for ln in lines if "looks hung" in ln] == [
        "worker stuck looks hung: no heartbeat for 5 s (killed at 10 s)"]
    # `nanoclaw workers` shows it so, before it is killed
    env = {**os.environ, "NANOCLAW_DATA_DIR": str(tmp_path), "NANOCLAW_LOGS_DIR":
           str(tmp_path / "logs")}
    listing = subprocess.run([sys.executable, "-m", "nanoclaw", "workers"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    row = [ln for ln in listing.stdout.splitlines() if ln.startswith("stuck ")]
    assert row and row[0].split()[1] == "HUNG", listing.stdout + listing.stderr
    assert sc.sup.next_due() == pytest.approx(sc.clock.now + 5)  # the kill is due then

    sc.run(4, beating=("fine",))  # 9 s
    assert first.signals == []
    sc.run(1, beating=("fine",))  # 10 s: killed, reaped and started again (attempt 2: 0 s)
    assert first.signals == [signal.SIGKILL]
    assert "worker stuck hung: no heartbeat for 10 s; killed" in lines
    sc.run(1, beating=("stuck", "fine"))
    assert len(sc.spawned["stuck"]) == 2 and len(sc.spawned["fine"]) == 1
    w = {w["name"]: w for w in sc.store.workers()}
    assert w["stuck"]["restarts"] == 1 and w["stuck"]["attempt"] == 2
    assert w["stuck"]["last_exit"] == "hung: no heartbeat for 10 s; killed by SIGKILL"
    assert w["stuck"]["pid"] == sc.spawned["stuck"][1].pid
    assert w["fine"]["restarts"] == 0 and sc.spawned["fine"][0].signals == []
    sc.run(2, beating=("stuck", "fine"))
    assert sc.state("stuck") == "RUNNING"


def test_hanging_again_follows_the_breaker_schedule(tmp_path):
    sc = Scene(tmp_path, ["stuck"])
    sc.sup.tick()
    starts = []
    while len(sc.spawned["stuck"]) < 4:  # never beats: killed at the bound from each start
        n = len(sc.spawned["stuck"])
        sc.run(1)
        if len(sc.spawned["stuck"]) > n:
            starts.append(sc.clock.now)
    gaps = [round(b - a) for a, b in zip(starts, starts[1:])]
    # killed at the bound, reaped a tick (1 s) later; attempts 3 and 4 wait 10 s and 30 s
    assert gaps == [BOUND + 1 + 10, BOUND + 1 + 30]


def test_fresh_beats_and_the_start_grace_keep_a_worker(tmp_path):
    sc = Scene(tmp_path, ["w"])
    sc.beats["w"] = sc.clock.now - 1000  # a predecessor's file, long stale
    sc.sup.tick()
    sc.run(BOUND - 1)  # just started, not beaten yet: grace until its first beat
    assert sc.spawned["w"][0].signals == [] and sc.state("w") == "HUNG"
    sc.run(1, beating=("w",))  # its first beat
    assert sc.state("w") == "RUNNING"
    sc.run(10 * BOUND, beating=("w",))  # beating: kept however long
    sc.run(BOUND / 2 - 1)
    assert sc.spawned["w"] == sc.spawned["w"][:1] and sc.spawned["w"][0].signals == []
    assert sc.state("w") == "RUNNING"


def test_a_gap_in_the_supervisors_own_ticks_kills_nobody(tmp_path):
    """A suspended laptop (or a clock jump): nobody beat while the supervisor was not
    looking either; silence counts again from its return."""
    sc = Scene(tmp_path, ["w"])
    sc.sup.tick()
    sc.run(3, beating=("w",))
    sc.run(3600, step=3600)  # one tick an hour later
    assert sc.spawned["w"][0].signals == [] and sc.state("w") == "RUNNING"
    sc.run(BOUND)  # and then no beat for a full bound: that is a hang
    assert sc.spawned["w"][0].signals == [signal.SIGKILL]


def test_a_worker_being_stopped_is_not_judged(tmp_path):
    sc = Scene(tmp_path, ["w"], grace=15.0)
    sc.sup.tick()
    sc.run(2, beating=("w",))
    assert sc.sup.request("w", "stop") is None
    sc.run(12)  # silent past the bound while it is given its stop grace (15 s)
    assert sc.spawned["w"][0].signals == [signal.SIGTERM] and sc.state("w") == "RUNNING"
    sc.run(4)  # the stop deadline acts, not the watch
    assert sc.spawned["w"][0].signals == [signal.SIGTERM, signal.SIGKILL]
    assert sc.state("w") == "STOPPED"


@pytest.mark.parametrize("value", ["0", "0.5", "3601", "soon"])
def test_the_bound_is_validated(monkeypatch, value):
    from nanoclaw import config

    monkeypatch.setenv("NANOCLAW_WORKER_HUNG_AFTER", value)
    with pytest.raises(config.SettingsError, match="^bad setting NANOCLAW_WORKER_HUNG_AFTER: "):
        config.load()
    monkeypatch.delenv("NANOCLAW_WORKER_HUNG_AFTER")
    assert config.load().worker_hung_after == 60.0


# ---- the runner beats ----------------------------------------------------------------
RUNNER = """
import asyncio, sys, time
from pathlib import Path
from nanoclaw.config import Settings
from nanoclaw.host.runner import Worker, run

base, kind = Path(sys.argv[1]), sys.argv[2]

class Idle(Worker):          # nothing due for an hour: only its sleep cap wakes it
    name = "idle"
    def loop_once(self, now):
        return 3600.0

class Calm(Worker):          # an asyncio worker waiting for its stop
    name = "calm"
    asynchronous = True
    async def main(self, stop):
        await stop.wait()

class Blocked(Worker):       # an asyncio worker whose event loop is stuck
    name = "blocked"
    asynchronous = True
    async def main(self, stop):
        time.sleep(3600)

W = {"idle": Idle, "calm": Calm, "blocked": Blocked}[kind]
s = Settings(data_dir=base / "data", logs_dir=base / "logs", worker_hung_after=1.0)
sys.exit(run(W(s)))
"""


def _runner(tmp_path: Path, kind: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path), kind], env=env, cwd=ROOT,
                         stdout=open(tmp_path / f"{kind}.out", "ab"), stderr=subprocess.STDOUT)
    wait_for(lambda: last_beat(tmp_path / "data", kind) is not None, 15, what=f"{kind} beats")
    return p


@pytest.mark.parametrize("kind", ["idle", "calm"])
def test_an_idle_worker_keeps_beating_and_removes_its_file_on_stop(tmp_path, kind):
    p = _runner(tmp_path, kind)
    try:
        first = last_beat(tmp_path / "data", kind)
        wait_for(lambda: (last_beat(tmp_path / "data", kind) or 0) > first + 0.15, 5,
                 what="a later beat")  # every 0.1 s (a tenth of the bound), asleep or not
        path = heartbeat_path(tmp_path / "data", kind)
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    assert last_beat(tmp_path / "data", kind) is None


def test_a_blocked_event_loop_stops_beating(tmp_path):
    p = _runner(tmp_path, "blocked")
    try:
        first = last_beat(tmp_path / "data", "blocked")
        time.sleep(0.6)
        assert last_beat(tmp_path / "data", "blocked") == first
    finally:
        p.kill()
        p.wait(10)


# ---- a real host ---------------------------------------------------------------------
def test_a_stopped_worker_is_killed_and_restarted_and_the_host_still_answers(host_factory):
    h = host_factory("hung", NANOCLAW_WORKER_HUNG_AFTER="5", NANOCLAW_WEB_ENABLED="false")
    h.start()
    wait_for(lambda: all(w["state"] == "RUNNING" for w in h.workers()), 15, what="workers up")
    before = {w["name"]: w["pid"] for w in h.workers()}
    assert all(last_beat(h.data, n) is not None for n in before), "every worker beats"
    victims = ("router", "broker")  # the sync runner and the async one
    for v in victims:
        os.kill(before[v], signal.SIGSTOP)
    try:
        def states() -> dict[str, str]:
            return {w["name"]: w["state"] for w in h.workers()}

        wait_for(lambda: all(states()[v] == "HUNG" for v in victims), 10, interval=0.02,
                 what="shown HUNG before the kill")
        wait_for(lambda: all(h.worker_pid(v) not in (None, before[v]) for v in victims), 15,
                 what="hung workers restarted")
    finally:
        for v in victims:
            try:
                os.kill(before[v], signal.SIGCONT)
            except ProcessLookupError:
                pass
    wait_for(lambda: all(w["state"] == "RUNNING" for w in h.workers()), 15,
             what="all RUNNING again")
    ws = {w["name"]: w for w in h.workers()}
    for v in victims:
        assert ws[v]["restarts"] == 1 and "hung: no heartbeat for" in ws[v]["last_exit"]
        with pytest.raises(ProcessLookupError):
            os.kill(before[v], 0)
    others = {n: p for n, p in before.items() if n not in victims}
    assert {n: ws[n]["pid"] for n in others} == others
    assert all(ws[n]["restarts"] == 0 for n in others)
    log = (h.base / "logs" / "nanoclaw.log").read_text().splitlines()
    for v in victims:
        said = [ln for ln in log if f"worker {v} hung: no heartbeat for " in ln]
        assert len(said) == 1 and said[0].endswith(" s; killed"), said
    c = h.client()
    mid = c.send("still there after a hang?")
    assert c.wait_reply(mid, 60)["text"] == "echo: still there after a hang?"
