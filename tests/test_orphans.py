"""A host crash never leaves a session with two agents (issue 20, item 5).

`kill -9` of the orchestrator, every runtime, a real host with a warm spare and an agent
busy on a session. The workers die with the orchestrator (PR_SET_PDEATHSIG); a bwrap
sandbox dies with its worker (--die-with-parent); a process agent and a docker container
live on. The next host re-attaches to an agent the sessions table names and that still
runs, and stops every other agent of the install (spares, an agent started but not yet
recorded) and waits for it to be gone before it starts any. Throughout, a thread samples
/proc: at no moment do two agents work in the session's group folder (every runtime's
agent works there: the process runtime's in the folder itself, bwrap's and docker's with
it bound at /workspace/agent; a spare waits in `/`), and each message is answered once.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, Host, agent_pids, containers_of, wait_for

from nanoclaw.runtime.bwrap import _ppid as ppid
from nanoclaw.runtime.process import _starttime


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _dead(pid: int) -> bool:
    return _state(pid) in (None, "Z", "X")


class Watch(threading.Thread):
    """Samples, every few ms, the agents working in one group folder: the top process of
    each tree of processes whose working directory is that folder. A sample with two is
    checked again at once (a scan is not atomic: one may have died meanwhile), so what
    stays two was two at one moment."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder = _stat(str(folder))
        assert self.folder is not None
        self.samples: list[tuple[float, frozenset[int]]] = []
        self.halt = threading.Event()

    def here(self, pid: int) -> bool:
        return _stat(f"/proc/{pid}/cwd") == self.folder and not _dead(pid)

    def agents(self) -> frozenset[int]:
        inside = {int(e) for e in os.listdir("/proc") if e.isdigit() and self.here(int(e))}
        roots = {p for p in inside if ppid(p) not in inside}
        if len(roots) > 1:
            roots = {p for p in roots if self.here(p)}
        return frozenset(roots)

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append((time.monotonic(), self.agents()))
            time.sleep(0.005)

    def stop(self) -> list[tuple[float, frozenset[int]]]:
        self.halt.set()
        self.join(10)
        return self.samples

    def doubles(self) -> list[tuple[float, frozenset[int]]]:
        return [s for s in self.samples if len(s[1]) > 1]


class Rig:
    """One runtime's host, and how the test sees its agents from outside."""

    def __init__(self, name: str, factory, client=None):
        self.name, self.factory, self.client = name, factory, client
        self.hosts: list[Host] = []

    def host(self, **env: str) -> Host:
        h = self.factory(f"{self.name}{len(self.hosts)}", NANOCLAW_RUNTIME=self.name,
                         NANOCLAW_RETRY_BASE="0.05", **env)
        self.hosts.append(h)
        return h

    def install(self, h: Host) -> str:
        return hashlib.sha1(str(h.data.resolve()).encode()).hexdigest()[:8]

    def agents(self, h: Host) -> set[str]:
        """Every agent of the install, spares included, as the runtime names them."""
        if self.client is not None:
            return {c["Id"] for c in self.client.api.containers(
                filters={"label": f"nanoclaw.install={self.install(h)}"})}
        from nanoclaw.runtime.warm import agent_roots

        pids = set(agent_pids(h.data))  # the top of each marked tree (a spare, the zygote)
        tops = {p for p in pids if ppid(p) not in pids} | set(agent_roots(pids))  # + its agents
        return {f"pid:{p}:{_starttime(p)}" for p in tops}

    def cleanup(self) -> None:
        for h in self.hosts:
            h.cleanup()
            if self.client is not None:
                for c in containers_of(self.client, h.data, all=True):
                    c.remove(force=True)


@pytest.fixture(params=["process", "bwrap", "docker"])
def rig(request, host_factory):
    client = None
    if request.param == "docker":
        client = request.getfixturevalue("docker_client")
        request.getfixturevalue("agent_image")
    elif request.param == "bwrap":
        request.getfixturevalue("bwrap_works")
    r = Rig(request.param, host_factory, client)
    yield r
    r.cleanup()


