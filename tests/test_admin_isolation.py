"""The admin surface of isolation, through the real command (`python -m nanoclaw`) on a
real central DB: a group's daily token budget is set and cleared (and the broker obeys
it at once); extra mounts are checked at the door by the spawn's own rules, so a
blocked or not-allow-listed path is one line and nothing is stored; `usage` shows the
tokens per group and day beside the budget; `doctor` says which runtime agents get
here, why not the others, and whether the warm pool is in effect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_broker import TAIL, Running, Upstream, post

from dbread import db_row
from nanoclaw.agents import mounts
from nanoclaw.cli import doctor
from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.runtime import RUNTIMES, BwrapRuntime, mountns
from nanoclaw.runtime.docker import DockerRuntime


def run_cli(base: Path, *args: str, data: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCLAW_")}
    env.update(NANOCLAW_DATA_DIR=str(data or base / "data"), NANOCLAW_LOGS_DIR=str(base / "logs"),
               NANOCLAW_GROUPS_DIR=str(base / "groups"), NANOCLAW_TIMEZONE="UTC",
               NANOCLAW_MOUNT_ALLOWLIST=str(base / "allow.json"))
    return subprocess.run([sys.executable, "-m", "nanoclaw", *args], cwd=base, env=env,
                          capture_output=True, text=True, timeout=60)


def refused(r: subprocess.CompletedProcess, *words: str) -> None:
    """One line on stderr naming the problem, exit 2."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanoclaw: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def db(tmp_path):
    store = Store.open(tmp_path / "data")
    ag = store.create_agent_group("Main", "main", "anthropic", "m", "Andy")
    yield tmp_path, store, ag
    store.close()


def config(store: Store, ag: str) -> dict:
    return db_row(store, "SELECT * FROM container_configs WHERE agent_group_id=?", (ag,))


# ---- daily token budget -------------------------------------------------------------------
def test_budget_set_and_cleared(db):
    base, store, ag = db
    r = run_cli(base, "groups", "update", "main", "--daily-token-budget", "50000")
    assert r.returncode == 0, r.stderr
    assert "daily token budget: 50000" in r.stdout
    assert config(store, ag)["daily_token_budget"] == 50000
    listing = run_cli(base, "groups", "list").stdout
    assert "DAILY_BUDGET" in listing and "50000" in listing

    assert run_cli(base, "groups", "update", ag, "--daily-token-budget", "0").returncode == 0
    assert config(store, ag)["daily_token_budget"] == 0  # no limit, whatever the default

    r = run_cli(base, "groups", "update", "main", "--daily-token-budget", "none")
    assert r.returncode == 0 and "default, none" in r.stdout
    assert config(store, ag)["daily_token_budget"] is None


def test_fallback_model_set_listed_written_for_the_agent_and_cleared(db, tmp_path):
    base, store, ag = db
    r = run_cli(base, "groups", "update", "main", "--fallback-model", "claude-backup-9")
    assert r.returncode == 0, r.stderr
    assert config(store, ag)["fallback_model"] == "claude-backup-9"
    listing = run_cli(base, "groups", "list").stdout
    assert "FALLBACK" in listing and "claude-backup-9" in listing

    from nanoclaw.lifecycle.containers import Containers  # what a spawn writes into container.json
    settings = Settings(data_dir=base / "data", groups_dir=base / "groups")
    from nanoclaw.db import session as sessiondb
    spaths = sessiondb.create(str(tmp_path / "s"))
    session = {"agent_provider": None}
    Containers(store, settings, RUNTIMES["process"](settings))._write_config(
        session, store.agent_group(ag), spaths)
    assert json.loads(open(spaths.config).read())["fallback_model"] == \
        "claude-backup-9"

    assert run_cli(base, "groups", "update", "main", "--fallback-model", "none").returncode == 0
    assert config(store, ag)["fallback_model"] is None
    Containers(store, Settings(data_dir=base / "data", fallback_model="claude-site-wide"),
               RUNTIMES["process"](settings))._write_config(session, store.agent_group(ag),
                                                           spaths)
    assert json.loads(open(spaths.config).read())["fallback_model"] == \
        "claude-site-wide"  # NANOCLAW_FALLBACK_MODEL, for groups without their own


