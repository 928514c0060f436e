"""Agent skills: `container/skills/<name>/` (SKILL.md in Claude Code's format, optional
instructions.md).

- The runner's `skills.sync` on real temp folders: a link per enabled skill in
  `$CLAUDE_CONFIG_DIR/skills/`, disabled and vanished skills unlinked, nothing of the
  agent's own touched or followed, hostile and unknown names a warning (once).
- The real Claude Code CLI (claude-agent-sdk, fake model on 127.0.0.1) lists a linked
  skill to the model and loads its SKILL.md through the Skill tool.
- The `anthropic` provider is told each skill's description and SKILL.md path, and its
  `read` tool may open it.
- `nanoclaw groups update --skills` checks names (one line, nothing stored) and
  `nanoclaw skills` lists skills, descriptions and the groups that have them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanoclaw.db.store import Store
from nanoclaw.devtools.runner_harness import ROOT, Runner, Session, model_calls, wait_for

sys.path.insert(0, str(ROOT / "container"))

from agent_runner import config as config_mod  # noqa: E402
from agent_runner import memory, skills  # noqa: E402

from dbread import db_row

SKILLS = ROOT / "container" / "skills"
SLOW = 30.0


def write_skill(root: Path, name: str, description: str | None = "does things",
                instructions: str | None = None) -> Path:
    d = root / "skills" / name
    d.mkdir(parents=True)
    if description is not None:
        (d / "SKILL.md").write_text(f"---\nname: {name}\ndescription: {description}\n---\n\n"
                                    f"# {name}\n\nBody of {name}.\n")
    if instructions is not None:
        (d / "instructions.md").write_text(instructions)
    return d


@pytest.fixture
def tree(tmp_path):
    """A runner root with skills alpha, beta (SKILL.md) and gamma (instructions only)."""
    root = tmp_path / "runner"
    write_skill(root, "alpha", "Alpha: when the user says alpha", "ALPHA RULE")
    write_skill(root, "beta", "Beta things")
    write_skill(root, "gamma", None, "GAMMA RULE")
    for d in ("session", "group", "global"):
        (tmp_path / d).mkdir()
    return tmp_path


def cfg(tmp: Path, skills_setting, root: Path | None = None) -> config_mod.Config:
    return config_mod.Config(session_dir=str(tmp / "session"), group_dir=str(tmp / "group"),
                             global_dir=str(tmp / "global"), tz="UTC", skills=skills_setting,
                             runner_root=str(root or tmp / "runner"))


def links(tmp: Path) -> dict[str, str]:
    folder = tmp / "session" / ".claude" / "skills"
    return {p.name: os.readlink(p) for p in sorted(folder.iterdir()) if p.is_symlink()}


def sync(c: config_mod.Config) -> list[str]:
    return skills.sync(c, env={})


# --- sync on real folders -------------------------------------------------------------------
def test_enabled_skills_are_linked_and_disabled_ones_unlinked(tree):
    root = tree / "runner" / "skills"
    assert sync(cfg(tree, "all")) == ["alpha", "beta"]  # gamma has no SKILL.md
    assert links(tree) == {"alpha": str(root / "alpha"), "beta": str(root / "beta")}
    link = tree / "session" / ".claude" / "skills" / "alpha"
    assert "Body of alpha" in (link / "SKILL.md").read_text()

    assert sync(cfg(tree, ["beta"])) == ["beta"]
    assert links(tree) == {"beta": str(root / "beta")}
    assert sync(cfg(tree, ["beta"])) == ["beta"]  # again: nothing changes
    assert sync(cfg(tree, [])) == []
    assert links(tree) == {}
    assert (root / "alpha" / "SKILL.md").exists()  # unlinking never touches the skill


def test_vanished_skills_and_a_moved_runner_root(tree):
    sync(cfg(tree, "all"))
    shutil.rmtree(tree / "runner" / "skills" / "beta")
    assert sync(cfg(tree, "all")) == ["alpha"]
    assert set(links(tree)) == {"alpha"}  # the dangling link went

    # the same session under another runtime: the runner root moved; our links follow it
    moved = tree / "app"
    shutil.copytree(tree / "runner", moved)
    assert sync(cfg(tree, "all", root=moved)) == ["alpha"]
    assert links(tree) == {"alpha": str(moved / "skills" / "alpha")}


def test_what_the_agent_made_there_stays(tree, caplog):
    folder = tree / "session" / ".claude" / "skills"
    (folder / "mine").mkdir(parents=True)
    (folder / "mine" / "SKILL.md").write_text("---\nname: mine\n---\n")
    elsewhere = tree / "elsewhere"
    (elsewhere / "beta").mkdir(parents=True)
    (folder / "beta").symlink_to(elsewhere / "beta")  # the agent's own link, a skill's name
    (folder / "other").symlink_to(elsewhere)
    (folder / "notes.txt").write_text("keep")
    skills._warned.clear()
    with caplog.at_level(logging.WARNING, "agent_runner"):
        assert sync(cfg(tree, "all")) == ["alpha"]
        assert sync(cfg(tree, "all")) == ["alpha"]
        assert sync(cfg(tree, [])) == []
    assert sorted(p.name for p in folder.iterdir()) == ["beta", "mine", "notes.txt", "other"]
    assert os.readlink(folder / "beta") == str(elsewhere / "beta")
    assert os.readlink(folder / "other") == str(elsewhere)
    assert (folder / "mine" / "SKILL.md").exists() and (folder / "notes.txt").exists()
    assert [r.getMessage() for r in caplog.records].count(
        f"skill 'beta' ignored: {folder / 'beta'} exists and is not ours; left alone") == 1


def test_a_skills_folder_that_is_a_link_or_a_file_is_not_followed(tree, caplog):
    target = tree / "target"
    target.mkdir()
    (tree / "session" / ".claude").mkdir()
    (tree / "session" / ".claude" / "skills").symlink_to(target)
    with caplog.at_level(logging.WARNING, "agent_runner"):
        assert sync(cfg(tree, "all")) == []
    assert list(target.iterdir()) == []
    assert "is not a folder" in caplog.text
    (tree / "session" / ".claude" / "skills").unlink()
    (tree / "session" / ".claude" / "skills").write_text("a file")
    assert sync(cfg(tree, "all")) == []  # a warning, no crash
    assert (tree / "session" / ".claude" / "skills").read_text() == "a file"


def test_hostile_and_unknown_names_are_one_warning_each(tree, caplog):
    (tree / "runner" / "secret").mkdir()
    (tree / "runner" / "secret" / "SKILL.md").write_text("---\nname: secret\n---\n")
    hostile = ["../secret", "..", ".", "a/b", "/etc", "alpha/../../secret", "", "-x",
               "nope-" + tree.name, "alpha"]
    skills._warned.clear()
    with caplog.at_level(logging.WARNING, "agent_runner"):
        assert sync(cfg(tree, hostile)) == ["alpha"]
        assert sync(cfg(tree, hostile)) == ["alpha"]
        text = memory.compose_text(cfg(tree, hostile))
    assert set(links(tree)) == {"alpha"}
    assert "ALPHA RULE" in text and "secret" not in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(hostile) - 1, warnings  # each bad name once, alpha none
    assert any(f"'nope-{tree.name}' ignored: no such skill" in w for w in warnings)


def test_container_json_setting(tree):
    group = tree / "group"

    def load(value) -> list[str] | str:
        data = {} if value is None else {"skills": value}
        (group / "container.json").write_text(json.dumps(data))
        return config_mod.load({"NANOCLAW_GROUP_DIR": str(group),
                                "NANOCLAW_DB_DIR": str(group)}).skills

    assert load(None) == "all" and load('"all"') == "all" and load("all") == "all"
    assert load("none") == [] and load("[]") == [] and load([]) == []
    assert load('["alpha", "beta"]') == ["alpha", "beta"] and load(["alpha"]) == ["alpha"]


def test_memory_composes_instructions_and_lists_skills_for_the_api_provider(tree):
    c = cfg(tree, ["alpha", "gamma"])
    composed = memory.compose(c)
    assert "## Skill: alpha\n\nALPHA RULE" in composed and "GAMMA RULE" in composed
    assert set(links(tree)) == {"alpha"}  # compose syncs too
    text = memory.memory(c, composed)
    skill_md = tree / "runner" / "skills" / "alpha" / "SKILL.md"
    assert f"- alpha: Alpha: when the user says alpha ({skill_md})" in text
    assert "- beta:" not in text
    assert "## Skills" not in memory.memory(cfg(tree, ["gamma"]), composed)


def test_the_shipped_skills_are_valid_claude_code_skills():
    names = sorted(p.name for p in SKILLS.iterdir() if p.is_dir())
    assert {"scheduling", "remembering"} <= set(names)
    for name in names:
        assert skills.NAME.match(name), name
        front = skills.frontmatter((SKILLS / name / "SKILL.md").read_text())
        assert front.get("name") == name, name
        assert 50 <= len(front.get("description", "")) <= 1024, name
        assert ": " not in front["description"] and " #" not in front["description"], name
        extra = SKILLS / name / "instructions.md"
        assert not extra.exists() or len(extra.read_text()) < 600, name  # in every prompt


# --- the providers see them -----------------------------------------------------------------
def _messages_text(request: dict) -> str:
    return json.dumps(request["body"]["messages"])


def test_the_claude_code_cli_sees_and_loads_a_linked_skill(tmp_path, fake):
    pytest.importorskip("claude_agent_sdk")
    session = Session(tmp_path, provider="claude", skills=["scheduling"])
    runner = Runner(session, fake.url, {"CLAUDE_CODE_MAX_RETRIES": "1"})
    try:
        first = session.chat("hello")
        assert session.reply_to(first, SLOW)["text"] == "echo: hello"
        seen = _messages_text(model_calls(fake)[0])
        assert "The following skills are available" in seen
        assert "- scheduling: Turn a request like" in seen  # name and description
        assert "- remembering:" not in seen  # not enabled for this group
        link = Path(session.paths.work) / ".claude" / "skills" / "scheduling"
        assert os.readlink(link) == str(SKILLS / "scheduling")

        used = session.chat('[[tool:Skill {"skill":"scheduling"}]]')
        session.reply_to(used, SLOW)
        body = "Day-of-month and weekday both set"  # from SKILL.md's body, not its listing
        assert wait_for(lambda: any(body in _messages_text(c) for c in model_calls(fake)),
                        "the skill's body sent to the model", SLOW)
    finally:
        assert runner.stop() == 0, runner.text()


def test_the_anthropic_provider_is_told_where_skill_md_is_and_may_read_it(tmp_path, fake):
    session = Session(tmp_path, provider="anthropic", skills=["scheduling", "ghost"])
    runner = Runner(session, fake.url, {"NANOCLAW_MODEL_RETRIES": "1"})
    skill_md = SKILLS / "scheduling" / "SKILL.md"
    try:
        mid = session.chat(f'[[tool:read {{"path":"{skill_md}"}}]]')
        session.reply_to(mid, SLOW)
        first, second = model_calls(fake)[:2]
        system = json.dumps(first["body"]["system"])
        assert "- scheduling: Turn a request like" in system and str(skill_md) in system
        assert "remembering" not in system
        result = second["body"]["messages"][-1]["content"][0]
        assert not result.get("is_error"), result
        assert "Day-of-month and weekday both set" in json.dumps(result["content"])
    finally:
        assert runner.stop() == 0, runner.text()
    assert runner.text().count("skill 'ghost' ignored: no such skill") == 1


# --- the host's commands --------------------------------------------------------------------
def run_cli(base: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCLAW_")}
    env.update(NANOCLAW_DATA_DIR=str(base / "data"), NANOCLAW_LOGS_DIR=str(base / "logs"),
               NANOCLAW_GROUPS_DIR=str(base / "groups"))
    return subprocess.run([sys.executable, "-m", "nanoclaw", *args], cwd=base, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def db(tmp_path):
    store = Store.open(tmp_path / "data")
    store.create_agent_group("Main", "main", "anthropic", "m", "Andy")
    store.create_agent_group("Other", "other", "anthropic", "m", "Andy")
    yield tmp_path, store
    store.close()


def stored(store: Store, folder: str) -> str:
    return db_row(store, "SELECT c.skills FROM container_configs c JOIN agent_groups g"
                    " ON g.id=c.agent_group_id WHERE g.folder=?", (folder,))["skills"]


def test_groups_update_skills_checks_names(db):
    base, store = db
    assert stored(store, "main") == '"all"'
    r = run_cli(base, "groups", "update", "main", "--skills", "scheduling, scheduling")
    assert r.returncode == 0, r.stderr
    assert json.loads(stored(store, "main")) == ["scheduling"]
    for bad in ("scheduling,nope", "../skills", "scheduling/..", ".."):
        r = run_cli(base, "groups", "update", "main", "--skills", bad, "--model", "x")
        assert r.returncode == 2, (bad, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nanoclaw: unknown skill"), r.stderr
        assert "available: " in lines[0] and "scheduling" in lines[0]
        assert json.loads(stored(store, "main")) == ["scheduling"]  # nothing written
        assert db_row(store, "SELECT model FROM container_configs c JOIN agent_groups g ON"
                        " g.id=c.agent_group_id WHERE g.folder='main'")["model"] != "x"
    assert run_cli(base, "groups", "update", "main", "--skills", "none").returncode == 0
    assert json.loads(stored(store, "main")) == []
    assert run_cli(base, "groups", "update", "main", "--skills", "all").returncode == 0
    assert json.loads(stored(store, "main")) == "all"


def test_skills_lists_descriptions_and_groups(db):
    base, store = db
    assert run_cli(base, "groups", "update", "main", "--skills", "scheduling").returncode == 0
    store.conn.execute("UPDATE container_configs SET skills='[\"scheduling\", \"gone\"]'"
                       " WHERE agent_group_id=(SELECT id FROM agent_groups"
                       " WHERE folder='other')")
    for args in (("skills",), ("skills", "list")):
        r = run_cli(base, *args)
        assert r.returncode == 0, r.stderr
        rows = {line.split()[0]: line.rstrip().split(None, 2)[1:]
                for line in r.stdout.splitlines()[1:]}
        assert r.stdout.splitlines()[0].split() == ["NAME", "GROUPS", "DESCRIPTION"]
        assert rows["scheduling"][0] == "main,other"
        assert rows["scheduling"][1].startswith("Turn a request like")
        assert rows["remembering"][0] == "-"
        assert rows["gone"] == ["other", "(missing from container/skills)"]
