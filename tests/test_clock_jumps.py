"""The wall clock jumps (an NTP step back or forward) around scheduled tasks: no
occurrence fires twice, none is lost. The host reads task times against the wall clock
(a task is due when `process_after <= now`), so each step is a `now` given to the same
code the sweep runs (`scheduling.recur`, `SessionInbound.due_count`); the agent's part
(it ran the task) is the status it leaves."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from nanoclaw import config
from nanoclaw.agents import scheduling
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.routing.router import Event, Router
from nanoclaw.util import iso, local_user_id

HOURLY = "0 * * * *"


def at(hhmm: str) -> float:
    h, m = hhmm.split(":")
    return datetime(2026, 3, 1, int(h), int(m), tzinfo=timezone.utc).timestamp()


@pytest.fixture
def paths(tmp_path, monkeypatch) -> sessiondb.SessionPaths:
    for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data", "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                 "NANOCLAW_GROUPS_DIR": tmp_path / "groups"}.items():
        monkeypatch.setenv(k, str(v))
    s = config.load()
    store = Store.open(s.data_dir)
    ensure_defaults(store, s)
    (sid,) = Router(store, s).route(Event("cli", "local", "m0", text="hi", is_mention=True,
                                          sender_id=local_user_id().split(":")[1]))
    sess = store.session(sid)
    return sessiondb.SessionPaths(str(s.session_dir(sess["agent_group_id"], sid)))


def due(paths, now: float) -> list[dict]:
    inbound = sessiondb.SessionInbound(paths)
    return [t for t in inbound.tasks() if t["status"] == "pending"
            and t["process_after"] <= iso(now)] if inbound.due_count(iso(now)) else []


def run(paths, task: dict) -> None:
    """The agent ran it."""
    with sessiondb.transaction(paths.inbound) as c:
        c.execute("UPDATE messages_in SET status='completed' WHERE id=?", (task["id"],))


def fired(paths) -> list[str]:
    return sorted(t["process_after"] for t in sessiondb.SessionInbound(paths).tasks()
                  if t["status"] == "completed")


def test_a_step_back_while_a_task_ran_does_not_fire_its_slot_again(paths):
    scheduling.schedule(paths, prompt="tick", process_after=iso(at("10:00")),
                        recurrence=HOURLY, script=None, tz="UTC", now=at("09:00"),
                        routing=("cli", "local", None))
    (task,) = due(paths, at("10:00") + 30)
    run(paths, task)
    back = at("09:30")  # NTP steps the clock back 31 minutes before the sweep recurs
    (nxt,) = scheduling.recur(paths, "UTC", back)
    assert sessiondb.SessionInbound(paths).message(nxt)["process_after"] == iso(at("11:00"))
    for now in (back, at("10:00"), at("10:00") + 30, at("10:59")):  # the clock catches up
        assert due(paths, now) == [], now
    (task,) = due(paths, at("11:00"))
    run(paths, task)
    assert fired(paths) == [iso(at("10:00")), iso(at("11:00"))]  # each slot once


def test_a_step_forward_fires_the_missed_occurrence_once_and_skips_the_rest(paths):
    scheduling.schedule(paths, prompt="tick", process_after=iso(at("11:00")),
                        recurrence=HOURLY, script=None, tz="UTC", now=at("10:00"),
                        routing=("cli", "local", None))
    assert due(paths, at("10:30")) == []
    jumped = at("15:10")  # the clock steps forward over four slots
    (task,) = due(paths, jumped)  # the one that was pending is not lost
    run(paths, task)
    (nxt,) = scheduling.recur(paths, "UTC", jumped)
    assert sessiondb.SessionInbound(paths).message(nxt)["process_after"] == iso(at("16:00"))
    assert due(paths, jumped + 60) == []  # 12:00…15:00 are not replayed
    assert fired(paths) == [iso(at("11:00"))]


def test_a_one_off_task_that_ran_never_runs_again_whichever_way_the_clock_goes(paths):
    scheduling.schedule(paths, prompt="once", process_after=iso(at("12:00")),
                        recurrence=None, script=None, tz="UTC", now=at("11:00"),
                        routing=("cli", "local", None))
    (task,) = due(paths, at("12:05"))
    run(paths, task)
    for now in (at("11:59"), at("12:00"), at("12:05"), at("18:00")):
        assert scheduling.recur(paths, "UTC", now) == []
        assert due(paths, now) == [], now
    assert fired(paths) == [iso(at("12:00"))]
