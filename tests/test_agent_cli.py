"""The agent's `ncl`: the runner's real tool writing its request, the host's real delivery
pass answering it (central DB + session DBs, no mocks), approvals decided as a click
would, and one run through a whole host with the fake model calling the tool."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from conftest import wait_for

from nanoclaw import config
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.approvals import requests as approvals
from nanoclaw.cli import agent as agent_cli
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.delivery.delivery import Delivery
from nanoclaw.devtools.runner_harness import ROOT
from nanoclaw.errors import NotAllowed
from nanoclaw.routing.router import Event, Router
from nanoclaw.util import local_user_id

sys.path.insert(0, str(ROOT / "container"))

from agent_runner import config as runner_config  # noqa: E402
from agent_runner.batch import Batch  # noqa: E402
from agent_runner.db import Inbound, Outbound  # noqa: E402
from agent_runner.tools import REGISTRY, Toolbox  # noqa: E402
from agent_runner.tools import ncl as ncl_tool  # noqa: E402

from dbread import db_row, db_rows

OWNER = local_user_id()


class World:
    """A host's databases with one live session of the default group `main`, the runner's
    toolbox pointed at that session, and the delivery worker's pass."""

    def __init__(self, tmp_path, monkeypatch) -> None:
        for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data",
                     "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                     "NANOCLAW_GROUPS_DIR": tmp_path / "groups"}.items():
            monkeypatch.setenv(k, str(v))
        self.settings = s = config.load()
        self.store = Store.open(s.data_dir)
        ensure_defaults(self.store, s)
        self.ag = db_row(self.store, "SELECT id FROM agent_groups")["id"]
        self.router = Router(self.store, s)
        (self.sid,) = self.router.route(Event("cli", "local", "m0", text="hi",
                                              sender_id=OWNER.split(":", 1)[1]))
        sess = self.store.session(self.sid)
        self.paths = sessiondb.of(s, sess)
        self.delivery = Delivery(self.store, s)
        env = {"NANOCLAW_SESSION_DIR": self.paths.work, "NANOCLAW_DB_DIR": self.paths.db,
               "NANOCLAW_GROUP_DIR": str(s.group_dir("main")),
               "NANOCLAW_GLOBAL_DIR": str(tmp_path / "groups" / "global"), "TZ": "UTC"}
        self.env = env
        cfg = runner_config.load(env)
        inbound = Inbound(cfg.inbound)
        self.tools = Toolbox(cfg, inbound, Outbound(cfg.outbound, inbound, cfg.session_dir))
        rows = inbound.pending("9999", include_on_wake=True)[::-1]
        self.tools.begin(Batch(rows, inbound.destinations(), inbound.routing()))

    def scope(self, scope: str) -> None:
        self.store.conn.execute("UPDATE container_configs SET cli_scope=? WHERE"
                                " agent_group_id=?", (scope, self.ag))

    def run_host(self, until, timeout: float = 15.0) -> None:
        """Drive the delivery worker's passes until `until()` holds."""
        end = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < end, "the host never answered"
            self.delivery.pass_once(time.time())
            time.sleep(0.005)

    def ncl(self, *args):
        """Call the `ncl` tool while the host answers; returns its ToolOutcome."""
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault(
            "out", self.tools.run("ncl", {"args": list(args)})))
        t.start()
        self.run_host(lambda: not t.is_alive())
        return box["out"]

    def ok(self, *args) -> str:
        out = self.ncl(*args)
        assert not out.is_error, out.text
        return out.text

    def refused(self, *args) -> str:
        out = self.ncl(*args)
        assert out.is_error and out.text.startswith("Error: "), out.text
        return out.text[len("Error: "):]

    def inbound(self) -> list[dict]:
        c = sqlite3.connect(self.paths.inbound)
        c.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in c.execute("SELECT * FROM messages_in ORDER BY seq")]
        finally:
            c.close()

    def notes(self) -> list[str]:
        return [json.loads(r["content"])["text"] for r in self.inbound()
                if r["channel_type"] == "agent"]

    def responses(self) -> list[dict]:
        return [json.loads(r["content"]) for r in self.inbound() if r["kind"] == "system"]

    def agent_writes(self, content: dict) -> None:
        """A raw request row, the way a hostile agent could write one (odd seq)."""
        ob = Outbound(self.paths.outbound, Inbound(self.paths.inbound))
        from agent_runner.db import Address

        ob.write_message("system", content, Address(None, None), None)

    def central(self) -> dict:
        """Everything an admin command could change, to prove nothing was written."""
        tables = ("agent_groups", "container_configs", "agent_group_members", "user_roles",
                  "users", "agent_destinations", "messaging_group_agents",
                  "pending_approvals", "channel_outbox")
        return {t: db_rows(self.store, f"SELECT * FROM {t}") for t in tables}


