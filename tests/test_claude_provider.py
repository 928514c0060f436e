"""The `claude` provider end to end: the runner as a subprocess driving the real bundled
Claude Code CLI (claude-agent-sdk) against the fake model, offline, HOME per test.

Each runner start launches the CLI (about a second), so each test covers several
promises with one runner where it can."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid

import pytest

from nanoclaw.devtools.runner_harness import ROOT, Runner, Session, model_calls, wait_for

pytest.importorskip("claude_agent_sdk")

SLOW = 30.0  # deadline for anything that waits on the CLI


@pytest.fixture
def session(tmp_path):
    return Session(tmp_path, provider="claude")


@pytest.fixture
def start(fake):
    runners: list[Runner] = []

    def _start(sess: Session) -> Runner:
        r = Runner(sess, fake.url, {"CLAUDE_CODE_MAX_RETRIES": "1"})
        runners.append(r)
        return r

    yield _start
    for r in runners:
        rc = r.stop()
        assert rc == 0, r.text()


def test_turns_and_tool_round_trips_on_one_warm_cli(session, fake, start):
    runner = start(session)
    first = session.chat("hello claude")
    assert session.reply_to(first, SLOW)["text"] == "echo: hello claude"
    request = model_calls(fake)[0]
    assert request["headers"]["x-api-key"] == "session-token"
    assert request["body"]["model"] == "claude-fake-1"
    tools = {t["name"] for t in request["body"]["tools"]}
    assert {"Bash", "Write", "mcp__nanoclaw__send_message",
            "mcp__nanoclaw__ask_user_question"} <= tools
    assert not {"CronCreate", "AskUserQuestion", "ScheduleWakeup", "EnterPlanMode"} & tools
    system = json.dumps(request["body"]["system"])
    assert "You are Andy" in system and "tg-main" in system

    sent = session.chat('[[tool:mcp__nanoclaw__send_message {"text":"hi via mcp"}]]')
    row = session.reply_to(sent, SLOW)
    assert row["text"] == "hi via mcp" and (row["channel_type"], row["platform_id"]) == (
        "telegram", "tg:1")
    session.completed(sent, SLOW)

    target = session.group / "out.txt"
    wrote = session.chat(f'[[tool:Write {{"file_path":"{target}","content":"from claude"}}]]')
    assert session.reply_to(wrote, SLOW)["text"].startswith("done: File created")
    assert target.read_text() == "from claude"
    assert runner.text().count("claude cli starting") == 1  # one CLI served every turn
    assert session.state("continuation:claude")
    composed = (session.group / ".claude" / "CLAUDE.md").read_text()
    assert "ask_user_question" in composed
    assert "ask_user_question" in json.dumps(request["body"]["messages"])  # the CLI read it


def children(pid: int) -> dict[int, str]:
    """The live (not zombie) child processes of `pid` and their command lines, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if int(stat[1]) == pid and stat[0] != "Z":
            found[int(entry)] = cmdline
    return found


def test_an_idle_cli_is_released_and_resumed_on_the_next_message(tmp_path, fake, start):
    """After `claude_idle_s` without a query the CLI process exits while the runner
    stays; the next message starts it again, resuming the same conversation."""
    session = Session(tmp_path, provider="claude", claude_idle_s=1)
    runner = start(session)
    first = session.chat("my name is Bob")
    assert session.reply_to(first, SLOW)["text"] == "echo: my name is Bob"
    ((cli, cmdline),) = children(runner.proc.pid).items()  # the runner's one child:
    assert "claude_agent_sdk/_bundled/claude" in cmdline  # the Claude Code CLI
    cont = session.state("continuation:claude")
    wait_for(lambda: "claude cli released after idle" in runner.text(), "the release", SLOW)
    wait_for(lambda: not children(runner.proc.pid), "the CLI to exit")
    assert not os.path.exists(f"/proc/{cli}") and runner.proc.poll() is None

    fake.clear()
    second = session.chat("what is my name")
    assert session.reply_to(second, SLOW)["text"] == "echo: what is my name"
    assert "my name is Bob" in json.dumps(model_calls(fake)[0]["body"]["messages"])
    assert session.state("continuation:claude") == cont
    (again,) = children(runner.proc.pid)
    assert again != cli
    assert runner.text().count("claude cli starting") == 2
    assert "claude cli starting resume=True after_idle_release=1" in runner.text()


def test_ask_user_question_blocks_until_the_click(session, fake, start):
    start(session)
    ask = session.chat('[[tool:mcp__nanoclaw__ask_user_question {"title":"Lunch",'
                       '"question":"Where?","options":["Pizza","Sushi"]}]]')
    card = wait_for(lambda: next((r for r in session.out() if r["kind"] == "chat-sdk"), None),
                    "the question card", SLOW)
    qid = card["body"]["questionId"]
    session.insert("system", {"type": "question_response", "questionId": qid,
                              "selectedOption": "Sushi", "userId": "telegram:alice"}, id="qr")
    session.completed(ask, SLOW)
    result = wait_for(lambda: [c for c in model_calls(fake) if "selectedOption: Sushi"
                               in json.dumps(c["body"]["messages"][-2:])], "the answer", SLOW)
    assert result and session.acks()["qr"] == "completed"


def test_follow_up_is_pushed_into_the_running_cli(session, fake, start):
    runner = start(session)
    runner.wait_started()
    fake.inject(delay_ms=800)
    first = session.chat("first")
    wait_for(lambda: model_calls(fake), "the first model call", SLOW)
    second = session.chat("second")
    assert session.reply_to(first, SLOW)["text"] == "echo: first"
    assert session.reply_to(second, SLOW)["text"] == "echo: second"
    assert "follow-up pushed n=1" in runner.text()
    assert runner.text().count("claude cli starting") == 1