def busy_host(rig: Rig, fake_model):
    """A host whose one session's agent is in the middle of a slow model call, with a
    spare waiting (process and bwrap; docker when the host may mount)."""
    h = rig.host().start()
    c = h.client()
    assert c.wait_reply(c.send("warm up"), 60)["text"] == "echo: warm up"
    if docker_spares(rig) or rig.name != "docker":
        wait_for(lambda: len(rig.agents(h)) >= 2, 20, what="the busy agent and a spare")
    fake_model.inject(delay_ms=4000, count=1)
    n = len(fake_model.requests)
    mid = c.send("slow one")
    wait_for(lambda: len(fake_model.requests) > n, 20, what="the model call in flight")
    session = h.q("SELECT * FROM sessions")[0]
    folder = h.base / "groups" / h.q("SELECT folder FROM agent_groups WHERE id=?",
                                     (session["agent_group_id"],))[0]["folder"]
    return h, c, mid, session, folder


def docker_spares(rig: Rig) -> bool:
    """Whether this docker host keeps a spare container (the warm pool needs root)."""
    from nanoclaw.runtime import mountns

    return rig.name == "docker" and mountns.can_mount()


def crash(h: Host) -> None:
    """`kill -9` of the orchestrator alone; its workers must die with it."""
    workers = [w["pid"] for w in h.workers()]
    assert len(workers) >= 5
    h.kill9()
    wait_for(lambda: all(_dead(p) for p in workers), 5, what="the workers dying with the host")


def answered_once(c, mid: str, text: str) -> None:
    assert c.wait_reply(mid, 60)["text"] == text  # a restart and a retry, on a busy machine
    time.sleep(0.3)  # a second agent's reply would follow the first
    assert len({f["id"] for f in c.replies_to(mid)}) == 1, c.replies_to(mid)


def test_host_crash_re_attaches_or_restarts_never_doubles(rig, fake_model):
    h, c, mid, session, folder = busy_host(rig, fake_model)
    watch = Watch(folder)
    (busy,) = watch.agents()
    before = rig.agents(h)
    watch.start()
    crash(h)
    if rig.name == "bwrap":  # --die-with-parent: sandboxes and spares go with the worker
        wait_for(lambda: not rig.agents(h), 5, what="sandboxes gone with their worker")
    else:  # a process agent and a container outlive their host
        assert session["container_id"] in rig.agents(h)
        assert watch.agents() == {busy}
    h.start()
    answered_once(c, mid, "echo: slow one")
    answered_once(c, c.send("next"), "echo: next")
    watch.stop()
    assert not watch.doubles(), watch.doubles()[:3]
    cid = h.q("SELECT container_id FROM sessions WHERE id=?", (session["id"],))[0]["container_id"]
    # of the old host's agents only the one its session names may be left: re-attached
    assert before & rig.agents(h) <= {cid}
    if rig.name == "bwrap":
        assert cid != session["container_id"]
    else:
        assert cid == session["container_id"]