def test_bad_budget_writes_nothing(db):
    base, store, ag = db
    run_cli(base, "groups", "update", "main", "--daily-token-budget", "100")
    for bad in ("-5", "lots", "1.5"):
        r = run_cli(base, "groups", "update", "main", "--name", "Renamed",
                    "--daily-token-budget", bad)
        refused(r, "bad daily token budget", repr(bad))
    assert config(store, ag)["daily_token_budget"] == 100
    assert db_row(store, "SELECT name FROM agent_groups WHERE id=?", (ag,))["name"] == "Main"
    refused(run_cli(base, "groups", "update", "ghost", "--daily-token-budget", "5"),
            "unknown agent group 'ghost'")


@pytest.fixture
def upstream():
    u = Upstream()
    u.release.set()
    yield u
    u.stop()


def test_broker_refuses_over_a_budget_set_by_the_cli(tmp_path, upstream):
    b = Running(tmp_path, upstream)
    try:
        assert post(b, {"stream": True}).read().endswith(TAIL)  # no budget: 24 tokens pass
        r = run_cli(tmp_path, "groups", "update", "g", "--daily-token-budget", "20",
                    data=b.settings.data_dir)
        assert r.returncode == 0, r.stderr
        resp = post(b, {"stream": True})
        err = json.loads(resp.read())
        assert resp.status == 403
        assert "daily token budget (20 tokens) is used up (24 used today)" \
            in err["error"]["message"]
        assert len(upstream.seen) == 1  # the refused call never left the host

        assert run_cli(tmp_path, "groups", "update", "g", "--daily-token-budget", "none",
                       data=b.settings.data_dir).returncode == 0
        assert post(b, {"stream": True}).status == 200  # back to the default: none
    finally:
        b.close()


# ---- extra mounts ---------------------------------------------------------------------------
@pytest.fixture
def allowed(db):
    base, store, ag = db
    (base / "projects" / "site").mkdir(parents=True)
    (base / "projects" / ".ssh").mkdir()
    (base / "docs" / "manual").mkdir(parents=True)
    (base / "elsewhere").mkdir()
    (base / "allow.json").write_text(json.dumps({"allowedRoots": [
        {"path": str(base / "projects"), "allowReadWrite": True},
        {"path": str(base / "docs")}, {"path": str(base / "data")}]}))
    return base, store, ag


def stored(store: Store, ag: str) -> list:
    return json.loads(config(store, ag)["additional_mounts"])


def test_add_list_and_remove_an_allowed_mount(allowed):
    base, store, ag = allowed
    r = run_cli(base, "mounts", "add", "main", str(base / "projects" / "site"), "--rw")
    assert r.returncode == 0, r.stderr
    assert "/workspace/extra/site (rw)" in r.stdout
    assert stored(store, ag) == [{"hostPath": str(base / "projects" / "site"),
                                  "containerPath": "site", "readonly": False}]
    r = run_cli(base, "mounts", "add", "main", "docs/manual", "--name", "manual")  # relative
    assert r.returncode == 0, r.stderr
    # what the containers worker will grant at the next spawn, by the same rules
    granted, problems = mounts.resolve(config(store, ag)["additional_mounts"],
                                       base / "allow.json", [])
    assert problems == []
    assert [(m.target, m.writable) for m in granted] == [("/workspace/extra/site", True),
                                                         ("/workspace/extra/manual", False)]
    listing = run_cli(base, "mounts", "list", "main").stdout
    assert "site" in listing and "rw" in listing and "manual" in listing and "ok" in listing

    assert run_cli(base, "mounts", "remove", "main", "site").returncode == 0
    assert [m["containerPath"] for m in stored(store, ag)] == ["manual"]
    refused(run_cli(base, "mounts", "remove", "main", "site"), "no extra mount 'site'")


