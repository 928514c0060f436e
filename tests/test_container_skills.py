"""The skills every agent gets (container/skills/), as a user meets them.

- `welcome`: a new agent's folder carries the host's marker; its first answer is made
  with the welcome instructions composed in, and none after it, in this conversation or
  another. An agent made before the marker existed is never welcomed.
- `self-customize`: what it tells the agent it may change at once (its own CLAUDE.md)
  changes, through a real host; what it calls a request (packages) becomes an approval
  card for the owner, not a change. The fake model plays the agent's part by calling the
  tools (`[[tool:…]]`), so this checks the paths the skill sends the agent down, not the
  model's reading of it.
- `<platform>-formatting`: every "you write ⇒ sent as" line is run through the
  channel's real converter, so the skill cannot drift from what the channel renders.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import wait_for

from nanoclaw.agents.groups import WELCOME_MARKER, ensure_group_folder
from nanoclaw.channels import markdown
from nanoclaw.config import Settings
from nanoclaw.devtools.runner_harness import ROOT, Runner, Session, model_calls

sys.path.insert(0, str(ROOT / "container"))

from agent_runner import memory  # noqa: E402

SKILLS = ROOT / "container" / "skills"
SLOW = 30.0
WELCOME = "## Skill: welcome"

RENDER = {
    "slack": lambda s: markdown.slack_mrkdwn(s, 40000)[0],
    "telegram": lambda s: markdown.telegram_html(s, 4096)[0].markup,
    "whatsapp": lambda s: markdown.whatsapp_text(s, 4096)[0],
    "discord": lambda s: markdown.discord_markdown(s, 2000)[0],
}


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], s)


@pytest.mark.parametrize("platform", sorted(RENDER))
def test_each_formatting_skill_says_exactly_what_its_channel_sends(platform):
    text = (SKILLS / f"{platform}-formatting" / "SKILL.md").read_text()
    block = re.search(r"^````renders\n(.*?)^````$", text, re.S | re.M)
    assert block, "no ````renders block"
    rows = [line.split("  ⇒  ") for line in block[1].splitlines() if line.strip()]
    assert len(rows) >= 8
    for row in rows:
        assert len(row) == 2, row
        written, sent = map(_unescape, row)
        assert RENDER[platform](written) == sent, (platform, written)


def test_a_new_agent_folder_is_marked_for_its_welcome_and_an_old_one_is_not(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", groups_dir=tmp_path / "groups")
    ensure_group_folder(settings, "fresh", "Fresh")
    marker = settings.group_dir("fresh") / WELCOME_MARKER
    assert marker.exists()
    marker.unlink()  # welcomed
    ensure_group_folder(settings, "fresh", "Fresh")  # every later start
    ensure_group_folder(settings, "fresh", "Fresh", memory="# new memory\n")
    assert not marker.exists()


def _system(call: dict) -> str:
    return json.dumps(call["body"].get("system", ""))


def test_the_first_answer_carries_the_welcome_and_no_answer_after_it(tmp_path, fake):
    session = Session(tmp_path, provider="anthropic")
    (session.group / WELCOME_MARKER).write_bytes(b"")
    runner = Runner(session, fake.url, {"NANOCLAW_MODEL_RETRIES": "1"})
    try:
        first = session.chat("hello")
        assert session.reply_to(first, SLOW)["text"] == "echo: hello"
        assert WELCOME in _system(model_calls(fake)[0])
        assert "first conversation" in _system(model_calls(fake)[0])
        # the reply row is written inside the turn; the marker goes once the turn is done
        composed = session.group / ".claude" / "CLAUDE.md"
        wait_for(lambda: not (session.group / WELCOME_MARKER).exists()
                 and WELCOME not in composed.read_text(), SLOW, what="the welcome done")
        second = session.chat("and now?")
        session.reply_to(second, SLOW)
        assert WELCOME not in _system(model_calls(fake)[-1])
    finally:
        assert runner.stop() == 0, runner.text()
    # the agent started again later (a new runner composes its memory afresh)
    runner = Runner(session, fake.url, {"NANOCLAW_MODEL_RETRIES": "1"})
    try:
        third = session.chat("hi again")
        session.reply_to(third, SLOW)
        assert WELCOME not in _system(model_calls(fake)[-1])
    finally:
        assert runner.stop() == 0, runner.text()


def test_an_agent_without_the_marker_is_never_welcomed(tmp_path, fake):
    session = Session(tmp_path, provider="anthropic")
    runner = Runner(session, fake.url, {"NANOCLAW_MODEL_RETRIES": "1"})
    try:
        session.reply_to(session.chat("hello"), SLOW)
        assert WELCOME not in _system(model_calls(fake)[0])
        assert "## Skill: self-customize" in _system(model_calls(fake)[0])
    finally:
        assert runner.stop() == 0, runner.text()


def test_a_marker_the_agent_turned_into_a_folder_is_one_warning(tmp_path, caplog):
    class C:
        group_dir = str(tmp_path)
    (tmp_path / WELCOME_MARKER).mkdir()
    assert memory.welcome_due(C) is True
    assert memory.welcomed(C) is False
    assert "cannot remove the welcome marker" in caplog.text


def test_self_customize_through_a_host(host):
    """The new default agent greets once, changes its own memory at once, and asks an
    admin for packages: the owner gets a card and nothing is installed."""
    c = host.client()
    (ag,) = host.q("SELECT id, folder FROM agent_groups")
    group = host.base / "groups" / ag["folder"]
    assert (group / WELCOME_MARKER).exists()
    c.wait_reply(c.send("hello"))
    wait_for(lambda: not (group / WELCOME_MARKER).exists(), 30, what="the welcome done")

    memory_md = "# Main\n\n## Preferences\n- Answer in German.\n"
    reply = c.wait_reply(c.send(
        f'[[tool:write {json.dumps({"path": "CLAUDE.md", "content": memory_md})}]]'))
    assert "error" not in reply["text"].lower(), reply
    assert (group / "CLAUDE.md").read_text() == memory_md

    ask = {"apt": ["jq"], "reason": "the user asked me to read JSON faster"}
    c.wait_reply(c.send(f"[[tool:install_packages {json.dumps(ask)}]]"))
    wait_for(lambda: host.q("SELECT * FROM pending_approvals WHERE status='pending'"), 30,
             what="the approval request")
    (appr,) = host.q("SELECT * FROM pending_approvals WHERE status='pending'")
    assert appr["action"] == "install_packages"
    cards = wait_for(lambda: host.q("SELECT * FROM channel_outbox WHERE idem_key LIKE"
                                    " 'card:appr-%'"), 30, what="the owner's card")
    assert "jq" in cards[0]["content"]