def test_agent_the_crashed_host_did_not_record_goes_before_the_next_starts(rig, fake_model):
    """The host died between starting an agent and writing its id (`wake` records
    `running` with no id first), with a message routed but not yet claimed: the next host
    cannot re-attach to that agent, so it must stop it, and see it gone, before it starts
    one for the waiting message."""
    h, c, mid, session, folder = busy_host(rig, fake_model)
    watch = Watch(folder)
    crash(h)
    planted = None
    if rig.name == "bwrap":  # the real sandbox dies with its worker: leave one behind
        wait_for(lambda: not rig.agents(h), 5, what="sandboxes gone with their worker")
        planted = plant_sandbox(h, session, folder)
        wait_for(lambda: len(watch.agents()) == 1, 10, what="the left sandbox in its folder")
    (orphan,) = watch.agents()
    if rig.name != "bwrap":  # busy elsewhere, the old agent does not claim what comes
        freeze(orphan, inside=rig.name == "docker")
    conn = h.db()
    conn.execute("UPDATE sessions SET container_id=NULL WHERE id=?", (session["id"],))
    conn.commit()
    conn.close()
    queued = route_unclaimed(h, session, mid, "queued")
    watch.start()
    try:
        h.start()
        # one turn takes both (the retried claim and the new row): one reply, to the last
        answered_once(c, queued, "echo: queued")
        assert len(c.replies_to(mid)) <= 1
        samples = watch.stop()
    finally:
        if planted is not None:
            planted[0].stop(planted[1], grace=0.1)
    assert not watch.doubles(), watch.doubles()[:3]
    last_orphan = max(t for t, agents in samples if orphan in agents)
    first_new = min(t for t, agents in samples if agents - {orphan})
    assert last_orphan < first_new
    assert _dead(orphan)
    cid = h.q("SELECT container_id FROM sessions WHERE id=?", (session["id"],))[0]["container_id"]
    assert rig.agents(h) & {session["container_id"]} == set()
    assert cid and cid != session["container_id"]
    # and in the new host's own words: the orphan stopped, then the session's agent started
    log = (h.base / "logs" / "nanoclaw.log").read_text().split("| host started (pid")[-1]
    # a docker spare outlives its host too, and goes the same way
    orphans = 2 if docker_spares(rig) else 1
    assert f"stopped {orphans} orphaned agent(s) of this install" in log
    assert log.index("orphaned agent(s)") < log.index(": agent started (")


def _settings(h: Host):
    from nanoclaw.config import Settings

    return Settings(data_dir=h.data, logs_dir=h.base / "logs", groups_dir=h.base / "groups")


def freeze(root: int, inside: bool) -> None:
    """SIGSTOP an agent's processes (`inside`: below a container's init, which must still
    take the engine's stop); still alive, they stay in its folder."""
    from nanoclaw.runtime.procfs import children

    for p in children(root) + ([] if inside else [root]):
        os.kill(p, signal.SIGSTOP)


def route_unclaimed(h: Host, session: dict, like: str, text: str) -> str:
    """A chat message stored for the session as the router stores it, that no agent
    has claimed: due at once when the next host starts."""
    from nanoclaw.db import session as sessiondb

    inbound = sessiondb.SessionInbound(sessiondb.of(_settings(h), session))
    first = inbound.message(f"{like}:{session['agent_group_id']}")
    content = {**json.loads(first["content"]), "text": text}
    mid = f"t{time.time_ns()}"
    assert inbound.insert(id=f"{mid}:{session['agent_group_id']}", kind="chat", content=content,
                          platform_id=first["platform_id"], channel_type=first["channel_type"],
                          thread_id=first["thread_id"])
    return mid


def plant_sandbox(h: Host, session: dict, folder: Path):
    """A sandbox of this install working in the session's group folder that no session
    names, as a bwrap killed in its first milliseconds leaves (its parent is this test,
    so --die-with-parent keeps it)."""
    from nanoclaw.runtime.base import SpawnSpec
    from nanoclaw.runtime.bwrap import BwrapRuntime

    settings = _settings(h)
    rt = BwrapRuntime(settings)
    spec = SpawnSpec(session_id=session["id"], agent_group_id=session["agent_group_id"],
                     session_dir=settings.session_dir(session["agent_group_id"],
                                                      session["id"]).resolve(),
                     group_dir=folder.resolve(),
                     global_dir=(h.base / "groups" / "global").resolve(),
                     runner_dir=ROOT / "container", log_path=h.base / "logs" / "planted.log",
                     install_id=hashlib.sha1(str(h.data.resolve()).encode()).hexdigest()[:8],
                     command=["sleep", "60"])
    return rt, rt.spawn(spec)