def test_hostile_or_unlisted_mounts_are_refused_and_not_stored(allowed):
    base, store, ag = allowed
    run_cli(base, "mounts", "add", "main", str(base / "projects" / "site"))
    before = config(store, ag)["additional_mounts"]
    cases = [
        ([str(base / "projects" / ".ssh")], ["refused", "'.ssh'"]),
        ([str(base / "projects" / "site" / ".." / ".ssh")], ["'.ssh'"]),
        ([str(base / "elsewhere")], ["not under an allowed root"]),
        ([str(base / "projects" / "missing")], ["no such file"]),
        ([str(base / "docs" / "manual"), "--rw"], ["--rw", "read-only"]),
        ([str(base / "docs" / "manual"), "--name", "../etc"], ["bad containerPath"]),
        ([str(base / "docs" / "manual"), "--name", "site"], ["already has", "'site'"]),
        ([str(base / "data")], ["overlaps NanoClaw's own"]),
    ]
    for args, words in cases:
        refused(run_cli(base, "mounts", "add", "main", *args), *words)
    assert config(store, ag)["additional_mounts"] == before
    refused(run_cli(base, "mounts", "add", "ghost", str(base / "projects" / "site")),
            "unknown agent group")


def test_mounts_need_an_allowlist_and_list_shows_stale_ones(allowed):
    base, store, ag = allowed
    assert run_cli(base, "mounts", "add", "main", str(base / "projects" / "site")).returncode == 0
    (base / "allow.json").unlink()
    refused(run_cli(base, "mounts", "add", "main", str(base / "docs" / "manual")),
            "not under an allowed root")
    listing = run_cli(base, "mounts", "list").stdout  # every group; re-checked now
    assert "main" in listing and "refused: extra mount" in listing
    (base / "allow.json").write_text("{oops")
    refused(run_cli(base, "mounts", "add", "main", str(base / "docs" / "manual")),
            "unreadable")


# ---- usage ------------------------------------------------------------------------------------
def _rows(out: str) -> dict[tuple[str, str], list[str]]:
    lines = [ln.split() for ln in out.splitlines()[1:]]
    head = lines[0]
    assert head[:2] == ["GROUP", "DAY"] and head[-2:] == ["TOTAL", "BUDGET"]
    return {(r[0], r[1]): r[2:] for r in lines[1:]}


def test_usage_per_group_and_day_with_the_budget(db):
    base, store, ag = db
    other = store.create_agent_group("Helper", "helper", "anthropic", "m", "H")
    today = datetime.now(timezone.utc).date()  # the command runs with NANOCLAW_TIMEZONE=UTC
    yday = (today - timedelta(days=1)).isoformat()
    store.add_usage(ag, today.isoformat(), {"input_tokens": 100, "output_tokens": 20})
    store.add_usage(ag, today.isoformat(), {"input_tokens": 10, "cache_read_input_tokens": 5})
    store.add_usage(ag, yday, {"input_tokens": 7})
    store.add_usage(other, today.isoformat(), {"output_tokens": 3})
    store.add_usage(ag, (today - timedelta(days=30)).isoformat(), {"input_tokens": 999})
    run_cli(base, "groups", "update", "main", "--daily-token-budget", "100")

    r = run_cli(base, "usage", "--days", "2")
    assert r.returncode == 0, r.stderr
    rows = _rows(r.stdout)
    t = today.isoformat()
    # requests, input, output, cache_write, cache_read, total, budget
    assert rows[("main", t)] == ["2", "110", "20", "0", "5", "135", "100", "(used", "up)"]
    assert rows[("main", yday)] == ["1", "7", "0", "0", "0", "7", "100"]
    assert rows[("helper", t)] == ["1", "0", "3", "0", "0", "3", "-"]
    assert len(rows) == 3  # the 30-day-old row is outside the window

    only = _rows(run_cli(base, "usage", "--group", "helper").stdout)
    assert list(only) == [("helper", t)]
    assert "999" in run_cli(base, "usage", "--days", "31", "--group", "main").stdout
    refused(run_cli(base, "usage", "--days", "0"), "--days")
    refused(run_cli(base, "usage", "--group", "ghost"), "unknown agent group")


