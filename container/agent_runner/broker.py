"""Reaching the host's broker: "the broker is down" told apart from "the model failed".

Every model call goes through the host's `broker` worker (`ANTHROPIC_BASE_URL`). When
that worker crashes, the host's supervisor restarts it after its breaker delay
(`nanoclaw/breaker.py`, `SCHEDULE`: 0, 0, 10, 30, 120 … up to 900 s), so a call that
finds it gone must wait for it, not count the outage against the model's retries and
show the user an error.

How the two are told apart:

- an HTTP response (any status) came back: the broker is up. Its status follows the
  provider's model-retry policy. The broker marks every answer with `BOOT_HEADER` (a
  random id per broker process) and its own 502, sent when it could not reach the
  upstream, with `UPSTREAM_HEADER`;
- no HTTP response (connection refused, the socket file missing, the connection reset
  or closed before or while answering; inside a sandbox the relay of `sandbox_entry`
  closes the connection when the broker's socket does not answer): the runner asks the
  broker's health endpoint (`HEALTH_PATH`, no token, never forwarded). No answer: the
  broker is down, and `Watch.settle` waits for it, with backoff, up to `limit_s`,
  yielding `Waiting` events (the poll loop touches `.heartbeat` on each, so the sweep
  does not take the waiting agent for a stuck one). An answer with a new boot id: the
  broker was restarted under the call. Either way the call is repeated without counting
  an attempt. An answer from the same broker: the failure was the connection to the
  model's side, and the model-retry policy applies.

The bound: `broker_wait_s` in `container.json`, written by the host from the breaker's
schedule (`nanoclaw/lifecycle/containers.py`, `broker_wait_s()`); `DEFAULT_WAIT_S` when
absent (tests/test_broker_outage.py checks the two agree).
"""

from __future__ import annotations

import http.client
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Generator

from agent_runner.config import DEFAULT_BROKER_WAIT_S as DEFAULT_WAIT_S
from agent_runner.providers import ProviderError, Waiting

log = logging.getLogger("agent_runner")

HEALTH_PATH = "/_nanoclaw/health"
BOOT_HEADER = "x-nanoclaw-broker"
UPSTREAM_HEADER = "x-nanoclaw-upstream-error"
PROBE_TIMEOUT_S = 3.0
FIRST_DELAY_S = 0.25
MAX_DELAY_S = 2.0
BEAT_S = 1.0  # a `Waiting` event (and so a heartbeat) at least this often
MAX_FREE_RETRIES = 20  # calls repeated for a broker outage, per call (a crash loop's bound)


@dataclass(frozen=True)
class Probe:
    up: bool
    boot: str | None = None
    why: str = ""


def probe(base_url: str, timeout: float = PROBE_TIMEOUT_S) -> Probe:
    """One GET of the broker's health endpoint. Any HTTP answer (even a 404 from a
    server that is not a NanoClaw broker) means something is listening and answering."""
    url = urllib.parse.urlsplit(base_url)
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = cls(url.hostname or "127.0.0.1", url.port, timeout=timeout)
    try:
        conn.request("GET", url.path.rstrip("/") + HEALTH_PATH)
        resp = conn.getresponse()
        resp.read()
        return Probe(True, resp.getheader(BOOT_HEADER))
    except (OSError, http.client.HTTPException) as exc:
        return Probe(False, None, f"{type(exc).__name__}: {exc}".strip(": "))
    finally:
        conn.close()


def boot_of(headers: object) -> str | None:
    """The broker's boot id from a response's headers (None when absent)."""
    get = getattr(headers, "get", None)
    value = get(BOOT_HEADER) if get is not None else None
    return str(value) if value else None


class Watch:
    """What the runner knows about its broker: the last boot id seen, and the bound."""

    def __init__(self, limit_s: float = DEFAULT_WAIT_S,
                 base_url: Callable[[], str] | None = None,
                 probe: Callable[[str], Probe] = probe,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        self.limit_s = limit_s
        self.boot: str | None = None
        self._learned = False
        self._base_url = base_url or (lambda: os.environ.get("ANTHROPIC_BASE_URL", ""))
        self._probe, self._clock, self._sleep = probe, clock, sleep

    def note(self, headers: object) -> None:
        """Remember the boot id of a response that came back."""
        boot = boot_of(headers)
        if boot:
            self.boot = boot

    def learn(self) -> None:
        """Learn the boot id before a call (once): a later restart is then recognised."""
        if self.boot is None and not self._learned and self._base_url():
            found = self._probe(self._base_url())
            self._learned = found.up
            self.note({BOOT_HEADER: found.boot})

    def settle(self, aborted: Callable[[], bool], limit_s: float | None = None
               ) -> Generator[Waiting, None, str]:
        """After a call got no HTTP response: find out why, waiting while the broker is
        down. Returns `back` (it was down and answers again), `restarted` (it answers,
        as a new process), `up` (the same broker answers: not its outage), or `down`
        (still no answer after `limit_s`). Raises ProviderError("aborted") on abort."""
        limit = self.limit_s if limit_s is None else limit_s
        url = self._base_url()
        if not url:
            return "up"
        first = self._probe(url)
        if first.up:
            restarted = bool(first.boot and self.boot and first.boot != self.boot)
            self.boot = first.boot or self.boot
            if restarted:
                log.warning("the broker was restarted during the call; repeating it")
            return "restarted" if restarted else "up"
        log.warning("broker unreachable (%s); waiting for it up to %.0f s", first.why, limit)
        start = self._clock()
        delay = FIRST_DELAY_S
        last_beat = 0.0
        yield Waiting("broker", 0.0, limit)
        while True:
            waited = self._clock() - start
            if aborted():
                raise ProviderError("aborted")
            if waited >= limit:
                log.error("broker still unreachable after %.0f s; giving up", waited)
                return "down"
            until = min(start + limit, self._clock() + delay)
            while self._clock() < until:  # sleep in slices: abort and heartbeat go on
                if aborted():
                    raise ProviderError("aborted")
                now = self._clock()
                if now - start - last_beat >= BEAT_S:
                    last_beat = now - start
                    yield Waiting("broker", last_beat, limit)
                self._sleep(min(0.05, max(until - now, 0.0)))
            delay = min(delay * 2, MAX_DELAY_S)
            again = self._probe(url)
            if again.up:
                self.boot = again.boot or self.boot
                log.warning("broker answers again after %.1f s; repeating the call",
                            self._clock() - start)
                return "back"


def unreachable_error(waited_s: float) -> ProviderError:
    return ProviderError(
        f"could not reach the host's model broker for {waited_s:.0f} s (it is down or"
        " restarting; the host's owner can check `nanoclaw workers`)", False, "broker")
