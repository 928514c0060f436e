"""Every agent tool, in process, against real session DBs: a valid call writes the right
row (or reads the right thing); an invalid one comes back as a clear tool error."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from pathlib import Path

import pytest

from nanoclaw.db import session as sessiondb
from nanoclaw.devtools.runner_harness import ROOT, Session, wait_for

sys.path.insert(0, str(ROOT / "container"))

from agent_runner import config as config_mod  # noqa: E402
from agent_runner.batch import Batch  # noqa: E402
from agent_runner.db import Inbound, Outbound  # noqa: E402
from agent_runner.tools import REGISTRY, Toolbox  # noqa: E402


class Box:
    def __init__(self, tmp: Path, tz: str = "UTC") -> None:
        self.s = Session(tmp)
        env = {"NANOCLAW_SESSION_DIR": self.s.paths.work, "NANOCLAW_DB_DIR": self.s.paths.db,
               "NANOCLAW_GROUP_DIR": str(self.s.group),
               "NANOCLAW_GLOBAL_DIR": str(tmp / "global"), "TZ": tz}
        self.config = config_mod.load(env)
        self.inbound = Inbound(self.config.inbound)
        self.outbound = Outbound(self.config.outbound, self.inbound, self.config.session_dir)
        self.tools = Toolbox(self.config, self.inbound, self.outbound)
        self.begin()

    def begin(self) -> None:
        rows = self.inbound.pending("9999", include_on_wake=True)[::-1]
        self.tools.begin(Batch(rows, self.inbound.destinations(), self.inbound.routing()))

    def run(self, tool: str, /, **args):
        return self.tools.run(tool, args)

    def ok(self, tool: str, /, **args) -> str:
        out = self.run(tool, **args)
        assert not out.is_error, out.text
        return out.text

    def error(self, tool: str, /, **args) -> str:
        out = self.run(tool, **args)
        assert out.is_error and out.text.startswith("Error: "), out.text
        return out.text

    def rows(self) -> list[dict]:
        return self.s.out()

    def last(self) -> dict:
        return self.rows()[-1]


@pytest.fixture
def box(tmp_path):
    b = Box(tmp_path)
    b.s.chat("hello", id="tgmsg-1:ag-1", thread_id="th-9")
    b.begin()
    return b


def test_every_tool_of_the_reference_is_installed():
    names = set(REGISTRY.tools)
    assert {"send_message", "send_file", "edit_message", "add_reaction", "send_card",
            "ask_user_question", "schedule_task", "list_tasks", "update_task", "cancel_task",
            "pause_task", "resume_task", "create_agent", "install_packages",
            "add_mcp_server"} <= names
    for tool in REGISTRY.tools.values():
        assert tool.schema["type"] == "object" and tool.description


# --- messaging ---------------------------------------------------------------------------

def test_send_message_defaults_to_the_conversation_with_thread_and_reply(box):
    assert box.ok("send_message", text="hi there").startswith("Message sent (id ")
    row = box.last()
    assert (row["kind"], row["channel_type"], row["platform_id"], row["thread_id"]) == (
        "chat", "telegram", "tg:1", "th-9")
    assert row["in_reply_to"] == "tgmsg-1:ag-1" and row["body"] == {"text": "hi there"}
    assert box.tools.sent == 1


def test_send_message_to_another_destination_answers_the_asker(box):
    box.ok("send_message", to="ops", text="FYI")
    row = box.last()
    assert (row["channel_type"], row["platform_id"], row["thread_id"]) == ("slack", "C9", None)
    assert row["in_reply_to"] == "tgmsg-1:ag-1"


def test_send_message_refuses_bad_input(box):
    assert "unknown destination 'nope'; known: ops, tg-main" in box.error(
        "send_message", to="nope", text="x")
    assert "`text` is required" in box.error("send_message")
    assert "`text` must not be empty" in box.error("send_message", text="  ")
    assert "`text` must be a string" in box.error("send_message", text=5)
    assert "unknown parameter(s) colour" in box.error("send_message", text="x", colour="red")
    assert "no tool called 'fly'" in box.error("fly")
    assert box.rows() == []


def test_send_file_copies_into_the_outbox(box):
    (box.s.group / "report.txt").write_text("numbers")
    assert box.ok("send_file", path="report.txt", text="here", filename="../q3 report.txt")
    row = box.last()
    assert row["body"] == {"files": ["q3 report.txt"], "text": "here"}
    copied = Path(box.s.paths.work) / "outbox" / row["id"] / "q3 report.txt"
    assert copied.read_text() == "numbers"
    assert "is not a file" in box.error("send_file", path="missing.txt")
    assert "outside the folders" in box.error("send_file", path="/etc/passwd")


def _deliver(box: Box, out_id: str, platform_id: str | None, status: str = "delivered") -> None:
    with sessiondb.transaction(box.s.paths.inbound) as conn:
        conn.execute("INSERT INTO delivered (message_out_id, platform_message_id, status,"
                     " delivered_at) VALUES (?,?,?, 'now')", (out_id, platform_id, status))


def test_edit_message_needs_a_delivered_message_of_ours(box):
    box.ok("send_message", text="draft")
    mine = box.last()
    assert "has not been delivered yet" in box.error("edit_message", messageId=mine["seq"],
                                                     text="final")
    _deliver(box, mine["id"], "tg-555")
    assert box.ok("edit_message", messageId=str(mine["seq"]), text="final")
    row = box.last()
    assert row["body"] == {"operation": "edit", "messageId": "tg-555", "text": "final"}
    assert (row["channel_type"], row["platform_id"], row["thread_id"]) == ("telegram", "tg:1",
                                                                           "th-9")
    user_seq = box.inbound.pending("9999", True)[0].seq
    assert "not sent by you" in box.error("edit_message", messageId=user_seq, text="x")
    assert "no message with id 999" in box.error("edit_message", messageId=999, text="x")
    assert "`messageId` must be a whole number" in box.error("edit_message", messageId="abc",
                                                             text="x")


def test_add_reaction_to_a_user_message_uses_its_platform_id(box):
    user_seq = box.inbound.pending("9999", True)[0].seq
    box.ok("add_reaction", messageId=user_seq, emoji="👍")
    assert box.last()["body"] == {"operation": "reaction", "messageId": "tgmsg-1",
                                  "emoji": "👍"}
    assert "`emoji` is required" in box.error("add_reaction", messageId=user_seq)


def test_send_card(box):
    card = {"title": "Weather", "description": "Sunny",
            "actions": [{"label": "Forecast", "url": "https://example.com/f"}]}
    box.ok("send_card", card=card)
    row = box.last()
    assert row["kind"] == "chat-sdk" and row["body"]["type"] == "card"
    assert row["body"]["card"] == card
    assert row["body"]["fallbackText"] == "Weather\n\nSunny\n\nForecast: https://example.com/f"
    assert "must start with http" in box.error("send_card", card={
        "title": "x", "actions": [{"label": "a", "url": "javascript:1"}]})
    assert "needs a title" in box.error("send_card", card={})
    assert "`card.actions[0].url` is required" in box.error("send_card", card={
        "title": "x", "actions": [{"label": "a"}]})


def test_ask_user_question_returns_the_chosen_option(box):
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", box.run(
        "ask_user_question", title="Lunch", question="Where?",
        options=["Pizza", {"label": "Sushi", "value": "sushi", "selectedLabel": "🍣 Sushi"}])))
    worker.start()
    card = wait_for(lambda: next((r for r in box.rows() if r["kind"] == "chat-sdk"), None),
                    "the question card")
    body = card["body"]
    assert body["type"] == "ask_question" and body["title"] == "Lunch"
    assert body["options"] == [
        {"label": "Pizza", "selectedLabel": "Pizza", "value": "Pizza"},
        {"label": "Sushi", "selectedLabel": "🍣 Sushi", "value": "sushi"}]
    assert card["in_reply_to"] == "tgmsg-1:ag-1" and card["thread_id"] == "th-9"
    box.s.insert("system", {"type": "question_response", "questionId": body["questionId"],
                            "selectedOption": "sushi", "userId": "telegram:alice"},
                 id="qr-1")
    worker.join(10)
    assert not result["out"].is_error
    assert result["out"].text.startswith("selectedOption: sushi (label: Sushi)")
    assert box.s.acks()["qr-1"] == "completed"


def test_ask_user_question_times_out_cleanly(box):
    out = box.run("ask_user_question", title="T", question="Q?", options=["a"], timeout=1)
    assert not out.is_error and out.text.startswith("No answer within 1 seconds")
    assert "needs at least 1 item" in box.error("ask_user_question", title="T",
                                                 question="Q", options=[])
    assert "used twice" in box.error("ask_user_question", title="T", question="Q",
                                     options=["a", "a"])
    assert "`timeout` must be between 1 and 3600" in box.error(
        "ask_user_question", title="T", question="Q", options=["a"], timeout=0)
    assert box.tools.timeout_ms("mcp__nanoclaw__ask_user_question", {"timeout": 5}) == 15000


# --- scheduling --------------------------------------------------------------------------

def _action(box: Box) -> dict:
    row = box.last()
    assert row["kind"] == "system" and row["in_reply_to"] == "tgmsg-1:ag-1"
    assert row["body"]["requestId"].startswith("req-")
    return row["body"]


def test_schedule_task_in_the_users_timezone(tmp_path):
    box = Box(tmp_path, tz="Europe/Paris")
    box.s.chat("remind me", id="tgmsg-1:ag-1")
    box.begin()
    box.ok("schedule_task", prompt="stretch", processAfter="2030-01-15T09:00",
           recurrence="0 9 * * 1-5")
    body = _action(box)
    assert body["action"] == "schedule_task" and body["prompt"] == "stretch"
    assert body["processAfter"] == "2030-01-15T08:00:00.000Z"  # 09:00 in Paris, winter
    assert body["recurrence"] == "0 9 * * 1-5" and "script" not in body
    assert "not an ISO date-time" in box.error("schedule_task", prompt="x",
                                               processAfter="tomorrow")
    assert "not a cron expression" in box.error("schedule_task", prompt="x",
                                                processAfter="2030-01-01T00:00Z",
                                                recurrence="every day")
    assert "out of range 0-23" in box.error("schedule_task", prompt="x",
                                            processAfter="2030-01-01T00:00Z",
                                            recurrence="0 25 * * *")
    assert "`processAfter` is required" in box.error("schedule_task", prompt="x")


def _task(box: Box, tid: str, status: str = "pending", **kw) -> None:
    sessiondb.SessionInbound(box.s.paths).insert(id=tid, kind="task",
                             content={"prompt": f"do {tid}", "script": None},
                             process_after="2030-01-01T10:00:00.000Z", **kw)
    if status != "pending":
        with sessiondb.transaction(box.s.paths.inbound) as conn:
            conn.execute("UPDATE messages_in SET status=? WHERE id=?", (status, tid))


def test_list_tasks_one_line_per_series(box):
    assert box.ok("list_tasks") == "No tasks."
    _task(box, "task-a", recurrence="0 10 * * *")
    _task(box, "task-b", status="paused")
    out = box.ok("list_tasks")
    assert "task-a: pending; next run Jan 1, 2030, 10:00 AM; repeats '0 10 * * *'" in out
    assert "do task-a" in out and "task-b: paused" in out
    assert "task-a" not in box.ok("list_tasks", status="paused")
    assert "must be one of" in box.error("list_tasks", status="sleeping")


def test_task_changes_are_system_actions(box):
    _task(box, "task-a")
    _task(box, "task-p", status="paused")
    box.ok("update_task", taskId="task-a", prompt="do better", recurrence="",
           processAfter="2031-02-03T04:05:06Z")
    body = _action(box)
    assert {k: body[k] for k in ("action", "taskId", "prompt", "recurrence", "processAfter")} \
        == {"action": "update_task", "taskId": "task-a", "prompt": "do better",
            "recurrence": "", "processAfter": "2031-02-03T04:05:06.000Z"}
    assert "nothing to change" in box.error("update_task", taskId="task-a")
    assert "no active task 'task-z'" in box.error("update_task", taskId="task-z", prompt="x")
    for name, tid in (("cancel_task", "task-a"), ("pause_task", "task-a"),
                      ("resume_task", "task-p")):
        box.ok(name, taskId=tid)
        assert _action(box) | {"requestId": None} == {"action": name, "taskId": tid,
                                                       "requestId": None}
    assert "is pending, not paused" in box.error("resume_task", taskId="task-a")
    assert "is paused, not pending" in box.error("pause_task", taskId="task-p")


# --- self-modification -------------------------------------------------------------------

def test_create_agent(box):
    box.ok("create_agent", name="Research Bot", instructions="Dig deep.")
    body = _action(box)
    assert body["action"] == "create_agent" and body["name"] == "Research Bot"
    assert body["instructions"] == "Dig deep."
    assert "already have a destination named 'ops'" in box.error("create_agent", name="OPS")
    assert "no letters or digits" in box.error("create_agent", name="!!!")


def test_install_packages(box):
    box.ok("install_packages", apt=["ffmpeg", "libxml2-dev"], npm=["@scope/pkg"],
           reason="video")
    body = _action(box)
    assert body["apt"] == ["ffmpeg", "libxml2-dev"] and body["npm"] == ["@scope/pkg"]
    assert body["reason"] == "video" and body["action"] == "install_packages"
    assert "at least one package" in box.error("install_packages", reason="x")
    assert "at most 20 packages" in box.error("install_packages",
                                              apt=[f"p{i}" for i in range(21)])
    assert "not a valid apt package name" in box.error("install_packages", apt=["rm -rf /"])
    assert "not a valid npm package name" in box.error("install_packages", npm=["Bad Name"])
    assert "not a valid npm package name" in box.error("install_packages", npm=["pkg@1.0"])


def test_add_mcp_server(box):
    box.ok("add_mcp_server", name="notes", command="npx", args=["-y", "notes-mcp"],
           env={"NOTES_DIR": "/workspace/agent/notes"})
    body = _action(box)
    assert body == {"action": "add_mcp_server", "name": "notes", "command": "npx",
                    "args": ["-y", "notes-mcp"], "env": {"NOTES_DIR": "/workspace/agent/notes"},
                    "requestId": body["requestId"]}
    assert "not 'nanoclaw'" in box.error("add_mcp_server", name="nanoclaw", command="x")
    assert "not a valid variable name" in box.error("add_mcp_server", name="a", command="x",
                                                    env={"1BAD": "v"})
    assert "`env.K` must be a string" in box.error("add_mcp_server", name="a", command="x",
                                                   env={"K": 1})


# --- shell and files (anthropic provider) ------------------------------------------------

def test_file_tools(box):
    g = box.s.group
    box.ok("write", path="notes/todo.md", content="buy milk\nbuy eggs\n")
    assert "replaced 1" in box.ok("edit", path="notes/todo.md", old_string="milk",
                                  new_string="oat milk")
    assert "occurs 2 times" in box.error("edit", path="notes/todo.md", old_string="buy",
                                         new_string="get")
    assert (g / "notes" / "todo.md").read_text() == "buy oat milk\nbuy eggs\n"
    assert box.ok("read", path="notes/todo.md", offset=2) == "     2\tbuy eggs"
    assert box.ok("glob", pattern="**/*.md").endswith("notes/todo.md")
    assert box.ok("grep", pattern="EGGS", ignore_case=True).endswith("todo.md:2:buy eggs")
    assert "belongs to the runner" in box.error("write", path=box.s.paths.outbound,
                                                content="x")
    out = box.ok("bash", command="echo $((6*7)); pwd")
    assert out == f"exit code 0\n42\n{g}\n"
    assert "timed out after 1 s" in box.error("bash", command="sleep 5", timeout=1)


def test_web_fetch(box, tmp_path):
    (tmp_path / "page.html").write_text("<html><head><script>x()</script></head>"
                                        "<body><h1>Title</h1><p>Hello web</p></body></html>")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert box.ok("web_fetch", url=f"{base}/page.html") == "Title\nHello web"
        assert "HTTP 404" in box.error("web_fetch", url=f"{base}/missing")
        assert "must start with http" in box.error("web_fetch", url="file:///etc/passwd")
    finally:
        server.shutdown()
        server.server_close()


def test_specs_are_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    for tool in REGISTRY.tools.values():
        jsonschema.Draft7Validator.check_schema(tool.schema)
        json.dumps(tool.spec())