@pytest.fixture
def w(tmp_path, monkeypatch) -> World:
    return World(tmp_path, monkeypatch)


def _other(w: World) -> str:
    return w.store.create_agent_group("other", "other", "anthropic", "m", "o")


def _card(w: World) -> dict:
    rows = db_rows(w.store, "SELECT * FROM channel_outbox WHERE idem_key LIKE 'card:appr-%'")
    assert len(rows) == 1
    return {**rows[0], "body": json.loads(rows[0]["content"])}


# --- reads ---------------------------------------------------------------------------------
def test_the_tool_is_installed_and_documented():
    tool = REGISTRY.get("mcp__nanoclaw__ncl")
    assert tool is not None and not tool.local and "approval-pending" in tool.description
    text = (ROOT / "container" / "agent_runner" / "tools" / "instructions.md").read_text()
    assert "`ncl`" in text
    readme = (ROOT / "README.md").read_text()
    assert "--cli-scope" in readme and "`ncl`" in readme


def test_a_disabled_scope_hides_the_tool_and_its_instructions(tmp_path):
    """The host writes cli_scope into container.json; with `disabled` the agent is not
    offered `ncl` at all (the host refuses it anyway)."""
    from agent_runner import tools as runner_tools

    (tmp_path / "container.json").write_text(json.dumps({"cli_scope": "disabled"}))
    cfg = runner_config.load({"NANOCLAW_GROUP_DIR": str(tmp_path),
                              "NANOCLAW_SESSION_DIR": str(tmp_path)})
    assert cfg.cli_scope == "disabled"
    box = Toolbox(cfg, Inbound(str(tmp_path / "in.db")), None)  # type: ignore[arg-type]
    names = [spec["name"] for spec in box.specs()]
    assert "ncl" not in names and "send_message" in names
    assert box.run("ncl", {"args": ["groups", "list"]}).is_error
    text = runner_tools.instructions(cfg)
    assert "`ncl`" not in text and "agent_runner.ncl" not in text
    assert "Notes from the host" in text and "`create_agent`" in text
    (tmp_path / "container.json").write_text(json.dumps({"cli_scope": "bogus"}))
    cfg = runner_config.load({"NANOCLAW_GROUP_DIR": str(tmp_path),
                              "NANOCLAW_SESSION_DIR": str(tmp_path)})
    assert cfg.cli_scope == "group" and "`ncl`" in runner_tools.instructions(cfg)


def test_a_read_only_command_is_answered_at_once_and_acked(w):
    before = w.central()
    out = w.ok("groups", "list")
    assert w.ag in out and "main" in out and out.startswith("ID ")
    assert "(none)" not in out
    (resp,) = w.responses()
    assert resp["type"] == "cli_response" and resp["status"] == "ok"
    row = next(r for r in w.inbound() if r["kind"] == "system")
    assert row["trigger"] == 0  # the answer wakes nobody
    acks = dict(sqlite3.connect(w.paths.outbound).execute(
        "SELECT message_id, status FROM processing_ack").fetchall())
    assert acks[row["id"]] == "completed"
    assert w.central() == before
    assert w.notes() == []  # an answer, not a note
    # the own group is filled in where the command needs one
    assert "terminal" in w.ok("destinations", "list")
    assert "usage: ncl groups update" in w.ok("groups", "update", "--help")
    listing = w.ok("help")
    assert "groups list" in listing and "members add   (needs an admin approval)" in listing
    assert "roles" not in listing  # not in cli_scope group


