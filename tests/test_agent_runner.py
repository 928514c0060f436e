"""The agent runner as a real subprocess (`anthropic` provider), with real session DBs and
the fake model: the poll loop's promises end to end.

Each test builds a session folder, starts `python -m agent_runner` with the environment
of container/README.md (ANTHROPIC_BASE_URL pointing at the fake), inserts rows the way
the host does, and polls outbound.db and the fake's request log with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from nanoclaw.devtools.runner_harness import (
    DEADLINE_S,
    Runner,
    Session,
    last_user_text,
    model_calls,
    wait_for,
)


@pytest.fixture
def session(tmp_path):
    return Session(tmp_path)


@pytest.fixture
def start(session, fake):
    runners: list[Runner] = []

    def _start(sess: Session | None = None, **env: str) -> Runner:
        r = Runner(sess or session, fake.url, {"NANOCLAW_MODEL_RETRIES": "1", **env})
        runners.append(r)
        return r

    yield _start
    for r in runners:
        rc = r.stop()
        assert rc == 0, r.text()


# --- turns and tools ---------------------------------------------------------------------

def test_chat_is_answered_to_origin_with_in_reply_to(session, fake, start):
    runner = start()
    mid = session.chat("hello <there> & you")
    row = session.reply_to(mid)
    assert row["text"] == "echo: hello <there> & you"
    assert (row["channel_type"], row["platform_id"], row["kind"]) == ("telegram", "tg:1", "chat")
    assert row["seq"] % 2 == 1 and row["id"].startswith("out-")
    assert row["timestamp"].endswith("Z")
    session.completed(mid)
    body = model_calls(fake)[0]["body"]
    prompt = last_user_text(model_calls(fake)[0])
    assert prompt.startswith('<context timezone="UTC"/>')
    assert 'from="tg-main" sender="Alice"' in prompt and "hello &lt;there&gt; &amp; you" in prompt
    assert "You are Andy" in body["system"] and '<message to="NAME">' in body["system"]
    names = {t["name"] for t in body["tools"]}
    assert {"bash", "read", "write", "edit", "glob", "grep", "web_fetch", "send_message",
            "ask_user_question", "schedule_task", "install_packages"} <= names
    assert os.path.exists(os.path.join(session.paths.work, ".heartbeat"))
    assert runner.proc.poll() is None


def test_send_message_tool_writes_a_row(session, fake, start):
    start()
    mid = session.chat('[[tool:send_message {"text":"hi"}]]')
    row = session.reply_to(mid)
    assert row["text"] == "hi"
    assert (row["channel_type"], row["platform_id"]) == ("telegram", "tg:1")
    session.completed(mid)
    calls = model_calls(fake)
    assert len(calls) == 2  # tool call, then the tool result; no nudge after a sent message
    assert calls[1]["body"]["messages"][-1]["content"][0]["content"].startswith("Message sent")
    assert [r["text"] for r in session.out()] == ["hi"]


def test_write_tool_writes_in_group_dir_and_bare_text_falls_back(session, fake, start):
    start()
    mid = session.chat('[[tool:write {"path":"notes/a.txt","content":"remember"}]]')
    row = session.reply_to(mid)
    assert (session.group / "notes" / "a.txt").read_text() == "remember"
    # "done: wrote …" is bare text: one nudge, then delivered to the only plausible origin
    assert row["text"].startswith("done: wrote 8 bytes")
    assert "Nothing you wrote was delivered" in last_user_text(model_calls(fake)[-1])


def test_tool_error_goes_back_to_the_model(session, fake, start):
    start()
    mid = session.chat('[[tool:write {"path":"/etc/nanoclaw-test","content":"x"}]]')
    session.reply_to(mid)
    result = model_calls(fake)[1]["body"]["messages"][-1]["content"][0]
    assert result["is_error"] is True and "outside the folders" in result["content"]
    assert not os.path.exists("/etc/nanoclaw-test")


# --- batching and the poll loop ----------------------------------------------------------

def test_pending_rows_are_batched_into_one_prompt(session, fake, start):
    ids = [session.chat(f"part {i}") for i in range(3)]
    start()
    session.reply_to(ids[-1])
    for mid in ids:
        session.completed(mid)
    calls = model_calls(fake)
    assert len(calls) == 1
    prompt = last_user_text(calls[0])
    assert prompt.count("<message ") == 3 and "<messages>" in prompt
    assert prompt.index("part 0") < prompt.index("part 2")


def test_trigger0_rows_ride_along(session, fake, start):
    ctx = session.chat("background chatter", trigger=False)
    runner = start()
    runner.wait_started()
    mid = session.chat("now answer")
    row = session.reply_to(mid)
    assert row["text"] == "echo: now answer"
    calls = model_calls(fake)
    assert len(calls) == 1
    assert "background chatter" in last_user_text(calls[0])
    session.completed(ctx)
    assert len(session.out()) == 1


def test_on_wake_rows_only_on_first_poll(session, fake, start):
    woke = session.chat("wake note", on_wake=True)
    start()
    session.reply_to(woke)
    late = session.chat("late wake note", on_wake=True)
    mid = session.chat("regular")
    session.reply_to(mid)
    assert all("late wake note" not in last_user_text(c) for c in model_calls(fake))
    assert late not in session.acks()


def test_system_rows_do_not_starve_chat(session, fake, start):
    for i in range(50):
        session.insert("system", {"type": "question_response", "questionId": f"q{i}"},
                       id=f"sys{i}")
    mid = session.chat("still there?")
    start()
    assert session.reply_to(mid)["text"] == "echo: still there?"
    assert not any(k.startswith("sys") for k in session.acks())


def test_follow_up_is_pushed_into_the_open_query(session, fake, start):
    runner = start()
    runner.wait_started()
    fake.inject(delay_ms=600)  # the first answer is slow: the second message arrives meanwhile
    first = session.chat("first")
    wait_for(lambda: model_calls(fake), "the first model call")
    second = session.chat("second")
    assert session.reply_to(first)["text"] == "echo: first"
    assert session.reply_to(second)["text"] == "echo: second"
    session.completed(second)
    assert "follow-up pushed n=1" in runner.text()
    calls = model_calls(fake)
    assert len(calls) == 2 and len(calls[1]["body"]["messages"]) == 3  # same conversation


def test_task_script_decides_whether_to_wake(session, fake, start):
    quiet = session.insert("task", {"prompt": "check quietly",
                                    "script": 'echo \'{"wakeAgent": false}\''})
    start()
    session.completed(quiet)
    loud = session.insert("task", {"prompt": "report it",
                                   "script": 'echo noise; echo \'{"wakeAgent": true, "data": 42}\''})
    row = session.reply_to(loud)
    assert row["text"].startswith("echo:") and "report it" in row["text"]
    prompts = [last_user_text(c) for c in model_calls(fake)]
    assert "Script output: 42" in prompts[0] and "<task " in prompts[0]
    assert not any("check quietly" in p for p in prompts)


def test_group_memory_is_composed_and_given_to_the_model(session, fake, start):
    (session.tmp / "global" / "CLAUDE.md").write_text("GLOBAL FACT: the user is Bob.")
    (session.group / "CLAUDE.md").write_text("MY NOTE: likes tea.")
    start()
    mid = session.chat("hi")
    session.reply_to(mid)
    composed = (session.group / ".claude" / "CLAUDE.md").read_text()
    assert "GLOBAL FACT" in composed and "ask_user_question" in composed
    assert "MY NOTE" not in composed  # the agent's own memory stays its own file
    system = model_calls(fake)[0]["body"]["system"]
    assert "GLOBAL FACT" in system and "MY NOTE" in system and "send_message" in system


def test_effort_reaches_the_model(session, fake, start):
    session.configure(effort="low")
    start()
    session.reply_to(session.chat("think a little"))
    assert model_calls(fake)[0]["body"]["output_config"] == {"effort": "low"}


# --- failures are visible ----------------------------------------------------------------

def test_overloaded_model_retries_visibly_then_fails_visibly(session, fake, start):
    fake.inject(status=529, count=2, retry_after=0.01)  # the first call and the one retry
    start()
    mid = session.chat("are you there")
    session.completed(mid)
    texts = [r["text"] for r in session.out()]
    assert texts[0].startswith("The model is busy (HTTP 529, overloaded); retrying")
    assert texts[1].startswith("Error: model overloaded/rate limited (HTTP 529")
    assert "gave up after 2 attempts" in texts[1]
    assert all(r["in_reply_to"] == mid for r in session.out())
    mid2 = session.chat("again")
    assert session.reply_to(mid2)["text"] == "echo: again"


def test_a_busy_model_falls_back_to_the_fallback_model_and_says_so(session, fake, start):
    session.configure(fallback_model="claude-fake-backup")
    fake.inject(status=529, count=2, retry_after=0.01)  # the first call and the one retry
    start()
    mid = session.chat("are you there")
    wait_for(lambda: len([r for r in session.out() if r["in_reply_to"] == mid]) == 3,
             "the retry notice, the fallback notice and the answer")
    texts = [r["text"] for r in session.out()]
    assert texts[0].startswith("The model is busy (HTTP 529, overloaded); retrying")
    assert texts[1] == ("(claude-fake-1 is still busy (overloaded), so claude-fake-backup"
                        " answers for now.)")
    assert texts[2] == "echo: are you there"
    assert [c["body"]["model"] for c in model_calls(fake)] == [
        "claude-fake-1", "claude-fake-1", "claude-fake-backup"]
    mid2 = session.chat("again")  # it stays on the fallback for a while, without a word
    assert session.reply_to(mid2)["text"] == "echo: again"
    assert model_calls(fake)[-1]["body"]["model"] == "claude-fake-backup"


def test_rate_limit_is_retried_after_retry_after(session, fake, start):
    fake.inject(status=429, retry_after=0.05)
    start()
    mid = session.chat("busy?")
    wait_for(lambda: len(session.out()) == 2, "notice and answer")
    texts = [r["text"] for r in session.out()]
    assert texts == ["The model is busy (HTTP 429, rate limited); retrying…", "echo: busy?"]
    assert all(r["in_reply_to"] == mid for r in session.out())


def test_a_model_that_stalls_mid_answer_is_given_up_then_retried(session, fake, start):
    """The answer's first events come, then silence: the call is given up after
    `model_stall_s` (container.json; the host's NANOCLAW_MODEL_STALL_TIMEOUT) and the
    retry's answer is the user's reply, once; the stalled one never reaches them."""
    session.configure(model_stall_s=1)
    fake.inject(stall_ms=8000)  # far longer than the bound
    start()
    mid = session.chat("still there?")
    assert session.reply_to(mid)["text"] == "echo: still there?"
    session.completed(mid)
    calls = model_calls(fake)
    assert len(calls) == 2 and calls[0]["body"]["messages"] == calls[1]["body"]["messages"]
    assert [r["text"] for r in session.out()].count("echo: still there?") == 1


def test_unknown_provider_answers_with_error(tmp_path, fake, start):
    sess = Session(tmp_path / "other", provider="gpt-9")
    start(sess)
    mid = sess.chat("hi")
    assert "unknown provider 'gpt-9'" in sess.reply_to(mid)["text"]
    sess.completed(mid)


# --- continuation ------------------------------------------------------------------------

def test_clear_command(session, fake, start):
    start()
    first = session.chat("remember me")
    session.reply_to(first)
    cont = wait_for(lambda: session.state("continuation:anthropic"), "continuation stored")
    conv = Path(session.paths.work) / ".provider" / f"anthropic-{cont}.json"
    assert conv.exists()
    clr = session.chat("/clear")
    assert session.reply_to(clr)["text"] == "Session cleared."
    assert session.state("continuation:anthropic") is None and not conv.exists()
    fake.clear()
    after = session.chat("fresh start")
    session.reply_to(after)
    assert len(model_calls(fake)[0]["body"]["messages"]) == 1


def test_a_full_context_sets_older_turns_aside_and_says_so(session, fake, start):
    start()
    for i in range(6):
        mid = session.chat(f"turn {i} " + "x" * 400)
        session.reply_to(mid)
    session.completed(mid)
    last = model_calls(fake)[-1]["body"]["messages"]
    fake.context_tokens = len(json.dumps(last)) // 4 + 1  # the next turn no longer fits
    fake.clear()
    mid = session.chat("turn 6 " + "x" * 400)
    wait_for(lambda: len([r for r in session.out() if r["in_reply_to"] == mid]) == 2,
             "a notice and the answer")
    notice, answer = [r["text"] for r in session.out() if r["in_reply_to"] == mid]
    assert notice.startswith("(My context was full, so I set aside the oldest 6 messages")
    assert answer.startswith("echo: ") and "turn 6" in answer
    rejected, accepted = model_calls(fake)
    assert len(rejected["body"]["messages"]) == 13 and len(accepted["body"]["messages"]) == 7
    first = accepted["body"]["messages"][0]
    assert first["role"] == "user" and "turn 3" in first["content"]
    (kept,) = (session.group / "conversations").glob("*.md")
    assert kept.name in notice
    text = kept.read_text()
    assert "turn 0" in text and "turn 2" in text and "turn 3" not in text
    # saved trimmed: a restart resumes from the shorter history
    cont = session.state("continuation:anthropic")
    saved = json.loads((Path(session.paths.work) / ".provider" / f"anthropic-{cont}.json")
                       .read_text())["messages"]
    assert len(saved) == 8 and "turn 3" in saved[0]["content"]


def test_a_prompt_too_long_on_its_own_is_a_clear_error(session, fake, start):
    start()
    fake.context_tokens = 200
    mid = session.chat("y" * 2000)
    text = session.reply_to(mid)["text"]
    assert text.startswith("Error: the conversation no longer fits the model's context")
    assert "/clear starts afresh" in text
    session.completed(mid)
    fake.context_tokens = None
    again = session.chat("short")
    assert "short" in session.reply_to(again)["text"]


def test_continuation_resumed_after_restart(session, fake, start):
    runner = start()
    first = session.chat("my name is Bob")
    session.reply_to(first)
    session.completed(first)
    assert runner.stop() == 0
    fake.clear()
    start()
    second = session.chat("what is my name")
    session.reply_to(second)
    messages = model_calls(fake)[0]["body"]["messages"]
    assert len(messages) == 3 and "my name is Bob" in messages[0]["content"]


def test_corrupt_continuation_is_recovered(session, fake, start):
    provider_dir = Path(session.paths.work) / ".provider"
    provider_dir.mkdir()
    (provider_dir / "anthropic-broken1.json").write_text("{not json")
    conn = sqlite3.connect(session.paths.outbound)
    conn.execute("INSERT INTO session_state VALUES ('continuation:anthropic', 'broken1', 'x')")
    conn.commit()
    conn.close()
    runner = start()
    mid = session.chat("hello again")
    assert session.reply_to(mid)["text"] == "echo: hello again"
    new = session.state("continuation:anthropic")
    assert new and new != "broken1"
    assert "continuation unusable" in runner.text()


def test_unknown_destination_is_reported_back_to_agent(session, fake, start):
    start()
    mid = session.chat("from a stranger", channel=("discord", "D1"))
    row = session.reply_to(mid)
    assert (row["channel_type"], row["platform_id"]) == ("discord", "D1")
    texts = [last_user_text(c) for c in model_calls(fake)]
    assert 'from="unknown:discord:D1"' in texts[0]
    assert "no destination is called" in texts[1]


def test_sigterm_exits_zero_and_clears_stale_claims(session, fake, start):
    conn = sqlite3.connect(session.paths.outbound)
    conn.execute("INSERT INTO processing_ack VALUES ('old', 'processing', '2020-01-01T00:00:00Z')")
    conn.commit()
    conn.close()
    runner = start()
    runner.wait_started()
    assert "old" not in session.acks()
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.proc.wait(timeout=DEADLINE_S) == 0


def test_anthropic_sdk_is_imported_lean(tmp_path):
    """The lazy import keeps the SDK's thousands of unused type modules out of memory."""
    import subprocess
    import sys

    from nanoclaw.devtools.runner_harness import ROOT

    code = ("import sys; from agent_runner.providers import anthropic as a;"
            "a.anthropic.Anthropic(api_key='x', base_url='http://127.0.0.1:9');"
            "print(len([m for m in sys.modules if m.startswith('anthropic')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "container")}, check=True)
    assert int(out.stdout.strip()) < 1500, out.stdout  # a plain `import anthropic`: ~3,400
    assert "aiohttp" not in json.dumps(out.stderr)


def test_a_claim_that_fails_beside_the_request_drops_the_turn_and_the_row_waits(
        session, fake, start):
    """A batch's claim commits on a helper thread while the model request is made. If it
    fails, nothing of that turn is written (its answer is dropped at the first write), the
    row stays pending and unclaimed, and the loop tries again: once claims work, the row
    is answered once."""
    runner = start()
    first = session.chat("first")
    assert session.reply_to(first)["text"] == "echo: first"
    session.completed(first)
    conn = sqlite3.connect(session.paths.outbound)
    conn.execute("CREATE TRIGGER refuse_claims BEFORE INSERT ON processing_ack"
                 " WHEN NEW.status='processing' BEGIN SELECT RAISE(ABORT, 'claims refused'); END")
    conn.commit()
    calls = len(model_calls(fake))
    mid = session.chat("second")
    wait_for(lambda: "claim failed: claims refused" in runner.text(), "the refused claim")
    assert len(model_calls(fake)) > calls  # the request went out beside the claim
    # (read raw: the host's reader refuses a file with a trigger, as it should)
    assert [r for (r,) in conn.execute("SELECT in_reply_to FROM messages_out")] == [first]
    assert not conn.execute("SELECT 1 FROM processing_ack WHERE message_id=?", (mid,)).fetchall()
    conn.execute("DROP TRIGGER refuse_claims")
    conn.commit()
    conn.close()
    assert session.reply_to(mid)["text"] == "echo: second"
    session.completed(mid)
    assert [r["in_reply_to"] for r in session.out()] == [first, mid]


def test_an_answer_and_the_rows_it_answers_are_one_commit(session, fake, start):
    """kill -9 between writing the answer and marking its rows done used to have the next
    runner answer them again (seen once in the chaos soak). The answer now marks them
    completed in its own transaction: a runner stopped right after it (no `complete`
    of its own) leaves nothing to answer twice."""
    import sys

    from nanoclaw.devtools.runner_harness import ROOT

    sys.path.insert(0, str(ROOT / "container"))
    from agent_runner.db import Address, Inbound, Outbound

    mid = session.chat("hello")
    inbound = Inbound(session.paths.inbound)
    outbound = Outbound(session.paths.outbound, inbound, session.paths.root)
    outbound.claim([mid])
    outbound.write_answer([("chat", {"text": "the answer"}, Address("telegram", "tg:1"), mid,
                            None)], [mid])
    # the runner is killed here, before its own complete(); the next one starts:
    assert outbound.delete_stale_claims() == 0
    start()
    later = session.chat("and now?")
    assert session.reply_to(later)["text"] == "echo: and now?"
    assert [last_user_text(c).count("hello") for c in model_calls(fake)] == [0]
    assert [r["text"] for r in session.out() if r["in_reply_to"] == mid] == ["the answer"]
