"""The agent runner as a real subprocess, with real session DBs and the fake model.

Each test builds a session folder with `nanoclaw.sessiondb`, starts
`python -m agent_runner` with the environment of container/README.md (and
ANTHROPIC_BASE_URL pointing at the fake), inserts rows the way the host does, and polls
outbound.db and the fake's request log with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoclaw import sessiondb
from nanoclaw.devtools.fake_model import FakeModel

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 15.0


def wait_for(cond, what: str, timeout: float = DEADLINE_S):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def query(path: str, sql: str, args=()) -> list[dict]:
    if not os.path.exists(path):
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


class Session:
    """A session folder plus the group folder the runner works in."""

    def __init__(self, tmp: Path, provider: str = "anthropic") -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.paths = sessiondb.create(str(tmp / "session"))
        self.group = tmp / "group"
        self.group.mkdir()
        (tmp / "global").mkdir()
        (self.group / "container.json").write_text(json.dumps({
            "provider": provider, "model": "claude-fake-1", "assistant_name": "Andy",
            "agent_group_id": "ag-1", "max_messages_per_prompt": 10, "effort": None}))
        sessiondb.write_routing(self.paths, ("telegram", "tg:1", None), [
            {"name": "tg-main", "display_name": "Main chat", "type": "channel",
             "channel_type": "telegram", "platform_id": "tg:1", "agent_group_id": None},
            {"name": "ops", "display_name": "Ops", "type": "channel",
             "channel_type": "slack", "platform_id": "C9", "agent_group_id": None},
        ])
        self._n = 0

    def chat(self, text: str, channel=("telegram", "tg:1"), **kw) -> str:
        self._n += 1
        mid = kw.pop("id", f"m{self._n}")
        sessiondb.insert_message(self.paths, id=mid, kind=kw.pop("kind", "chat"),
                                 content=kw.pop("content", {"sender": "Alice", "text": text}),
                                 channel_type=channel[0], platform_id=channel[1], **kw)
        return mid

    def out(self) -> list[dict]:
        rows = query(self.paths.outbound, "SELECT * FROM messages_out ORDER BY seq")
        for r in rows:
            r["text"] = json.loads(r["content"]).get("text")
        return rows

    def acks(self) -> dict[str, str]:
        return {r["message_id"]: r["status"] for r in
                query(self.paths.outbound, "SELECT * FROM processing_ack")}

    def state(self, key: str):
        rows = query(self.paths.outbound, "SELECT value FROM session_state WHERE key=?", (key,))
        return rows[0]["value"] if rows else None

    def reply_to(self, mid: str) -> dict:
        return wait_for(lambda: next((r for r in self.out() if r["in_reply_to"] == mid), None),
                        f"a reply to {mid}")


class Runner:
    def __init__(self, session: Session, fake_url: str) -> None:
        self.session = session
        self.log = session.tmp / f"runner-{time.monotonic_ns()}.log"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT / "container"),
            "HOME": str(session.tmp),
            "NANOCLAW_SESSION_DIR": session.paths.root,
            "NANOCLAW_GROUP_DIR": str(session.group),
            "NANOCLAW_GLOBAL_DIR": str(session.tmp / "global"),
            "ANTHROPIC_BASE_URL": fake_url,
            "ANTHROPIC_API_KEY": "session-token",
            "TZ": "UTC",
        }
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent_runner"], env=env,
                                     stdout=self._fh, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self) -> None:
        wait_for(lambda: "started provider=" in self.text() or self.proc.poll() is not None,
                 "runner start")
        assert self.proc.poll() is None, self.text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._fh.close()
        return rc


@pytest.fixture(scope="module")
def model():
    fake = FakeModel(port=0).start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(model):
    model.clear()
    yield model
    model.clear()


@pytest.fixture
def session(tmp_path):
    return Session(tmp_path)


@pytest.fixture
def start(session, fake):
    runners: list[Runner] = []

    def _start(sess: Session | None = None) -> Runner:
        r = Runner(sess or session, fake.url)
        runners.append(r)
        return r

    yield _start
    for r in runners:
        rc = r.stop()
        assert rc == 0, r.text()


def last_user_text(request: dict) -> str:
    content = [m for m in request["body"]["messages"] if m["role"] == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content if isinstance(b, dict))


def model_calls(fake) -> list[dict]:
    return [r for r in list(fake.requests) if r["path"] == "/v1/messages"]


# --- tests ---------------------------------------------------------------------------------

def test_chat_is_answered_to_origin_with_in_reply_to(session, fake, start):
    runner = start()
    mid = session.chat("hello <there> & you")
    row = session.reply_to(mid)
    assert row["text"] == "echo: hello <there> & you"
    assert (row["channel_type"], row["platform_id"], row["kind"]) == ("telegram", "tg:1", "chat")
    assert row["seq"] % 2 == 1 and row["id"].startswith("out-")
    assert row["timestamp"].endswith("Z")
    wait_for(lambda: session.acks().get(mid) == "completed", "ack completed")
    body = model_calls(fake)[0]["body"]
    prompt = last_user_text(model_calls(fake)[0])
    assert prompt.startswith('<context timezone="UTC"/>')
    assert 'from="tg-main" sender="Alice"' in prompt and "hello &lt;there&gt; &amp; you" in prompt
    assert "You are Andy" in body["system"] and '<message to="NAME">' in body["system"]
    assert {t["name"] for t in body["tools"]} == {"send_message", "bash", "read", "write"}
    assert os.path.exists(session.paths.heartbeat)
    assert runner.proc.poll() is None


def test_send_message_tool_writes_a_row(session, fake, start):
    start()
    mid = session.chat('[[tool:send_message {"text":"hi"}]]')
    row = session.reply_to(mid)
    assert row["text"] == "hi"
    assert (row["channel_type"], row["platform_id"]) == ("telegram", "tg:1")
    wait_for(lambda: session.acks().get(mid) == "completed", "ack completed")
    calls = model_calls(fake)
    assert len(calls) == 2  # tool call, then the tool result; no nudge after a sent message
    assert calls[1]["body"]["messages"][-1]["content"][0]["content"].startswith("sent (seq ")
    assert [r["text"] for r in session.out()] == ["hi"]


def test_write_tool_writes_in_group_dir_and_bare_text_falls_back(session, fake, start):
    start()
    mid = session.chat('[[tool:write {"path":"notes/a.txt","content":"remember"}]]')
    row = session.reply_to(mid)
    assert (session.group / "notes" / "a.txt").read_text() == "remember"
    # "done: wrote …" is bare text: one nudge, then delivered to the only plausible origin
    assert row["text"].startswith("done: wrote 8 bytes")
    assert "Nothing you wrote was delivered" in last_user_text(model_calls(fake)[-1])


def test_write_outside_allowed_folders_is_a_tool_error(session, fake, start):
    start()
    mid = session.chat('[[tool:write {"path":"/etc/nanoclaw-test","content":"x"}]]')
    session.reply_to(mid)
    result = model_calls(fake)[1]["body"]["messages"][-1]["content"][0]
    assert result["is_error"] is True and "outside the folders" in result["content"]
    assert not os.path.exists("/etc/nanoclaw-test")


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
    assert "<messages>" in last_user_text(calls[0])
    wait_for(lambda: session.acks().get(ctx) == "completed", "context row completed")
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
        session.chat("", kind="system", id=f"sys{i}",
                     content={"type": "question_response", "questionId": f"q{i}"})
    mid = session.chat("still there?")
    start()
    assert session.reply_to(mid)["text"] == "echo: still there?"
    assert not any(k.startswith("sys") for k in session.acks())


def test_overloaded_model_gives_visible_error_and_completes(session, fake, start):
    fake.inject(status=529, count=3, retry_after=0.01)  # the first call and both SDK retries
    start()
    mid = session.chat("are you there")
    row = session.reply_to(mid)
    assert row["text"].startswith("Error: model overloaded/rate limited")
    wait_for(lambda: session.acks().get(mid) == "completed", "batch completed")
    mid2 = session.chat("again")
    assert session.reply_to(mid2)["text"] == "echo: again"


def test_clear_command(session, fake, start):
    start()
    first = session.chat("remember me")
    session.reply_to(first)
    cont = wait_for(lambda: session.state("continuation:anthropic"), "continuation stored")
    conv = Path(session.paths.root) / ".provider" / f"anthropic-{cont}.json"
    assert conv.exists()
    clr = session.chat("/clear")
    assert session.reply_to(clr)["text"] == "Session cleared."
    assert session.state("continuation:anthropic") is None and not conv.exists()
    fake.clear()
    after = session.chat("fresh start")
    session.reply_to(after)
    assert len(model_calls(fake)[0]["body"]["messages"]) == 1


def test_continuation_resumed_after_restart(session, fake, start):
    runner = start()
    first = session.chat("my name is Bob")
    session.reply_to(first)
    wait_for(lambda: session.acks().get(first) == "completed", "first batch completed")
    assert runner.stop() == 0
    fake.clear()
    start()
    second = session.chat("what is my name")
    session.reply_to(second)
    messages = model_calls(fake)[0]["body"]["messages"]
    assert len(messages) == 3 and "my name is Bob" in messages[0]["content"]


def test_corrupt_continuation_is_recovered(session, fake, start):
    provider_dir = Path(session.paths.root) / ".provider"
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


def test_claude_provider_stub_answers_with_error(tmp_path, fake, start):
    sess = Session(tmp_path / "claude", provider="claude")
    start(sess)
    mid = sess.chat("hi")
    assert "not available yet" in sess.reply_to(mid)["text"]
    wait_for(lambda: sess.acks().get(mid) == "completed", "batch completed")


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