def test_group_scope_keeps_to_its_own_group(w):
    other = _other(w)
    assert other not in w.ok("groups", "list")  # filtered to the own group
    before = w.central()
    for args, why in [
        (("destinations", "list", other), "only name your own agent group"),
        (("groups", "list", "--group", "other"), "only name your own agent group"),
        (("members", "add", OWNER, other), "only name your own agent group"),
        (("groups", "update", other, "--name", "x"), "only name your own agent group"),
        (("destinations", "add", "peer", "--agent", other), "only name your own agent group"),
        (("groups", "update", "--cli-scope", "global"), "cli_scope cannot be changed"),
        (("groups", "update", w.ag, "--cli-s=global"), "cli_scope cannot be changed"),
        (("roles", "list"), "outside this agent's cli_scope"),
        (("roles", "grant", "cli:me", "owner"), "outside this agent's cli_scope"),
        (("groups", "add", "sneaky"), "outside this agent's cli_scope"),
        (("mounts", "add", w.ag, "/"), "outside this agent's cli_scope"),
        (("usage",), "outside this agent's cli_scope"),
    ]:
        assert why in w.refused(*args), args
    assert w.central() == before


def test_disabled_scope_refuses_everything(w):
    w.scope("disabled")
    before = w.central()
    for args in (("groups", "list"), ("help",), ("members", "add", OWNER)):
        assert "ncl is disabled for this agent group" in w.refused(*args)
    assert w.central() == before


def test_global_scope_reaches_everything_but_host_only_verbs(w):
    w.scope("global")
    other = _other(w)
    assert other in w.ok("groups", "list")
    assert OWNER in w.ok("roles", "list")
    assert "token usage" in w.ok("usage")
    assert "an agent cannot answer approvals" in w.refused("approvals", "approve", "appr-1")
    assert "terminal only" in w.refused("init-first-agent", "--channel", "x")
    assert "unknown command 'run'" in w.refused("run")
    assert "unknown command 'service'" in w.refused("service", "install")


# --- changes need an admin -----------------------------------------------------------------
def test_a_change_is_approved_then_applied_and_its_output_reaches_the_agent(w):
    out = w.ok("groups", "update", "--name", "Helper")
    assert out.startswith("approval-pending: an admin was asked to approve"
                          f" `ncl groups update {w.ag} --name Helper`")
    assert w.store.agent_group(w.ag)["name"] == "main"  # not yet
    card = _card(w)
    assert (card["channel_type"], card["platform_id"]) == ("cli", "local")  # owner's DM
    assert f"ncl groups update {w.ag} --name Helper" in card["body"]["question"]
    (appr,) = db_rows(w.store, "SELECT * FROM pending_approvals")
    assert appr["action"] == "cli_command" and appr["approver_user_id"] == OWNER
    w.store.ensure_user("cli:mallory", "cli")
    with pytest.raises(NotAllowed):
        approvals.decide(w.store, w.settings, appr["approval_id"], "approve", "cli:mallory")
    assert w.store.agent_group(w.ag)["name"] == "main"
    assert approvals.decide(w.store, w.settings, appr["approval_id"], "approve",
                            OWNER) == "approved"
    assert w.store.agent_group(w.ag)["name"] == "Helper"
    (note,) = w.notes()
    assert note.startswith(f"Your command `ncl groups update {w.ag} --name Helper` was"
                           " approved and ran:")
    assert f"updated {w.ag}" in note
    wakes = db_rows(w.store, "SELECT * FROM container_requests WHERE session_id=? AND"
                      " action='wake'", (w.sid,))
    assert wakes  # the note wakes the agent


def test_members_add_with_the_own_group_filled_in(w):
    w.store.ensure_user("telegram:42", "telegram")
    assert w.ok("members", "add", "telegram:42").startswith("approval-pending")
    (appr,) = db_rows(w.store, "SELECT * FROM pending_approvals")
    assert json.loads(appr["payload"])["args"] == ["members", "add", "telegram:42", w.ag]
    approvals.decide(w.store, w.settings, appr["approval_id"], "approve", OWNER)
    assert db_row(w.store, "SELECT * FROM agent_group_members WHERE user_id='telegram:42' AND"
                      " agent_group_id=?", (w.ag,))
    assert "was approved and ran" in w.notes()[-1]


