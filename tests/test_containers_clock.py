"""The containers worker on a fake clock with a scripted runtime (no process is
started, nothing waits in real time): an agent that cannot start is retried at
retry_base·2^(n-1) after each failure, never before, and after MAX_TRIES failures its
pending messages fail and the user is told in their chat."""

from __future__ import annotations

import pytest

from dbread import db_row
from fakes.clock import FakeClock
from nanoclaw import config
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.lifecycle import containers
from nanoclaw.lifecycle.containers import Containers
from nanoclaw.routing.router import Event, Router
from nanoclaw.util import local_user_id


class Runtime:
    """Stands in for a sandbox runtime: spawns fail while `fail` is set, or start an
    agent that runs until `exit` is given."""

    def __init__(self, clock: FakeClock, fail: bool = True) -> None:
        self.clock, self.fail = clock, fail
        self.spawns: list[float] = []
        self.codes: dict[str, int | None] = {}

    def spawn(self, spec) -> str:
        self.spawns.append(self.clock())
        if self.fail:
            raise OSError("no such image")
        cid = f"fake:{len(self.spawns)}"
        self.codes[cid] = None
        return cid

    def exit_code(self, cid: str) -> int | None:
        return self.codes.get(cid, 0)

    def stop(self, cid: str, grace: float = 1.0) -> None:
        self.codes[cid] = 137

    def cleanup_orphans(self, install_id: str, keep: set[str]) -> int:
        return 0

    def prewarm(self, spec) -> None: ...

    def maintain(self) -> bool:
        return False

    def close(self) -> None: ...


@pytest.fixture
def env(tmp_path, monkeypatch):
    for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data", "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                 "NANOCLAW_GROUPS_DIR": tmp_path / "groups"}.items():
        monkeypatch.setenv(k, str(v))
    s = config.load()
    store = Store.open(s.data_dir)
    ensure_defaults(store, s)
    store.set_state("broker_url", "http://127.0.0.1:9")
    yield store, s
    store.close()


def _message(store: Store, s, text: str = "hi") -> str:
    owner = local_user_id().split(":", 1)[1]
    (sid,) = Router(store, s).route(Event("cli", "local", f"m-{text}", text=text,
                                          sender_id=owner, is_mention=True))
    return sid


def test_failed_starts_back_off_then_fail_the_messages_and_tell_the_user(env):
    store, s = env
    clock = FakeClock()
    rt = Runtime(clock)
    c = Containers(store, s, rt, clock=clock)
    sid = _message(store, s)
    t0 = clock()
    for _ in range(400):  # a pass every 0.5 s of fake time, for 200 s
        c.pass_once(clock())
        clock.advance(0.5)
    gaps = [b - a for a, b in zip(rt.spawns, rt.spawns[1:])]
    base = s.retry_base
    assert rt.spawns[0] == t0 and gaps == [base * 2 ** n for n in range(sessiondb.MAX_TRIES - 1)]
    assert sid not in c.retry_at and sid not in c.failures  # given up: no sixth start
    notice = db_row(store, "SELECT * FROM channel_outbox WHERE platform_id='local'")
    assert notice and "could not be processed" in notice["content"]


def test_a_start_that_succeeds_after_a_failure_is_not_retried_again(env):
    store, s = env
    clock = FakeClock()
    rt = Runtime(clock)
    c = Containers(store, s, rt, clock=clock)
    sid = _message(store, s)
    c.pass_once(clock())
    assert len(rt.spawns) == 1 and c.retry_at[sid] == clock() + s.retry_base
    rt.fail = False
    clock.advance(s.retry_base - 0.001)
    c.pass_once(clock())
    assert len(rt.spawns) == 1  # not before its time
    clock.advance(0.001)
    c.pass_once(clock())
    assert len(rt.spawns) == 2 and sid in c.running
    assert store.session(sid)["container_status"] == "running"


def _open_wakes(store: Store, sid: str) -> int:
    return len([r for r in store.open_container_requests()
                if r["session_id"] == sid and r["action"] == "wake"])


def test_a_message_to_a_running_agent_asks_for_no_wake_and_a_kill_leaves_none_unserved(env):
    """The router files no wake request while the session's agent runs (the agent was
    nudged and reads the row itself). A message routed as the agent is being killed
    (it saw it running) is served by the wake that follows the kill, not left for the
    sweep; a session killed again at once is woken no faster than the sweep would, and
    a shutdown wakes nothing."""
    own, s = env
    store = Store.open(s.data_dir)  # the router's and the sweep's: other connections
    clock = FakeClock()
    rt = Runtime(clock, fail=False)
    c = Containers(own, s, rt, clock=clock)
    sid = _message(store, s, "one")
    assert _open_wakes(store, sid) == 1
    c.pass_once(clock())
    assert sid in c.running and len(rt.spawns) == 1 and _open_wakes(store, sid) == 0
    assert _message(store, s, "two") == sid
    assert _open_wakes(store, sid) == 0  # running: no request, no containers pass

    store.request_container(sid, "kill", "ceiling")  # the sweep's kill, after "two" was routed
    c.pass_once(clock())
    assert len(rt.spawns) == 2 and sid in c.running  # woken again for the rows it left
    assert store.session(sid)["container_status"] == "running"

    clock.advance(containers.REWAKE_GAP - 1)
    store.request_container(sid, "kill", "quarantined: outbound.db refused")
    c.pass_once(clock())
    assert len(rt.spawns) == 2 and sid not in c.running  # killed again at once: left to the sweep
    assert store.session(sid)["container_status"] == "stopped"
    assert _message(store, s, "three") == sid and _open_wakes(store, sid) == 1  # stopped: asks
    c.pass_once(clock())
    assert len(rt.spawns) == 3 and sid in c.running

    clock.advance(containers.REWAKE_GAP)
    c.stop_all()
    assert len(rt.spawns) == 3 and not c.running
    assert store.session(sid)["container_status"] == "stopped"
    store.close()
