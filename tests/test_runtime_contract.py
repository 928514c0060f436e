"""One contract, every runtime (process, bwrap, docker): a real host answers through the
broker and the fake model (both providers); an agent killed mid-turn, or stuck on a
claim, is retried and answered once; an idle one is stopped at the ceiling; five deaths
tell the user; two wake requests start one agent; the agent's output outlives
it; a restarted containers worker re-attaches (or, for bwrap, retries)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import Host, agent_pids, containers_of, wait_for

from nanoclaw.runtime.bwrap import _ppid


class Runtime:
    """How a test sees one runtime's agents from outside."""

    def __init__(self, name: str, factory, client=None):
        self.name, self.factory, self.client = name, factory, client
        self.hosts: list[Host] = []

    def host(self, **env: str) -> Host:
        h = self.factory(f"{self.name}{len(self.hosts)}", NANOCLAW_RUNTIME=self.name, **env)
        self.hosts.append(h)
        return h

    def agents(self, h: Host) -> list[str]:
        if self.client is not None:
            return sorted(c.id for c in containers_of(self.client, h.data, spares=False))
        pids = set(agent_pids(h.data, spares=False))  # a bwrap's pid-1 child has the mark too
        return sorted(str(p) for p in pids if _ppid(p) not in pids)

    def kill(self, h: Host) -> None:
        if self.client is not None:
            for c in containers_of(self.client, h.data, spares=False):
                c.kill()
            return
        for pid in agent_pids(h.data, spares=False):
            os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        for h in self.hosts:
            h.cleanup()
            if self.client is not None:
                for c in containers_of(self.client, h.data, all=True):
                    c.remove(force=True)


@pytest.fixture(params=["process", "bwrap", "docker"])
def rt(request, host_factory):
    client = None
    if request.param == "docker":
        client = request.getfixturevalue("docker_client")
        request.getfixturevalue("agent_image")
    elif request.param == "bwrap":
        request.getfixturevalue("bwrap_works")
    r = Runtime(request.param, host_factory, client)
    yield r
    r.cleanup()


def test_answers_through_the_broker(rt, fake_model):
    h = rt.host().start()
    r = h.cli("send", "hello sandbox", "--wait", "60")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "echo: hello sandbox"
    assert len(rt.agents(h)) == 1
    keys = {req["headers"].get("x-api-key") or req["headers"].get("authorization")
            for req in fake_model.requests}
    assert keys == {"sk-ant-test-secret-do-not-leak"}  # the broker swapped the token
    system = json.dumps([r["body"].get("system") for r in fake_model.requests
                         if r["path"] == "/v1/messages"])
    assert "people reach through chat apps" in system  # the base prompt, container/CLAUDE.md
    assert "scheduling" in system  # a skill, with the path of its SKILL.md in the sandbox
    assert rt.name == "process" or "/app/skills/scheduling/SKILL.md" in system
    usage = h.q("SELECT * FROM token_usage")
    assert len(usage) == 1 and usage[0]["requests"] >= 1 and usage[0]["output_tokens"] > 0


def test_default_claude_provider_answers(rt, fake_model):
    """claude-agent-sdk and its bundled CLI, inside the sandbox, through the broker."""
    h = rt.host(NANOCLAW_PROVIDER="claude").start()
    r = h.cli("send", "hello claude", "--wait", "60")
    assert r.stdout.strip() == "echo: hello claude", r.stderr
    assert fake_model.requests and all(
        (req["headers"].get("x-api-key") or "") == "sk-ant-test-secret-do-not-leak"
        for req in fake_model.requests)


def test_killed_mid_turn_is_retried_and_answered_once(rt, fake_model):
    h = rt.host(NANOCLAW_RETRY_BASE="0.05").start()
    c = h.client()
    c.wait_reply(c.send("warm up"), 60)
    fake_model.inject(delay_ms=20000, count=1)
    n = len(fake_model.requests)
    mid = c.send("slow one")
    wait_for(lambda: len(fake_model.requests) > n, 30, what="model request in flight")
    rt.kill(h)
    reply = c.wait_reply(mid, 60)
    assert reply["text"] == "echo: slow one"
    assert len({f["id"] for f in c.replies_to(mid)}) == 1