def test_an_approved_change_is_recorded_as_made_by_the_admin_who_approved_it(w):
    w.store.ensure_user("telegram:42", "telegram")
    w.store.ensure_user("telegram:7", "telegram")
    w.store.grant_role("telegram:7", "admin", w.ag, granted_by=OWNER)  # a group admin
    w.ok("members", "add", "telegram:42")
    (appr,) = db_rows(w.store, "SELECT * FROM pending_approvals")
    assert approvals.decide(w.store, w.settings, appr["approval_id"], "approve",
                            "telegram:7") == "approved"
    member = db_row(w.store, "SELECT * FROM agent_group_members WHERE user_id='telegram:42'")
    assert member["added_by"] == "telegram:7"  # not the terminal's user
    decided = db_row(w.store, "SELECT * FROM pending_approvals")
    assert decided["status"] == "approved" and decided["decided_by"] == "telegram:7"
    assert decided["decided_at"]


def test_a_rejected_change_is_told_and_not_applied(w):
    w.ok("groups", "update", "--name", "Helper")
    (appr,) = db_rows(w.store, "SELECT * FROM pending_approvals")
    assert approvals.decide(w.store, w.settings, appr["approval_id"], "reject",
                            OWNER) == "rejected"
    assert w.store.agent_group(w.ag)["name"] == "main"
    assert w.notes() == ["Your request 'cli_command' was rejected by an admin."]


def test_an_approval_is_checked_again_when_it_is_given(w):
    w.ok("groups", "update", "--name", "Helper")
    (appr,) = db_rows(w.store, "SELECT * FROM pending_approvals")
    w.scope("disabled")  # the owner switched ncl off meanwhile
    assert approvals.decide(w.store, w.settings, appr["approval_id"], "approve",
                            OWNER) == "approved, but it failed"
    assert w.store.agent_group(w.ag)["name"] == "main"
    assert "ncl is disabled" in w.notes()[-1]


def test_a_failing_approved_command_tells_the_agent_why(w):
    w.scope("global")
    w.ok("roles", "grant", "cli:ghost", "admin")
    (appr,) = db_rows(w.store, "SELECT * FROM pending_approvals")
    approvals.decide(w.store, w.settings, appr["approval_id"], "approve", OWNER)
    assert "ncl roles grant cli:ghost admin: unknown user 'cli:ghost'" in w.notes()[-1]
    assert db_rows(w.store, "SELECT * FROM user_roles WHERE user_id='cli:ghost'") == []


def test_cli_scope_is_an_admin_setting(w):
    from nanoclaw.cli.main import build_parser
    from nanoclaw.cli.ops_groups import groups_update

    a = build_parser().parse_args(["groups", "update", "main", "--cli-scope", "global"])
    groups_update(a, w.store, w.settings)
    assert agent_cli.scope_of(w.store, w.ag) == "global"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["groups", "update", "main", "--cli-scope", "root"])


# --- hostile input -------------------------------------------------------------------------
@pytest.mark.parametrize("args, why", [
    ("groups list", "args must be a list of strings"),
    ({"verb": "groups"}, "args must be a list of strings"),
    (None, "args must be a list of strings"),
    (["groups", 5], "every argument must be a string"),
    (["groups", ["list"]], "every argument must be a string"),
    (["x"] * 33, "too many arguments (33; at most 32)"),
    (["groups", "x" * 5000], "an argument is too long"),
    (["groups", "list\x00"], "NUL"),
    (["fly"], "unknown command 'fly'"),
    (["groups"], "groups needs one of: list, add, update, remove"),
    (["groups", "explode"], "unknown operation groups 'explode'"),
    (["groups", "list", "--bogus"], "ncl groups list: unrecognized arguments: --bogus"),
    (["destinations", "add", "a", "b", "c"], "unrecognized arguments"),
    (["groups", "update", "main", "--provider", "gpt; rm -rf /"], "invalid choice"),
])
def test_malformed_requests_get_one_line_and_write_nothing(w, args, why):
    before = w.central()
    w.agent_writes({"action": "cli", "args": args, "requestId": "req-x"})
    w.run_host(lambda: w.responses())
    (resp,) = w.responses()
    assert resp["status"] == "error" and resp["requestId"] == "req-x"
    assert why in resp["output"] and "\n" not in resp["output"], resp["output"]
    assert w.central() == before
    assert w.notes() == []
    assert sessiondb.SessionOutbound(w.paths).undelivered(sessiondb.SessionInbound(w.paths).delivered_ids()) == []  # the row is done, the worker carries on


