"""Access, approvals, questions, agent-to-agent and scheduling on real databases
(central DB + session DBs), driving the router and delivery as the workers do."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from dbread import db_row, db_rows
from nanoclaw import config
from nanoclaw.agents import scheduling
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.delivery.delivery import Delivery
from nanoclaw.errors import NotAllowed
from nanoclaw.routing.router import Event, Router
from nanoclaw.util import local_user_id

OWNER = local_user_id()


@pytest.fixture
def env(tmp_path, monkeypatch):
    for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data", "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                 "NANOCLAW_GROUPS_DIR": tmp_path / "groups", "NANOCLAW_TIMEZONE": "Europe/Paris",
                 "NANOCLAW_AGENT_PAIR_LIMIT": "5"}.items():
        monkeypatch.setenv(k, str(v))
    s = config.load()
    store = Store.open(s.data_dir)
    ensure_defaults(store, s)
    ag = db_row(store, "SELECT id FROM agent_groups")["id"]
    return store, s, Router(store, s), ag


def _paths(store, s, sid) -> sessiondb.SessionPaths:
    sess = store.session(sid)
    return sessiondb.SessionPaths(str(s.session_dir(sess["agent_group_id"], sid)))


def _inbound(p: sessiondb.SessionPaths) -> list[dict]:
    c = sqlite3.connect(p.inbound)
    c.row_factory = sqlite3.Row
    return [dict(r) for r in c.execute("SELECT * FROM messages_in ORDER BY seq")]


def _agent_writes(p: sessiondb.SessionPaths, content: dict, kind="chat", in_reply_to=None,
                  channel_type=None, platform_id=None) -> str:
    """Write a messages_out row the way the agent runner does (odd seq)."""
    c = sqlite3.connect(p.outbound)
    top = max(c.execute("SELECT COALESCE(MAX(seq),0) FROM messages_out").fetchone()[0],
              sqlite3.connect(p.inbound).execute("SELECT COALESCE(MAX(seq),0) FROM messages_in")
              .fetchone()[0])
    mid = f"out-{time.time_ns()}"
    c.execute("INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, platform_id,"
              " channel_type, content) VALUES (?,?,?,?,?,?,?,?)",
              (mid, top + 1 if top % 2 == 0 else top + 2, in_reply_to, "2026-01-01T00:00:00.000Z",
               kind, platform_id, channel_type, json.dumps(content)))
    c.commit()
    return mid


def _telegram_chat(store, ag, policy="strict", group=True):
    mg = store.create_messaging_group("telegram", "telegram:-100", "team", group, policy)
    store.wire(mg, ag, destination="team")
    return mg


def _tg(text, mid, sender="42", name="Zoe", mention=True):
    return Event("telegram", "telegram:-100", mid, text=text, sender_id=sender,
                 sender_name=name, is_mention=mention, is_group=True)


def test_access_table(env):
    store, s, r, ag = env
    other = store.create_agent_group("other", "other", "anthropic", "m", "o")
    for uid in ("t:owner", "t:gadmin", "t:sadmin", "t:member", "t:stranger", "t:otheradmin"):
        store.ensure_user(uid, "t")
    store.grant_role("t:owner", "owner")
    store.grant_role("t:gadmin", "admin")
    store.grant_role("t:sadmin", "admin", ag)
    store.grant_role("t:otheradmin", "admin", other)
    store.conn.execute("INSERT INTO agent_group_members VALUES ('t:member', ?, NULL, 'x')", (ag,))
    got = {u: store.can_access(u, ag) for u in
           (None, "t:owner", "t:gadmin", "t:sadmin", "t:member", "t:stranger", "t:otheradmin")}
    assert got == {None: False, "t:owner": True, "t:gadmin": True, "t:sadmin": True,
                   "t:member": True, "t:stranger": False, "t:otheradmin": False}
    admin = {u: store.is_admin(u, ag) for u in ("t:sadmin", "t:member", "t:otheradmin")}
    assert admin == {"t:sadmin": True, "t:member": False, "t:otheradmin": False}
    with pytest.raises(sqlite3.IntegrityError):  # an owner row must be global
        store.grant_role("t:member", "owner", ag)


def test_public_policy_lets_strangers_in_but_known_scope_does_not(env):
    store, s, r, ag = env
    mg = _telegram_chat(store, ag, policy="public")
    assert len(r.route(_tg("hi", "p1"))) == 1
    store.conn.execute("UPDATE messaging_group_agents SET sender_scope='known' WHERE"
                       " messaging_group_id=?", (mg,))
    assert r.route(_tg("hi again", "p2")) == []


def test_unknown_sender_approval_checks_the_clicker_and_replays(env):
    store, s, r, ag = env
    _telegram_chat(store, ag, policy="request_approval")
    assert r.route(_tg("hello bot", "u1")) == []
    card = db_row(store, "SELECT * FROM channel_outbox WHERE idem_key LIKE 'card:%'")
    assert card and card["channel_type"] == "cli"  # the owner's DM is the terminal
    qid = json.loads(card["content"])["questionId"]
    assert r.route(_tg("again", "u2")) == []  # asked once only
    assert len(db_rows(store, "SELECT * FROM pending_sender_approvals")) == 1
    # a random member of the chat clicks Allow: nothing changes
    click = Event("telegram", "telegram:-100", "c1", kind="action",
                  payload={"question_id": qid, "option": "allow", "user_id": "77"})
    r.route(click)
    assert db_row(store, "SELECT 1 AS x FROM agent_group_members WHERE user_id='telegram:42'") is None
    assert len(db_rows(store, "SELECT * FROM pending_sender_approvals")) == 1
    notice = db_row(store, "SELECT content FROM channel_outbox WHERE idem_key LIKE 'notice:%'")
    assert "Only the approver" in json.loads(notice["content"])["text"]
    # the owner (the chosen approver) allows: member added, first message replayed
    r.route(Event("cli", "local", "c2", kind="action",
                  payload={"question_id": qid, "option": "allow",
                           "user_id": OWNER.split(":", 1)[1]}))
    assert db_row(store, "SELECT 1 AS x FROM agent_group_members WHERE user_id='telegram:42'")
    sid = db_row(store, "SELECT id FROM sessions WHERE messaging_group_id IS NOT NULL AND"
                   " messaging_group_id != (SELECT id FROM messaging_groups WHERE"
                   " channel_type='cli')")["id"]
    texts = [json.loads(x["content"])["text"] for x in _inbound(_paths(store, s, sid))]
    assert texts == ["hello bot"]


def test_unknown_channel_approval_connects_and_replays(env):
    store, s, r, ag = env
    ev = Event("telegram", "telegram:-200", "n1", text="@bot hi", sender_id="9",
               is_mention=True, is_group=True)
    assert r.route(ev) == []
    card = db_row(store, "SELECT * FROM channel_outbox WHERE idem_key LIKE 'card:chan-%'")
    content = json.loads(card["content"])
    assert [o["value"] for o in content["options"]] == [f"connect:{ag}", "new", "reject"]
    r.route(Event("cli", "local", "k1", kind="action",
                  payload={"question_id": content["questionId"], "option": f"connect:{ag}",
                           "user_id": OWNER.split(":", 1)[1]}))
    w = db_row(store, "SELECT * FROM messaging_group_agents WHERE messaging_group_id=(SELECT id"
                 " FROM messaging_groups WHERE platform_id='telegram:-200')")
    assert (w["engage_mode"], w["sender_scope"], w["ignored_message_policy"]) == \
        ("mention-sticky", "known", "accumulate")
    assert db_row(store, "SELECT 1 AS x FROM agent_group_members WHERE user_id='telegram:9'")
    assert len(db_rows(store, "SELECT * FROM sessions")) == 1  # the replay created the session


def test_connect_new_agent_takes_the_next_direct_message_as_its_name(env):
    store, s, r, ag = env
    owner = OWNER.split(":", 1)[1]
    r.route(Event("telegram", "telegram:-300", "n1", text="@bot hello team", sender_id="9",
                  is_mention=True, is_group=True))
    card = json.loads(db_row(store, "SELECT * FROM channel_outbox WHERE idem_key LIKE"
                               " 'card:chan-%'")["content"])
    r.route(Event("cli", "local", "k1", kind="action",  # a stranger's click changes nothing
                  payload={"question_id": card["questionId"], "option": "new", "user_id": "x"}))
    assert db_row(store, "SELECT naming_by FROM pending_channel_approvals")["naming_by"] is None
    r.route(Event("cli", "local", "k2", kind="action",
                  payload={"question_id": card["questionId"], "option": "new",
                           "user_id": owner}))
    ask = db_row(store, "SELECT * FROM channel_outbox WHERE idem_key LIKE 'name-ask:%'")
    assert (ask["channel_type"], ask["platform_id"]) == ("cli", "local")
    groups = len(db_rows(store, "SELECT * FROM agent_groups"))
    sessions = len(db_rows(store, "SELECT * FROM sessions"))
    # a symbol-only name is refused and asked again; the message reaches no agent
    assert r.route(Event("cli", "local", "d1", text="!!!", sender_id=owner)) == []
    assert db_row(store, "SELECT 1 AS x FROM channel_outbox WHERE idem_key LIKE 'name-bad:%'")
    assert r.route(Event("cli", "local", "d2", text="Team Helper", sender_id=owner)) == []
    assert len(db_rows(store, "SELECT * FROM sessions")) == sessions + 1  # only the replay's
    new = db_row(store, "SELECT * FROM agent_groups WHERE name='team-helper'")
    assert new and len(db_rows(store, "SELECT * FROM agent_groups")) == groups + 1
    assert (s.groups_dir / new["folder"]).is_dir()
    w = db_row(store, "SELECT * FROM messaging_group_agents WHERE messaging_group_id=(SELECT id"
                 " FROM messaging_groups WHERE platform_id='telegram:-300')")
    assert w["agent_group_id"] == new["id"]
    (sess,) = db_rows(store, "SELECT * FROM sessions WHERE agent_group_id=?", (new["id"],))
    assert any("hello team" in x["content"] for x in _inbound(_paths(store, s, sess["id"])))
    assert db_rows(store, "SELECT * FROM pending_channel_approvals") == []
    # the owner's next direct message goes to their own agent again
    assert r.route(Event("cli", "local", "d3", text="back to normal", sender_id=owner))


def test_the_owners_cards_reach_the_web_chat_too_once_it_is_used(env):
    store, s, r, ag = env
    owner = OWNER.split(":", 1)[1]
    r.route(Event("telegram", "telegram:-400", "n1", text="@bot hi", sender_id="9",
                  is_mention=True, is_group=True))
    assert [c["channel_type"] for c in db_rows(store, "SELECT * FROM channel_outbox WHERE idem_key"
                                               " LIKE 'card:%'")] == ["cli"]  # no web chat yet
    store.conn.execute("DELETE FROM pending_channel_approvals")
    store.conn.execute("DELETE FROM channel_outbox")
    from nanoclaw.channels.web import ensure_web_chat

    ensure_web_chat(store, "local")  # what the page does when it is first used
    r.route(Event("telegram", "telegram:-401", "n2", text="@bot hi", sender_id="9",
                  is_mention=True, is_group=True))
    cards = db_rows(store, "SELECT * FROM channel_outbox WHERE idem_key LIKE 'card:%' ORDER BY id")
    assert [(c["channel_type"], c["platform_id"]) for c in cards] == \
        [("cli", "local"), ("web", "local")]
    qid = json.loads(cards[1]["content"])["questionId"]
    assert qid == json.loads(cards[0]["content"])["questionId"]
    r.route(Event("web", "local", "c1", kind="action",  # answered on the page
                  payload={"question_id": qid, "option": f"connect:{ag}", "user_id": OWNER}))
    assert db_row(store, "SELECT 1 AS x FROM messaging_group_agents WHERE messaging_group_id=(SELECT"
                    " id FROM messaging_groups WHERE platform_id='telegram:-401')")
    r.route(Event("cli", "local", "c2", kind="action",  # then late in the terminal
                  payload={"question_id": qid, "option": "reject", "user_id": owner}))
    notice = db_row(store, "SELECT * FROM channel_outbox WHERE idem_key='notice:cli:c2'")
    assert "already decided" in json.loads(notice["content"])["text"]
    assert db_row(store, "SELECT denied_at FROM messaging_groups WHERE platform_id='telegram:-401'"
                    )["denied_at"] is None


def test_question_click_answers_only_for_allowed_users(env):
    store, s, r, ag = env
    (sid,) = r.route(Event("cli", "local", "q0", text="ask me", sender_id=OWNER.split(":")[1],
                           is_mention=True))
    p = _paths(store, s, sid)
    _agent_writes(p, {"type": "ask_question", "questionId": "q-1", "title": "Pick",
                      "question": "Which?", "options": [{"label": "A", "value": "a"}]},
                  kind="chat-sdk", channel_type="cli", platform_id="local")
    Delivery(store, s).pass_once(time.time())
    assert db_row(store, "SELECT * FROM pending_questions WHERE question_id='q-1'")
    r.route(Event("cli", "local", "x1", kind="action",
                  payload={"question_id": "q-1", "option": "a", "user_id": "intruder"}))
    assert not [x for x in _inbound(p) if x["kind"] == "system"]
    r.route(Event("cli", "local", "x2", kind="action",
                  payload={"question_id": "q-1", "option": "a",
                           "user_id": OWNER.split(":", 1)[1]}))
    (resp,) = [x for x in _inbound(p) if x["kind"] == "system"]
    assert json.loads(resp["content"]) == {"type": "question_response", "questionId": "q-1",
                                           "selectedOption": "a", "userId": OWNER}
    assert db_row(store, "SELECT * FROM pending_questions WHERE question_id='q-1'") is None


def test_agent_ping_pong_stops_at_the_guard(env, caplog):
    store, s, r, ag = env
    other = store.create_agent_group("helper", "helper", "anthropic", "m", "h")
    store.add_agent_destination(ag, "helper", other)
    store.add_agent_destination(other, "parent", ag)
    (sid,) = r.route(Event("cli", "local", "a0", text="start", sender_id=OWNER.split(":")[1],
                           is_mention=True))
    d = Delivery(store, s)
    p = _paths(store, s, sid)
    sent = 0
    for i in range(8):
        _agent_writes(p, {"text": f"ping {i}"}, channel_type="agent", platform_id=other)
        d.pass_once(time.time())
    target = db_row(store, "SELECT id FROM sessions WHERE agent_group_id=?", (other,))["id"]
    sent = len(_inbound(_paths(store, s, target)))
    assert sent == 5  # NANOCLAW_AGENT_PAIR_LIMIT
    notes = [json.loads(x["content"])["text"] for x in _inbound(p)
             if x["channel_type"] == "agent"]
    assert any("loop guard" in n for n in notes)
    # the reply path: the helper answers the last ping; it returns to the origin session
    tp = _paths(store, s, target)
    last = _inbound(tp)[-1]
    _agent_writes(tp, {"text": "pong"}, channel_type="agent", platform_id=ag,
                  in_reply_to=last["id"])
    d.pass_once(time.time())
    back = [json.loads(x["content"])["text"] for x in _inbound(p)]
    assert "pong" in back


def test_scheduling_actions_and_naive_times(env):
    store, s, r, ag = env
    (sid,) = r.route(Event("cli", "local", "s0", text="remind me", sender_id=OWNER.split(":")[1],
                           is_mention=True))
    p = _paths(store, s, sid)
    d = Delivery(store, s)
    _agent_writes(p, {"action": "schedule_task", "prompt": "water plants",
                      "processAfter": "2030-06-01T09:00:00", "recurrence": "0 9 * * *"},
                  kind="system", in_reply_to=f"s0:{ag}")
    d.pass_once(time.time())
    (task,) = [x for x in _inbound(p) if x["kind"] == "task"]
    assert task["process_after"] == "2030-06-01T07:00:00.000Z"  # 09:00 Paris (CEST)
    assert (task["channel_type"], task["platform_id"]) == ("cli", "local")
    for action, status in (("pause_task", "paused"), ("resume_task", "pending")):
        _agent_writes(p, {"action": action, "taskId": task["id"]}, kind="system")
        d.pass_once(time.time())
        assert sessiondb.SessionInbound(p).message(task["id"])["status"] == status
    _agent_writes(p, {"action": "update_task", "taskId": task["id"], "prompt": "water roses"},
                  kind="system")
    d.pass_once(time.time())
    assert json.loads(sessiondb.SessionInbound(p).message(task["id"])["content"])["prompt"] == "water roses"
    _agent_writes(p, {"action": "cancel_task", "taskId": "task-nope"}, kind="system")
    _agent_writes(p, {"action": "schedule_task", "prompt": "x", "recurrence": "every day"},
                  kind="system")
    d.pass_once(time.time())
    notes = [json.loads(x["content"])["text"] for x in _inbound(p) if x["channel_type"] == "agent"]
    assert any("no live task" in n for n in notes)
    assert any("not a valid cron" in n for n in notes)


def test_recurrence_clones_once_and_skips_missed_runs(env):
    store, s, r, ag = env
    (sid,) = r.route(Event("cli", "local", "r0", text="hi", sender_id=OWNER.split(":")[1],
                           is_mention=True))
    p = _paths(store, s, sid)
    now = time.time()
    tid = scheduling.schedule(p, prompt="tick", process_after="2020-01-01T00:00:00Z",
                              recurrence="0 * * * *", script=None, tz="UTC", now=now,
                              routing=("cli", "local", None))
    with sessiondb.transaction(p.inbound) as c:
        c.execute("UPDATE messages_in SET status='completed' WHERE id=?", (tid,))
    made = scheduling.recur(p, "UTC", now)
    assert len(made) == 1 and scheduling.recur(p, "UTC", now) == []
    nxt = sessiondb.SessionInbound(p).message(made[0])
    assert nxt["series_id"] == tid and nxt["process_after"] > sessiondb.utcnow()
    assert sessiondb.SessionInbound(p).message(tid)["recurrence"] is None


def test_create_agent_is_admin_only(env):
    store, s, r, ag = env
    store.conn.execute("UPDATE messaging_groups SET unknown_sender_policy='public'")
    (sid,) = r.route(Event("cli", "local", "m1", text="make a helper", sender_id="guest",
                           is_mention=True))
    p = _paths(store, s, sid)
    d = Delivery(store, s)
    _agent_writes(p, {"action": "create_agent", "name": "Researcher"}, kind="system",
                  in_reply_to=f"m1:{ag}")
    d.pass_once(time.time())
    assert len(db_rows(store, "SELECT * FROM agent_groups")) == 1
    r.route(Event("cli", "local", "m2", text="make a helper", sender_id=OWNER.split(":")[1],
                  is_mention=True))
    _agent_writes(p, {"action": "create_agent", "name": "Researcher"}, kind="system",
                  in_reply_to=f"m2:{ag}")
    d.pass_once(time.time())
    child = db_row(store, "SELECT * FROM agent_groups WHERE folder='researcher'")
    assert child
    names = {x["name"] for x in store.destinations(ag)}
    assert "researcher" in names
    assert {x["name"] for x in store.destinations(child["id"])} == {"parent"}


def test_self_modification_needs_an_admin_and_respawns_with_a_note(env):
    store, s, r, ag = env
    (sid,) = r.route(Event("cli", "local", "i0", text="add a tool", sender_id=OWNER.split(":")[1],
                           is_mention=True))
    p = _paths(store, s, sid)
    d = Delivery(store, s)
    _agent_writes(p, {"action": "install_packages", "apt": ["curl", "rm -rf /"], "npm": []},
                  kind="system")
    _agent_writes(p, {"action": "grant_role", "user": "cli:me", "role": "owner"}, kind="system")
    _agent_writes(p, {"action": "add_mcp_server", "name": "files", "command": "mcp-files",
                      "args": ["--root", "/workspace"], "env": {}}, kind="system")
    d.pass_once(time.time())
    notes = [json.loads(x["content"])["text"] for x in _inbound(p) if x["channel_type"] == "agent"]
    assert any("invalid package names: rm -rf /" in n for n in notes)
    assert any("unknown action 'grant_role'" in n for n in notes)  # no way to grant itself
    assert db_rows(store, "SELECT * FROM user_roles WHERE user_id != ?", (OWNER,)) == []
    (appr,) = db_rows(store, "SELECT * FROM pending_approvals")
    assert appr["approver_user_id"] == OWNER and appr["action"] == "add_mcp_server"
    from nanoclaw.approvals import requests as approvals

    store.ensure_user("cli:mallory", "cli")
    with pytest.raises(NotAllowed):
        approvals.decide(store, s, appr["approval_id"], "approve", "cli:mallory")
    assert json.loads(store.container_config(ag)["mcp_servers"]) == {}
    assert approvals.decide(store, s, appr["approval_id"], "approve", OWNER) == "approved"
    assert "files" in json.loads(store.container_config(ag)["mcp_servers"])
    wake_note = [x for x in _inbound(p) if x["on_wake"] == 1]
    assert len(wake_note) == 1
    acts = [x["action"] for x in db_rows(store, "SELECT action FROM container_requests WHERE"
                                         " session_id=? ORDER BY id", (sid,))]
    assert acts[-2:] == ["kill", "wake"]


def test_agent_files_come_only_from_its_outbox(env, tmp_path):
    store, s, r, ag = env
    (sid,) = r.route(Event("cli", "local", "f0", text="send a file",
                           sender_id=OWNER.split(":")[1], is_mention=True))
    p = _paths(store, s, sid)
    d = Delivery(store, s)
    secret = tmp_path / "host-secret.txt"
    secret.write_text("do not send")
    bad = [[{"path": str(secret)}], ["../../../../host-secret.txt"], [str(secret)]]
    for files in bad:
        _agent_writes(p, {"text": "here", "files": files}, channel_type="cli", platform_id="local")
    good = _agent_writes(p, {"text": "report", "files": ["report.txt"]}, channel_type="cli",
                         platform_id="local")
    import os

    os.makedirs(os.path.join(p.work, "outbox", good))
    with open(os.path.join(p.work, "outbox", good, "report.txt"), "w") as fh:
        fh.write("ok")
    d.pass_once(time.time())
    sends = db_rows(store, "SELECT content FROM channel_outbox")
    assert len(sends) == 1
    (f,) = json.loads(sends[0]["content"])["files"]
    assert f["name"] == "report.txt" and f["path"].endswith(f"outfiles/{sid}/{good}/report.txt")
    assert open(f["path"]).read() == "ok"  # a copy the host owns, not the agent's file
    notes = [json.loads(x["content"])["text"] for x in _inbound(p) if x["channel_type"] == "agent"]
    assert len([n for n in notes if "was not sent" in n]) == 3


def test_agent_files_are_forwarded_and_replies_find_their_way_back(env):
    import os

    store, s, r, ag = env
    other = store.create_agent_group("helper", "helper", "anthropic", "m", "h")
    store.add_agent_destination(ag, "helper", other)
    store.add_agent_destination(other, "parent", ag)
    (sid,) = r.route(Event("cli", "local", "f1", text="ask helper",
                           sender_id=OWNER.split(":")[1], is_mention=True))
    p = _paths(store, s, sid)
    d = Delivery(store, s)
    out = _agent_writes(p, {"text": "see attached", "files": ["data.csv"]},
                        channel_type="agent", platform_id=other)
    os.makedirs(os.path.join(p.work, "outbox", out))
    with open(os.path.join(p.work, "outbox", out, "data.csv"), "w") as fh:
        fh.write("a,b\n")
    _agent_writes(p, {"text": "escape", "files": ["../../../etc/passwd"]},
                  channel_type="agent", platform_id=other)
    d.pass_once(time.time())
    target = db_row(store, "SELECT * FROM sessions WHERE agent_group_id=?", (other,))
    tp = _paths(store, s, target["id"])
    (got,) = _inbound(tp)
    (att,) = json.loads(got["content"])["attachments"]
    with open(os.path.join(tp.work, att["localPath"])) as fh:
        assert fh.read() == "a,b\n"
    notes = [json.loads(x["content"])["text"] for x in _inbound(p) if x["channel_type"] == "agent"]
    assert any("was not sent" in n for n in notes)
    # the helper answers without naming the message: the newest row from the parent
    # that carries a source session leads back to the terminal conversation
    _agent_writes(tp, {"text": "thanks"}, channel_type="agent", platform_id=ag)
    d.pass_once(time.time())
    assert "thanks" in [json.loads(x["content"])["text"] for x in _inbound(p)]
