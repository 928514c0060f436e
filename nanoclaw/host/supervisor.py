"""Supervision by reconciling: compare the workers we want with the ones running, act
once per tick. The clock and the process constructor are passed in, so tests replay a
crash history on an injected clock with real or scripted processes.

States: STARTING (spawned, not yet up a second), RUNNING, HUNG (no heartbeat for half
the bound: killed at the bound unless it beats again), BACKOFF (waiting out the breaker
delay), FATAL (bad configuration: waits to be asked), STOPPED (asked to stop).

Restart delays (`nanoclaw.breaker`) by the worker's kind (`breaker.restart_kind`): a
`PLATFORM` worker keeps the seed's schedule and its count across a host crash (each host
start reconnects it to its platform); a `LOCAL` one is back within a second or two, and a
host start is not one of its crashes: its first start in a new host run is not counted,
so it keeps only the count its own crashes left (usually none).

Hung workers (gunicorn's `murder_workers`): each worker touches its heartbeat file
(`nanoclaw.host.runner.Heartbeat`); `beats(name)` reads when it last did. A worker silent for
`hung_after` seconds gets SIGKILL (its process group) and is restarted like any crash,
under the breaker. Silence counts from its start until its first beat (an older beat is
a predecessor's file), and from now after a tick gap in which this supervisor could not
have been watching (a suspended machine, a clock jump).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Callable, Protocol

from nanoclaw.breaker import (LOCAL, PLATFORM, crash_looping, delay_for, next_attempt,
                              restart_kind)
from nanoclaw.db.store import Store
from nanoclaw.host.runner import EXIT_CONFIG, EXIT_OK
from nanoclaw.log import logger
from nanoclaw.util import iso

RUNNING_AFTER = 1.0  # seconds up before STARTING counts as RUNNING
HUNG_AT = 0.5        # of `hung_after`: shown as HUNG from here on, killed at the bound
LOST_TRACK = 0.75    # of `hung_after`: a longer gap between ticks restarts every count
LIVE = ("STARTING", "RUNNING", "HUNG")


def silence(now: float, since: float, beat: float | None) -> float:
    """Seconds a worker has shown no sign of life: since its last beat, or since `since`
    (its start) while it has not beaten after that."""
    return now - (beat if beat is not None and beat > since else since)


def verdict(quiet: float, bound: float) -> str:
    """What `quiet` seconds of silence mean: "ok", "HUNG" (shown) or "kill"."""
    if quiet >= bound:
        return "kill"
    return "HUNG" if quiet >= bound * HUNG_AT else "ok"


class Proc(Protocol):
    pid: int | None

    def poll(self) -> int | None: ...
    def signal(self, sig: int) -> None: ...


@dataclass
class Slot:
    name: str
    kind: str = PLATFORM             # its restart schedule: PLATFORM or LOCAL
    state: str = "BACKOFF"
    proc: Proc | None = None
    attempt: int = 0
    last_start: float | None = None
    next_start: float = 0.0
    restarts: int = 0
    last_exit: str | None = None
    wanted: bool = True
    stop_deadline: float | None = None
    pending_restart: bool = False
    since: float = 0.0               # silence counts from here at most (start, lost track)
    alive_at: float | None = None    # its last sign of life, as of the last tick
    hung: str | None = None          # killed as hung: why, for its last exit
    extra: dict = field(default_factory=dict)


class Supervisor:
    def __init__(self, names: list[str], spawn: Callable[[str], Proc], clock: Callable[[], float],
                 store: Store | None = None, grace: float = 5.0, hung_after: float = 0.0,
                 beats: Callable[[str], float | None] | None = None,
                 kind: Callable[[str], str] = restart_kind):
        self.spawn, self.clock, self.store, self.grace = spawn, clock, store, grace
        self.hung_after = hung_after if beats is not None else 0.0  # 0: not watched
        self.beats = beats
        self.last_tick: float | None = None
        self.slots: dict[str, Slot] = {}
        saved = {w["name"]: w for w in store.workers()} if store else {}
        for name in names:
            s = Slot(name, kind(name))
            if name in saved:  # the breaker's count survives a host crash
                s.attempt = saved[name]["attempt"]
                s.restarts = saved[name]["restarts"]
                started = saved[name]["started_at"]
                s.last_start = _ts(started) if started else None
                if s.kind == LOCAL and saved[name]["state"] != "BACKOFF":
                    # it died with the previous host, not of its own crash: this start
                    # does not count (one waiting out a crash delay keeps its count)
                    s.attempt = max(s.attempt - 1, 0)
            s.next_start = clock()
            self.slots[name] = s
        if store:  # forget workers this host no longer runs
            for name in saved:
                if name not in self.slots:
                    store.forget_worker(name)

    # ---- one tick ---------------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        lost = self.hung_after > 0 and self.last_tick is not None and not (
            0 <= now - self.last_tick <= self.hung_after * LOST_TRACK)
        self.last_tick = now
        for s in self.slots.values():
            if lost:
                s.since = now
            self._reap(s, now)
            if s.proc is None and s.wanted and s.state in ("BACKOFF",) and now >= s.next_start:
                self._start(s, now)
            elif s.state == "STARTING" and s.last_start is not None and now - s.last_start >= RUNNING_AFTER:
                s.state = "RUNNING"
                self._save(s)
            if self._watched(s):
                self._watch(s, now)
            if s.stop_deadline is not None and s.proc is not None and now >= s.stop_deadline:
                logger.warning("worker {} did not stop in time; killing it", s.name)
                s.proc.signal(signal.SIGKILL)
                s.stop_deadline = None

    def next_due(self) -> float | None:
        """When a tick next has something to do on its own (a restart, a STARTING worker
        turning RUNNING, a stop deadline, a heartbeat to judge again); None: only an exit
        or a request can change anything."""
        times = []
        for s in self.slots.values():
            if s.proc is None and s.wanted and s.state == "BACKOFF":
                times.append(s.next_start)
            if s.state == "STARTING" and s.last_start is not None:
                times.append(s.last_start + RUNNING_AFTER)
            if s.stop_deadline is not None and s.proc is not None:
                times.append(s.stop_deadline)
            if self._watched(s):
                last = s.since if s.alive_at is None else s.alive_at
                times.append(last + self.hung_after * (1.0 if s.state == "HUNG" else HUNG_AT))
        return min(times, default=None)

    # ---- hung workers -----------------------------------------------------------------
    def _watched(self, s: Slot) -> bool:
        """Judged by its heartbeat: up, not being stopped, not already killed as hung."""
        return (self.hung_after > 0 and s.proc is not None and s.state in LIVE and s.wanted
                and not s.pending_restart and s.stop_deadline is None and s.hung is None)

    def _watch(self, s: Slot, now: float) -> None:
        assert s.proc is not None and self.beats is not None
        quiet = silence(now, s.since, self.beats(s.name))
        s.alive_at = now - quiet
        v = verdict(quiet, self.hung_after)
        if v == "kill":
            s.hung = f"hung: no heartbeat for {quiet:.0f} s"
            logger.error("worker {} hung: no heartbeat for {:.0f} s; killed", s.name, quiet)
            s.proc.signal(signal.SIGKILL)  # its process group; reaped and restarted as a crash
        elif v == "HUNG" and s.state != "HUNG":
            s.state = "HUNG"
            logger.warning("worker {} looks hung: no heartbeat for {:.0f} s (killed at {:.0f} s)",
                           s.name, quiet, self.hung_after)
            self._save(s)
        elif v == "ok" and s.state == "HUNG":
            s.state = "RUNNING" if now - (s.last_start or now) >= RUNNING_AFTER else "STARTING"
            logger.info("worker {} is beating again", s.name)
            self._save(s)

    def _start(self, s: Slot, now: float) -> None:
        s.attempt = next_attempt(s.attempt, s.last_start, now, s.kind)
        s.last_start = s.since = now
        s.alive_at, s.hung = None, None
        try:
            s.proc = self.spawn(s.name)
        except Exception as e:  # could not even fork: treat as a crash
            logger.error("cannot start worker {}: {}", s.name, e)
            s.proc = None
            self._backoff(s, now, f"spawn failed: {e}")
            return
        s.state = "STARTING"
        logger.info("started worker {} (pid {}, attempt {})", s.name, s.proc.pid, s.attempt)
        self._save(s)

    def _reap(self, s: Slot, now: float) -> None:
        if s.proc is None:
            return
        code = s.proc.poll()
        if code is None:
            return
        s.proc = None
        s.stop_deadline = None
        s.last_exit = _describe(code) if s.hung is None else f"{s.hung}; {_describe(code)}"
        s.hung = None
        if not s.wanted:
            s.state = "STOPPED"
            s.attempt = 0
            logger.info("worker {} stopped ({})", s.name, s.last_exit)
        elif s.pending_restart:
            s.pending_restart = False
            s.attempt = 0
            s.state, s.next_start = "BACKOFF", now
            logger.info("worker {} restarting on request", s.name)
        elif code == EXIT_OK:
            s.attempt = 0  # clean exit resets the breaker
            s.restarts += 1
            s.state, s.next_start = "BACKOFF", now
            logger.info("worker {} exited cleanly; starting it again", s.name)
        elif code == EXIT_CONFIG:
            s.state = "FATAL"
            logger.error("worker {} cannot run with this configuration; not restarting it"
                         " (fix the setting, then: nanoclaw workers restart {})", s.name, s.name)
        else:
            s.restarts += 1
            self._backoff(s, now, s.last_exit)
            return
        self._save(s)

    def _backoff(self, s: Slot, now: float, why: str | None) -> None:
        attempt = next_attempt(s.attempt, s.last_start, now, s.kind)
        delay = delay_for(attempt, s.kind)
        s.state, s.next_start = "BACKOFF", now + delay
        if crash_looping(attempt, s.kind):
            logger.error("worker {} is crash-looping ({}; {} crashes in a row); restart {} in"
                         " {:g}s", s.name, why, attempt - 1, s.restarts, delay)
        else:
            log = logger.warning if delay else logger.info
            log("worker {} died ({}); restart {} in {:g}s", s.name, why, s.restarts, delay)
        self._save(s)

    # ---- requests ---------------------------------------------------------------------
    def request(self, name: str, action: str) -> str | None:
        """Act on `restart|stop|start NAME`; returns an error line for an unknown name."""
        s = self.slots.get(name)
        if s is None:
            return f"unknown worker {name!r}"
        now = self.clock()
        if action == "stop":
            s.wanted = False
            if s.proc is not None:
                self._terminate(s, now)
            else:
                s.state = "STOPPED"
        elif action in ("start", "restart"):
            s.wanted = True
            if s.proc is not None and action == "restart":
                s.pending_restart = True
                self._terminate(s, now)
            elif s.proc is None:
                s.attempt, s.state, s.next_start = 0, "BACKOFF", now
        self._save(s)
        return None

    def _terminate(self, s: Slot, now: float) -> None:
        if s.proc is not None:
            s.proc.signal(signal.SIGTERM)
            s.stop_deadline = now + self.grace

    def stop_all(self) -> None:
        now = self.clock()
        for s in self.slots.values():
            s.wanted = False
            self._terminate(s, now)

    def running(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.proc is not None]

    def kill_all(self) -> None:
        for s in self.running():
            s.proc.signal(signal.SIGKILL)  # type: ignore[union-attr]

    def reset_counts(self) -> None:
        """Clean shutdown: every breaker count back to zero."""
        for s in self.slots.values():
            s.attempt = 0
            s.restarts = 0
            s.state = "STOPPED"
            s.proc = None
            self._save(s)

    def _save(self, s: Slot) -> None:
        if self.store is None:
            return
        self.store.save_worker(
            s.name, state=s.state, pid=s.proc.pid if s.proc else None, restarts=s.restarts,
            attempt=s.attempt, started_at=iso(s.last_start) if s.last_start else None,
            next_start_at=iso(s.next_start) if s.state == "BACKOFF" else None,
            last_exit=s.last_exit)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def _ts(text: str) -> float:
    from nanoclaw.util import parse_iso

    return parse_iso(text)