def test_a_hostile_request_id_or_shape_never_breaks_the_worker(w):
    w.agent_writes({"action": "cli", "args": ["groups", "list"], "requestId": ["x"] * 1000})
    w.agent_writes({"action": "cli"})
    w.run_host(lambda: len(w.responses()) == 2)
    ok, missing = w.responses()
    assert ok["status"] == "ok" and ok["requestId"].startswith("out-")
    assert missing["status"] == "error" and "args must be a list" in missing["output"]


def test_the_tool_checks_what_it_can_and_times_out_cleanly(w):
    out = w.tools.run("ncl", {"args": ["groups", 5]})
    assert out.is_error and "`args[1]` must be a string" in out.text
    assert w.tools.run("ncl", {"args": ["x"] * 40}).is_error
    with pytest.raises(ncl_tool.ToolError, match="no answer from the host within 0.2 s"):
        ncl_tool.request(w.tools.ctx, ["groups", "list"], timeout=0.2)
    assert w.tools.timeout_ms("ncl", {"args": []}) == 45000


def test_ncl_from_the_shell(w):
    env = {**os.environ, **w.env, "PYTHONPATH": str(ROOT / "container")}
    proc = subprocess.Popen([sys.executable, "-m", "agent_runner.ncl", "destinations", "list"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    w.run_host(lambda: proc.poll() is not None, timeout=30)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "terminal" in out
    proc = subprocess.Popen([sys.executable, "-m", "agent_runner.ncl", "roles", "list"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    w.run_host(lambda: proc.poll() is not None, timeout=30)
    out, err = proc.communicate()
    assert proc.returncode == 1 and "outside this agent's cli_scope" in err


# --- through a real host -------------------------------------------------------------------
def test_end_to_end_through_a_host(host):
    c = host.client()
    reply = c.wait_reply(c.send('[[tool:ncl {"args": ["groups", "list"]}]]'))
    ag = host.q("SELECT id FROM agent_groups")[0]["id"]
    assert reply["text"].startswith("done: ID ") and ag in reply["text"]
    reply = c.wait_reply(c.send('[[tool:ncl {"args": ["groups", "update", "--name", "Ada"]}]]'))
    assert "approval-pending" in reply["text"]
    (appr,) = host.q("SELECT * FROM pending_approvals WHERE status='pending'")
    # the owner clicks Approve on the card: the router worker decides it
    conn = host.db()
    conn.execute("INSERT INTO inbound_events (channel_type, platform_id, message_id, kind,"
                 " payload, received_at) VALUES ('cli', 'local', 'click-1', 'action', ?,"
                 " '2026-01-01T00:00:00.000Z')", (json.dumps({
                     "question_id": appr["approval_id"], "option": "approve",
                     "user_id": OWNER}),))
    conn.commit()
    conn.close()
    wait_for(lambda: host.q("SELECT name FROM agent_groups WHERE id=?", (ag,))[0]["name"]
             == "Ada", 30, what="the approved rename")
    reply = c.wait_reply(c.send('[[tool:ncl {"args": ["members", "add", "cli:nobody"]}]]'))
    assert "approval-pending" in reply["text"]
    (appr,) = host.q("SELECT * FROM pending_approvals WHERE status='pending'")
    r = host.cli("approvals", "reject", appr["approval_id"])
    assert r.returncode == 0 and r.stdout.strip() == "rejected", r.stderr
    sess = host.q("SELECT * FROM sessions")[0]
    inbound = host.data / "sessions" / ag / sess["id"] / "db" / "inbound.db"
    conn = sqlite3.connect(inbound)
    notes = [json.loads(x[0])["text"] for x in conn.execute(
        "SELECT content FROM messages_in WHERE channel_type='agent'")]
    conn.close()
    assert any("was approved and ran" in n and f"updated {ag}" in n for n in notes)
    assert "Your request 'cli_command' was rejected by an admin." in notes