def test_five_deaths_tell_the_user(rt, fake_model):
    h = rt.host(NANOCLAW_RETRY_BASE="0.02").start()
    c = h.client()
    c.wait_reply(c.send("warm up"), 60)
    fake_model.inject(delay_ms=30000, count=5)
    n = len(fake_model.requests)
    mid = c.send("doomed")
    for i in range(5):
        wait_for(lambda n=n: len(fake_model.requests) > n, 60, what=f"attempt {i + 1} in flight")
        n = len(fake_model.requests)
        rt.kill(h)
    reply = c.wait_reply(mid, 90)
    assert "could not be processed" in reply["text"] and "5 times" in reply["text"]
    assert len({f["id"] for f in c.replies_to(mid)}) == 1


def test_stuck_claim_is_killed_by_the_sweep_and_retried(rt, fake_model):
    h = rt.host(NANOCLAW_CLAIM_TOLERANCE="1", NANOCLAW_RETRY_BASE="0.05").start()
    c = h.client()
    c.wait_reply(c.send("warm up"), 60)
    fake_model.inject(delay_ms=30000, count=1)  # the model never answers this claim
    n = len(fake_model.requests)
    mid = c.send("stuck one")  # the agent beats once when it claims, then hangs
    wait_for(lambda: len(fake_model.requests) > n, 30, what="model request in flight")
    assert c.wait_reply(mid, 60)["text"] == "echo: stuck one"
    assert "stuck on a claim" in (h.base / "logs" / "nanoclaw.error.log").read_text()
    assert len({f["id"] for f in c.replies_to(mid)}) == 1


def test_idle_agent_is_stopped_at_the_ceiling_and_woken_again(rt):
    h = rt.host(NANOCLAW_IDLE_CEILING="1").start()
    c = h.client()
    c.wait_reply(c.send("one"), 60)
    first = rt.agents(h)
    wait_for(lambda: not rt.agents(h), 30, what="idle agent stopped")
    wait_for(lambda: h.q("SELECT container_status FROM sessions")[0]["container_status"]
             == "stopped", 10, what="session marked stopped")
    assert c.wait_reply(c.send("two"), 60)["text"] == "echo: two"
    assert rt.agents(h) and rt.agents(h) != first


def test_two_wake_requests_start_one_agent(rt):
    h = rt.host().start()
    c = h.client()
    c.wait_reply(c.send("first"), 60)
    sid = h.q("SELECT id FROM sessions")[0]["id"]
    assert h.cli("workers", "stop", "containers").returncode == 0
    wait_for(lambda: not rt.agents(h), 30, what="agents stopped")
    mid = c.send("second")  # stored by the router with its wake request; nobody serves it
    wait_for(lambda: h.q("SELECT 1 FROM container_requests WHERE handled_at IS NULL"), 10,
             what="the router's wake request")
    conn = h.db()  # and the sweep's, for the same session, at the same moment
    conn.execute("INSERT INTO container_requests (session_id, action, reason, created_at)"
                 " VALUES (?, 'wake', 'due rows', '2026-01-01T00:00:00.000Z')", (sid,))
    conn.commit()
    conn.close()
    assert h.cli("workers", "start", "containers").returncode == 0
    assert c.wait_reply(mid, 60)["text"] == "echo: second"
    assert len(rt.agents(h)) == 1
    assert len({f["id"] for f in c.replies_to(mid)}) == 1


def test_agent_output_outlives_the_agent(rt):
    h = rt.host().start()
    assert h.cli("send", "log me", "--wait", "60").returncode == 0
    sid = h.q("SELECT id FROM sessions")[0]["id"]
    assert h.stop() == 0
    logs = list((h.base / "logs" / "containers" / sid).glob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "batch completed" in text and "exit on signal" in text
    assert rt.agents(h) == [] and agent_pids(h.data) == []  # the warm spare too
    if rt.client is not None:
        assert containers_of(rt.client, h.data, all=True) == []  # removed, output kept


def test_containers_worker_restart(rt):
    """docker and process re-attach to the running agent; a bwrap agent dies with the
    worker (--die-with-parent) and the next message simply starts a new one."""
    h = rt.host().start()
    c = h.client()
    c.wait_reply(c.send("one"), 60)
    before = rt.agents(h)
    old = h.worker_pid("containers")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: h.worker_pid("containers") not in (None, old), 30, what="restart")
    mid = c.send("two")
    assert c.wait_reply(mid, 60)["text"] == "echo: two"
    after = rt.agents(h)
    assert len(after) == 1
    if rt.name == "bwrap":
        assert after != before
    else:
        assert after == before