def test_continuation_resume_and_stale_session_recovery(session, fake, start):
    runner = start(session)
    first = session.chat("my name is Bob")
    session.reply_to(first, SLOW)
    session.completed(first, SLOW)
    cont = session.state("continuation:claude")
    assert runner.stop() == 0
    fake.clear()
    runner = start(session)
    second = session.chat("what is my name")
    assert session.reply_to(second, SLOW)["text"] == "echo: what is my name"
    assert session.state("continuation:claude") == cont
    assert "my name is Bob" in json.dumps(model_calls(fake)[0]["body"]["messages"])
    assert runner.stop() == 0

    conn = sqlite3.connect(session.paths.outbound)  # a continuation the CLI never saw
    conn.execute("UPDATE session_state SET value=? WHERE key='continuation:claude'",
                 (str(uuid.uuid4()),))
    conn.commit()
    conn.close()
    runner = start(session)
    third = session.chat("are you there")
    assert session.reply_to(third, SLOW)["text"] == "echo: are you there"
    assert "continuation unusable" in runner.text()
    new = session.state("continuation:claude")
    assert new and new != cont


def test_busy_model_is_retried_visibly_then_reported(session, fake, start):
    start(session)
    warm = session.chat("warm up")
    session.reply_to(warm, SLOW)
    fake.inject(status=529, count=2, retry_after=0.01)  # the call and the CLI's one retry
    busy = session.chat("are you there")
    session.completed(busy, SLOW)
    texts = [r["text"] for r in session.out() if r["in_reply_to"] == busy]
    assert texts[0].startswith("The model is busy (HTTP 529, overloaded); retrying")
    assert texts[1].startswith("Error: model overloaded/rate limited (HTTP 529")
    again = session.chat("again")
    assert session.reply_to(again, SLOW)["text"] == "echo: again"


def test_compact_archives_and_clear_starts_afresh(session, fake, start):
    runner = start(session)
    first = session.chat("something worth keeping")
    session.reply_to(first, SLOW)
    n = len(model_calls(fake))
    compact = session.chat("/compact")
    assert session.reply_to(compact, SLOW)["text"] == "Conversation compacted."
    # the PreCompact hook asked the summary to keep the message XML
    assert any("keep its <message> XML attributes" in json.dumps(c["body"])
               for c in model_calls(fake)[n:])
    archives = list((session.group / "conversations").glob("*.md"))
    assert len(archives) == 1 and "something worth keeping" in archives[0].read_text()
    clear = session.chat("/clear")
    assert session.reply_to(clear, SLOW)["text"] == "Session cleared."
    assert session.state("continuation:claude") is None
    fake.clear()
    after = session.chat("fresh")
    session.reply_to(after, SLOW)
    assert "something worth keeping" not in json.dumps(model_calls(fake)[0]["body"]["messages"])
    assert runner.text().count("claude cli starting") == 2  # /clear dropped the old CLI


def test_the_user_is_told_when_the_cli_compacts_on_its_own(session, fake, start):
    start(session)
    first = session.chat("a detail from long ago")
    session.reply_to(first, SLOW)
    fake.extra_input_tokens = 170_000  # replies now say the context is nearly full
    try:
        second = session.chat("and another thing")
        session.reply_to(second, SLOW)
        fake.extra_input_tokens = 0
        third = session.chat("still there?")
        wait_for(lambda: any("summarising the older part" in (r["text"] or "")
                             for r in session.out()), "the compaction notice", SLOW)
    finally:
        fake.extra_input_tokens = 0
    notice = next(r for r in session.out() if "summarising the older part" in (r["text"] or ""))
    assert (notice["channel_type"], notice["platform_id"]) == ("telegram", "tg:1")
    (kept,) = (session.group / "conversations").glob("*.md")
    assert kept.name in notice["text"] and "a detail from long ago" in kept.read_text()
    wait_for(lambda: any(r["in_reply_to"] == third and r["text"].startswith("echo: ")
                         and "still there?" in r["text"] for r in session.out()),
             "the answer after compaction", SLOW)


def test_the_cli_falls_back_to_the_fallback_model_and_the_user_is_told(tmp_path, fake):
    sess = Session(tmp_path, provider="claude", fallback_model="claude-fake-backup")
    runner = Runner(sess, fake.url)  # the CLI's own retries: it falls back after three 529s
    try:
        fake.inject(status=529, count=3, retry_after=0.01)
        mid = sess.chat("hello")
        wait_for(lambda: any(r["text"] == "echo: hello" for r in sess.out()), "the answer",
                 SLOW)
        texts = [r["text"] for r in sess.out() if r["in_reply_to"] == mid]
        assert ("(claude-fake-1 is still busy (overloaded), so claude-fake-backup answers"
                " for now.)") in texts
        models = [c["body"]["model"] for c in model_calls(fake)]
        assert models[:3] == ["claude-fake-1"] * 3 and models[3] == "claude-fake-backup"
    finally:
        assert runner.stop() == 0


def test_missing_sdk_is_a_visible_error(tmp_path, fake):
    """Without claude-agent-sdk the agent still answers: with a clear error."""
    sess = Session(tmp_path, provider="claude")
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "claude_agent_sdk.py").write_text("raise ImportError('not installed here')")
    runner = Runner(sess, fake.url, {"PYTHONPATH": f"{blocker}:{ROOT / 'container'}"})
    try:
        mid = sess.chat("hi")
        assert "needs claude-agent-sdk" in sess.reply_to(mid)["text"]
    finally:
        assert runner.stop() == 0
