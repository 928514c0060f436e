"""Extra mounts never reach NanoClaw's own installation (security review M4): with an
allowlist root that holds the checkout, `mounts add` (the real command) refuses the
runner source `container/`, the `nanoclaw/` package, the venv (even under another
name) and any folder holding them, with one line naming the protected path, and stores
nothing; an ordinary folder beside the checkout under the same root is accepted, so the
refusals are the protection's doing. The spawn's own check (`mounts.resolve` with
`mounts.protected`) refuses them again, after resolving symlinks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import nanoclaw
from dbread import db_row
from nanoclaw import config
from nanoclaw.agents import mounts
from nanoclaw.db.store import Store
from nanoclaw.lifecycle.containers import RUNNER_DIR

PACKAGE = Path(nanoclaw.__file__).resolve().parent
CHECKOUT = PACKAGE.parent
VENV = Path(sys.prefix).resolve()


def run_cli(base: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCLAW_")}
    env.update(NANOCLAW_DATA_DIR=str(base / "data"), NANOCLAW_LOGS_DIR=str(base / "logs"),
               NANOCLAW_GROUPS_DIR=str(base / "groups"), NANOCLAW_TIMEZONE="UTC",
               NANOCLAW_MOUNT_ALLOWLIST=str(base / "allow.json"))
    return subprocess.run([sys.executable, "-m", "nanoclaw", *args], cwd=base, env=env,
                          capture_output=True, text=True, timeout=60)


def refused(r: subprocess.CompletedProcess, *words: str) -> str:
    """One line on stderr naming the problem, exit 2."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanoclaw: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def world(tmp_path):
    """A central DB with group `main`, an allowlist whose rw root is the folder holding
    the checkout, and an ordinary folder beside the checkout under that root."""
    root = CHECKOUT.parent
    sibling = root / f"nanoclaw-mount-probe-{uuid.uuid4().hex}"
    try:
        sibling.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a folder beside the checkout ({e})")
    store = Store.open(tmp_path / "data")
    ag = store.create_agent_group("Main", "main", "anthropic", "m", "Andy")
    (tmp_path / "allow.json").write_text(json.dumps(
        {"allowedRoots": [{"path": str(root), "allowReadWrite": True}]}))
    try:
        yield tmp_path, store, ag, sibling
    finally:
        store.close()
        shutil.rmtree(sibling, ignore_errors=True)


def stored(store: Store, ag: str) -> list:
    row = db_row(store, "SELECT additional_mounts FROM container_configs WHERE agent_group_id=?",
                   (ag,))
    return json.loads((row or {}).get("additional_mounts") or "[]")


def test_the_installation_is_protected():
    got = {Path(os.path.realpath(p)) for p in mounts.installation()}
    want = {RUNNER_DIR.resolve(), PACKAGE, CHECKOUT, VENV, Path(sys.base_prefix).resolve()}
    assert want <= got


def test_mounts_add_refuses_the_installation_and_accepts_an_ordinary_folder(world):
    base, store, ag, sibling = world
    venv_named, venv_how = ((CHECKOUT, "lies inside") if VENV.is_relative_to(CHECKOUT)
                            else (VENV, "the same folder"))
    cases = [
        ([str(RUNNER_DIR), "--rw"], RUNNER_DIR, "the same folder"),
        ([str(PACKAGE), "--rw"], PACKAGE, "the same folder"),
        ([str(CHECKOUT / "nanoclaw" / "channels")], PACKAGE, "lies inside"),
        ([str(VENV), "--name", "venv", "--rw"], venv_named, venv_how),  # sys.prefix
        ([str(CHECKOUT), "--name", "src", "--rw"], RUNNER_DIR, "it holds"),  # their parent
    ]
    if (CHECKOUT / ".venv").is_dir() and (CHECKOUT / ".venv").resolve() != VENV:
        cases.append(([str(CHECKOUT / ".venv"), "--name", "venv"], CHECKOUT, "lies inside"))
    for args, named, how in cases:
        line = refused(run_cli(base, "mounts", "add", "main", *args),
                       "refused", "overlaps NanoClaw's own", how)
        assert line.split("NanoClaw's own ", 1)[1].startswith(f"{named} ("), line
    # the allowlist root itself holds the checkout (or a home directory): refused too
    refused(run_cli(base, "mounts", "add", "main", str(CHECKOUT.parent), "--name", "all"),
            "refused")
    assert stored(store, ag) == []
    # the same root, an ordinary folder beside the checkout: granted, read-write
    r = run_cli(base, "mounts", "add", "main", str(sibling), "--name", "probe", "--rw")
    assert r.returncode == 0, r.stderr
    assert "/workspace/extra/probe (rw)" in r.stdout
    assert [m["hostPath"] for m in stored(store, ag)] == [str(sibling)]


def test_a_symlink_to_the_installation_is_refused_at_the_door_and_at_spawn(world):
    base, store, ag, sibling = world
    (sibling / "code").symlink_to(PACKAGE)
    refused(run_cli(base, "mounts", "add", "main", str(sibling / "code"), "--rw"),
            "overlaps NanoClaw's own", str(PACKAGE))
    # accepted while it is a plain folder, then swapped for a link into the runner source:
    # the spawn's check resolves it again and refuses it
    (sibling / "work").mkdir()
    assert run_cli(base, "mounts", "add", "main", str(sibling / "work"), "--rw").returncode == 0
    (sibling / "work").rmdir()
    (sibling / "work").symlink_to(RUNNER_DIR)
    settings = config.Settings(data_dir=base / "data", logs_dir=base / "logs",
                               groups_dir=base / "groups", mount_allowlist=base / "allow.json")
    granted, problems = mounts.resolve(stored(store, ag), base / "allow.json",
                                       mounts.protected(settings))
    assert granted == []
    assert len(problems) == 1 and "overlaps NanoClaw's own" in problems[0]
    assert str(RUNNER_DIR) in problems[0]


def test_the_spawn_refuses_install_mounts_stored_before_this_rule(world):
    """Mounts written into container_configs by hand or by an older version: each spawn
    checks them again and leaves out every one that reaches the installation."""
    base, store, ag, sibling = world
    reqs = [{"hostPath": str(RUNNER_DIR), "containerPath": "runner", "readonly": False},
            {"hostPath": str(PACKAGE), "containerPath": "pkg", "readonly": False},
            {"hostPath": str(VENV), "containerPath": "venv", "readonly": False},
            {"hostPath": str(CHECKOUT / "nanoclaw" / "channels"), "containerPath": "ch"},
            {"hostPath": str(CHECKOUT), "containerPath": "src"},
            {"hostPath": str(sibling), "containerPath": "probe", "readonly": False}]
    settings = config.Settings(data_dir=base / "data", logs_dir=base / "logs",
                               groups_dir=base / "groups", mount_allowlist=base / "allow.json")
    granted, problems = mounts.resolve(json.dumps(reqs), base / "allow.json",
                                       mounts.protected(settings))
    assert [(m.target, m.writable) for m in granted] == [("/workspace/extra/probe", True)]
    assert len(problems) == 5 and all("overlaps NanoClaw's own" in p for p in problems)


def test_a_container_path_with_a_trailing_newline_is_refused(world):
    base, _, _, sibling = world
    allow = mounts.Allowlist.load(base / "allow.json")
    with pytest.raises(mounts.MountError, match="bad containerPath"):
        mounts.check({"hostPath": str(sibling), "containerPath": "site\n"}, allow, [])
    assert mounts.check({"hostPath": str(sibling), "containerPath": "site"}, allow, [])
