"""A broker that crashes mid-call costs the user time, never an error.

The agent tells "the broker does not answer" (connection refused, socket missing, the
connection closed with no answer: it waits for the broker, as long as the breaker may
keep it down, beating its heartbeat) from "the broker answered with an error" (the
upstream's 429/5xx, or the broker's own 502 saying the upstream failed: the model-retry
policy, as before). container/agent_runner/broker.py has the rules."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from conftest import agent_pids, wait_for
from nanoclaw import breaker
from nanoclaw.broker import proxy
from nanoclaw.devtools.fake_model import FakeModel
from nanoclaw.devtools.runner_harness import ROOT, Runner, Session
from nanoclaw.lifecycle import containers

sys.path.insert(0, str(ROOT / "container"))

from agent_runner import broker as runner_broker  # noqa: E402
from agent_runner import config as runner_config  # noqa: E402
from agent_runner.providers import ProviderError, Waiting  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str) -> tuple[int, str | None]:
    host, port = url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", proxy.HEALTH_PATH)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader(proxy.BOOT_HEADER)
    finally:
        conn.close()


def health_down(url: str) -> bool:
    try:
        health(url)
    except OSError:
        return True
    return False


# --- the bound and the markers: one number, one set of names, on both sides ---------------

def test_the_bound_and_the_markers_agree_on_both_sides():
    # the host's bound: the longest step of the broker's schedule, and a start
    down = containers.broker_down_s()
    kind = getattr(__import__("nanoclaw.host.registry").host.registry, "restart_kind", None)
    if kind is not None:
        assert down == max(breaker.delay_for(a, kind("broker")) for a in range(1, 200))
    else:
        assert down == max(breaker.SCHEDULE)
    assert containers.broker_wait_s() == down + containers.BROKER_START_S
    # the runner's bound when the host wrote none: the slowest schedule's longest step
    default = runner_config.DEFAULT_BROKER_WAIT_S
    assert default == max(breaker.SCHEDULE) + containers.BROKER_START_S
    assert runner_broker.DEFAULT_WAIT_S == default >= containers.broker_wait_s()
    assert runner_config.Config("s", "g", "gl", "UTC").broker_wait_s == default
    assert (runner_broker.HEALTH_PATH, runner_broker.BOOT_HEADER, runner_broker.UPSTREAM_HEADER) \
        == (proxy.HEALTH_PATH, proxy.BOOT_HEADER, proxy.UPSTREAM_HEADER)


# --- classification (pure: a scripted probe and clock) ------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += max(s, 0.001)


def settle(watch: runner_broker.Watch, limit: float | None = None, aborted=lambda: False):
    events, gen = [], watch.settle(aborted, limit)
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        return stop.value, events


def scripted(*answers: runner_broker.Probe, clock: Clock | None = None) -> runner_broker.Watch:
    left = list(answers)
    clock = clock or Clock()
    return runner_broker.Watch(60, base_url=lambda: "http://broker",
                               probe=lambda url: left.pop(0) if len(left) > 1 else left[0],
                               clock=clock.now, sleep=clock.sleep)


DOWN = runner_broker.Probe(False, None, "ConnectionRefusedError")


def test_unreachable_broker_is_waited_for_with_beats_then_the_call_repeats():
    clock = Clock()
    watch = scripted(DOWN, DOWN, DOWN, DOWN, DOWN, runner_broker.Probe(True, "b2"), clock=clock)
    watch.boot = "b1"
    verdict, events = settle(watch)
    assert verdict == "back" and watch.boot == "b2"
    assert events and all(isinstance(e, Waiting) and e.what == "broker" for e in events)
    beats = [e.waited_s for e in events]
    assert beats == sorted(beats) and all(b - a <= runner_broker.BEAT_S + 0.06
                                          for a, b in zip(beats, beats[1:]))
    assert clock.t - beats[-1] <= runner_broker.BEAT_S + 0.06  # beating to the end
    # backoff: five failed probes took 0.25 + 0.5 + 1 + 2 + 2 s, not five tight retries
    assert 5.5 <= clock.t <= 6.5


def test_an_answering_broker_is_not_waited_for():
    restarted = scripted(runner_broker.Probe(True, "b2"))
    restarted.boot = "b1"
    assert settle(restarted) == ("restarted", [])  # a new process: repeat, uncounted
    same = scripted(runner_broker.Probe(True, "b1"))
    same.boot = "b1"
    assert settle(same) == ("up", [])  # the same broker: the model-retry policy decides
    unknown = scripted(runner_broker.Probe(True, None))  # e.g. the fake model, no header
    assert settle(unknown) == ("up", [])


def test_the_wait_is_bounded_and_abortable():
    clock = Clock()
    verdict, events = settle(scripted(DOWN, clock=clock), limit=5)
    assert verdict == "down" and 5 <= clock.t <= 5.2 and len(events) >= 5
    with pytest.raises(ProviderError, match="aborted"):
        settle(scripted(DOWN), aborted=lambda: True)


def test_the_real_probe_tells_no_answer_from_an_answer(tmp_path):
    assert not runner_broker.probe(f"http://127.0.0.1:{free_port()}").up  # refused
    fake = FakeModel(port=0).start()
    try:  # any HTTP answer (here a 404) means something answers
        assert runner_broker.probe(fake.url) == runner_broker.Probe(True, None)
    finally:
        fake.stop()
    # a listener that closes without answering (the sandbox relay when the broker's
    # socket is gone) is "no answer" too
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(1)

    def close_one():
        conn, _ = lsn.accept()
        conn.close()
    threading.Thread(target=close_one, daemon=True).start()
    try:
        assert not runner_broker.probe(f"http://127.0.0.1:{lsn.getsockname()[1]}").up
    finally:
        lsn.close()


def test_the_broker_marks_its_answers_and_its_own_upstream_failure(tmp_path):
    from test_broker import TOKEN, Running, post

    dead = types.SimpleNamespace(url=f"http://127.0.0.1:{free_port()}")
    b = Running(tmp_path, dead)
    try:
        status, boot = health(b.url)  # no token needed, nothing forwarded
        assert status == 200 and boot
        assert runner_broker.probe(b.url) == runner_broker.Probe(True, boot)
        resp = post(b, {"model": "m", "messages": []}, TOKEN)
        resp.read()
        assert resp.status == 502 and resp.getheader(proxy.UPSTREAM_HEADER) == "unreachable"
        assert resp.getheader(proxy.BOOT_HEADER) == boot
        refused = post(b, {"model": "m", "messages": []}, "wrong-token")
        refused.read()
        assert refused.status == 401 and refused.getheader(proxy.BOOT_HEADER) == boot
    finally:
        b.close()


def test_the_brokers_upstream_502_follows_the_model_policy():
    import httpx2

    from agent_runner.providers import anthropic as provider

    def error(status: int, **headers: str):
        request = httpx2.Request("POST", "http://broker/v1/messages")
        response = httpx2.Response(status, headers=headers, request=request,
                                   json={"type": "error", "error": {"message": "x"}})
        return provider.anthropic.APIStatusError("x", response=response, body=None)

    upstream = provider.classify(error(502, **{proxy.UPSTREAM_HEADER: "unreachable"}))
    assert upstream.retryable and upstream.classification == "upstream"
    assert "cannot reach the model API" in str(upstream) and "doctor" in str(upstream)
    busy = provider.classify(error(529))
    assert busy.retryable and busy.classification == "overloaded"


# --- the runner end to end, its "broker" on a port that answers late -----------------------

@pytest.mark.parametrize("provider", ["anthropic", "claude"])
def test_runner_waits_for_a_late_broker_beating_and_answers(tmp_path, provider):
    if provider == "claude":
        pytest.importorskip("claude_agent_sdk")
    port = free_port()
    session = Session(tmp_path, provider=provider)
    # one retry each: the old policy gave up within ~2 s (anthropic) or ~4 s (the CLI)
    runner = Runner(session, f"http://127.0.0.1:{port}",
                    {"NANOCLAW_MODEL_RETRIES": "1", "CLAUDE_CODE_MAX_RETRIES": "1"})
    fake = None
    try:
        mid = session.chat("through the outage")
        wait_for(lambda: "broker unreachable" in runner.text(), 30, what="the runner waiting")
        time.sleep(3)
        beat = Path(session.paths.work) / ".heartbeat"
        assert time.time() - beat.stat().st_mtime < 1.6  # beating while it waits
        assert session.out() == []  # nothing said yet: no error
        fake = FakeModel(port=port).start()
        reply = session.reply_to(mid, 30)
        session.completed(mid, 10)
        assert reply["text"] == "echo: through the outage"
        assert [r["text"] for r in session.out()] == ["echo: through the outage"]
    finally:
        assert runner.stop() == 0, runner.text()
        if fake is not None:
            fake.stop()


def test_runner_gives_up_after_the_bound_with_a_clear_error(tmp_path):
    session = Session(tmp_path, broker_wait_s=2)
    runner = Runner(session, f"http://127.0.0.1:{free_port()}", {"NANOCLAW_MODEL_RETRIES": "1"})
    try:
        mid = session.chat("anyone?")
        text = session.reply_to(mid, 20)["text"]
        assert text.startswith("Error: could not reach the host's model broker for 2 s")
    finally:
        assert runner.stop() == 0, runner.text()


def test_errors_from_an_answering_broker_keep_the_retry_policy(tmp_path, fake):
    session = Session(tmp_path)
    runner = Runner(session, fake.url, {"NANOCLAW_MODEL_RETRIES": "1"})
    try:
        fake.inject(status=503, count=2, retry_after=0.01)
        busy = session.chat("busy")
        session.completed(busy)
        texts = [r["text"] for r in session.out() if r["in_reply_to"] == busy]
        assert texts[0].startswith("The model is busy (HTTP 503, server error); retrying")
        assert "gave up after 2 attempts" in texts[1]
        # a dropped connection while the server answers probes: not a broker outage
        fake.inject(drop=True, count=2)
        dropped = session.chat("dropped")
        session.completed(dropped)
        texts = [r["text"] for r in session.out() if r["in_reply_to"] == dropped]
        assert texts == ["Error: could not reach the model (connection failed)"
                         " (gave up after 2 attempts)"]
        assert "waiting for it" not in runner.text()
        ok = session.chat("fine")
        assert session.reply_to(ok)["text"] == "echo: fine"
    finally:
        assert runner.stop() == 0, runner.text()


# --- the real host: kill -9 the broker twice while the call is in flight ---------------------

def test_broker_killed_twice_mid_call_the_user_gets_the_real_answer(host_factory, fake_model):
    # a short claim tolerance: the sweep would kill an agent that stopped beating
    h = host_factory(NANOCLAW_CLAIM_TOLERANCE="4").start()
    c = h.client()
    c.wait_reply(c.send("warm up"), 60)
    agents = agent_pids(h.data, spares=False)
    url = h.q("SELECT value FROM host_state WHERE key='broker_url'")[0]["value"]
    first_boot = health(url)[1]
    sess = h.q("SELECT * FROM sessions")[0]
    config = h.data / "sessions" / sess["agent_group_id"] / sess["id"] / "db" / "container.json"
    assert f'"broker_wait_s": {containers.broker_wait_s()}' in config.read_text()

    fake_model.inject(delay_ms=2500, count=2)  # the call and its repeat stay in flight
    n = len(fake_model.requests)
    mid = c.send("through the outage")
    wait_for(lambda: len(fake_model.requests) > n, 20, what="the call in flight")
    first = h.worker_pid("broker")
    os.kill(first, signal.SIGKILL)  # breaker attempt 2: back at once
    second = wait_for(lambda: (p := h.worker_pid("broker")) not in (None, first) and p, 15,
                      what="the broker restarted")
    wait_for(lambda: len(fake_model.requests) > n + 1, 20,
             what="the call repeated through the restarted broker")
    os.kill(second, signal.SIGKILL)  # attempt 3: the breaker's delay for it applies
    killed = time.monotonic()
    # and keep it down past the old retry budget (~7 s) whatever the broker's schedule
    # (10 s at attempt 3 on the seed's, 1 s on the local one): stopped, started at 10 s
    assert h.cli("workers", "stop", "broker").returncode == 0
    wait_for(lambda: next(w for w in h.workers() if w["name"] == "broker")["state"]
             == "STOPPED", 15, what="the broker stopped")
    assert health_down(url)
    time.sleep(max(0.0, 10 - (time.monotonic() - killed)))
    assert not c.replies_to(mid)  # nothing said while it waits: no error
    assert agent_pids(h.data, spares=False) == agents  # beating: the sweep left it alone
    assert h.cli("workers", "start", "broker").returncode == 0
    reply = c.wait_reply(mid, 30)
    took = time.monotonic() - killed
    assert reply["text"] == "echo: through the outage"
    assert took >= 10, took
    time.sleep(1)
    assert [f["text"] for f in c.replies_to(mid)] == ["echo: through the outage"]
    assert not [f for f in c.snapshot() if "Error" in str(f.get("text") or "")]
    assert agent_pids(h.data, spares=False) == agents  # the same agent waited: not killed
    assert health(url)[1] not in (None, first_boot)
    assert next(w for w in h.workers() if w["name"] == "broker")["restarts"] >= 2