# ---- doctor ------------------------------------------------------------------------------------
def test_doctor_names_the_runtime_auto_picks_here(tmp_path):
    s = Settings(data_dir=tmp_path / "data")
    usable = [n for n in ("docker", "bwrap") if RUNTIMES[n].available(s)]
    pick = usable[0] if usable else "process"
    out = run_cli(tmp_path, "doctor").stdout
    assert f"runtime auto picks {pick} here" in out, out
    for n in {"docker", "bwrap"} - set(usable):
        assert f"runtime {n} is not usable: " in out
    assert "warm pool" in out


def _fake(monkeypatch, docker: bool, bwrap: bool, root: bool) -> None:
    monkeypatch.setattr(DockerRuntime, "available", classmethod(lambda cls, s=None: docker))
    monkeypatch.setattr(BwrapRuntime, "available", classmethod(lambda cls, s=None: bwrap))
    monkeypatch.setattr(mountns, "can_mount", lambda: root)


def _report(tmp_path, **kw) -> list[tuple[bool | None, str]]:
    return doctor.runtime_report(Settings(data_dir=tmp_path / "data", **kw))


def test_doctor_runtime_and_warm_pool_decisions(tmp_path, monkeypatch):
    _fake(monkeypatch, docker=False, bwrap=False, root=False)
    rep = _report(tmp_path, runtime="auto")
    assert [ok for ok, _ in rep[:2]] == [None, None]
    assert "runtime docker is not usable: no Docker engine" in rep[0][1]
    assert "runtime bwrap is not usable: bubblewrap" in rep[1][1]
    assert rep[2][0] is False and "auto picks process here" in rep[2][1] \
        and "WITHOUT isolation" in rep[2][1]
    assert rep[3] == (True, "zygote on: process agents are forked from one that imported"
                            " the runner (NANOCLAW_ZYGOTE)")
    assert _report(tmp_path, runtime="auto", zygote=False)[3] == (
        True, "warm pool on: 1 process agent(s) started ahead (NANOCLAW_WARM_POOL)")

    _fake(monkeypatch, docker=False, bwrap=True, root=False)
    rep = _report(tmp_path, runtime="auto", warm_pool=2)
    assert (True, "runtime auto picks bwrap here") in rep
    assert any(ok is None and "warm pool off" in t and "root" in t for ok, t in rep)
    _fake(monkeypatch, docker=False, bwrap=True, root=True)
    assert any(ok and "warm pool on: 2 bwrap" in t for ok, t in _report(
        tmp_path, runtime="auto", warm_pool=2))

    _fake(monkeypatch, docker=True, bwrap=True, root=True)
    rep = _report(tmp_path, runtime="auto")
    assert rep[0] == (True, "runtime auto picks docker here")
    assert rep[1][1].startswith("image ")  # whether it was built from container/ as it is
    assert rep[2] == (True, "warm pool on: 1 docker agent(s) started ahead (NANOCLAW_WARM_POOL)")
    _fake(monkeypatch, docker=True, bwrap=True, root=False)
    assert _report(tmp_path, runtime="auto")[2] == (
        None, "warm pool off: docker hands a session to a waiting sandbox only when the host"
              " runs as root; every agent starts cold")
    assert "off (NANOCLAW_WARM_POOL=0)" in _report(tmp_path, warm_pool=0)[-1][1]

    _fake(monkeypatch, docker=False, bwrap=True, root=True)
    rep = _report(tmp_path, runtime="docker")
    assert rep[-1] == (False, "runtime docker (NANOCLAW_RUNTIME) cannot run here; auto would"
                              " pick bwrap")
