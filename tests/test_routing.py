"""Routing on a real central DB and real session DBs (no processes needed)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from dbread import db_row, db_rows
from nanoclaw import config
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.routing.router import Event, Router
from nanoclaw.util import local_user_id


@pytest.fixture
def env(tmp_path, monkeypatch):
    for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data", "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                 "NANOCLAW_GROUPS_DIR": tmp_path / "groups"}.items():
        monkeypatch.setenv(k, str(v))
    s = config.load()
    store = Store.open(s.data_dir)
    ensure_defaults(store, s)
    return store, s, Router(store, s, frozenset({"threaded"}))


def _rows(store, s, sid):
    sess = store.session(sid)
    p = sessiondb.SessionPaths(str(s.session_dir(sess["agent_group_id"], sid)))
    conn = sqlite3.connect(p.inbound)
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute(
        "SELECT id, trigger, content FROM messages_in ORDER BY seq")], p


def _cli(text, mid, chat="local"):
    owner = local_user_id().split(":", 1)[1]
    return Event("cli", chat, mid, text=text, sender_id=owner, sender_name=owner,
                 is_mention=True)


def _wakes(store):
    return db_rows(store, "SELECT session_id FROM container_requests WHERE action='wake'")


def test_shared_session_is_reused_and_routing_is_idempotent(env):
    store, s, r = env
    a = r.route(_cli("one", "m1"))
    b = r.route(_cli("two", "m2"))
    again = r.route(_cli("one", "m1"))
    assert a == b == again and len(a) == 1
    rows, _ = _rows(store, s, a[0])
    assert [x["id"].split(":")[0] for x in rows] == ["m1", "m2"]
    assert json.loads(rows[0]["content"])["text"] == "one"


def test_new_terminal_chat_is_its_own_conversation(env):
    store, s, r = env
    a = r.route(_cli("hi", "m1", "local"))
    b = r.route(_cli("hi", "m2", "work"))
    assert a != b and len(b) == 1
    names = {d["name"] for d in store.destinations(store.session(b[0])["agent_group_id"])}
    assert {"terminal", "terminal-work"} <= names


def test_unknown_chat_without_mention_is_dropped(env):
    store, s, r = env
    assert r.route(Event("telegram", "telegram:9", "x1", text="hey", sender_id="5")) == []
    assert store.messaging_group("telegram", "telegram:9") is None
    r.route(Event("telegram", "telegram:9", "x2", text="@bot hey", sender_id="5",
                  is_mention=True))
    mg = store.messaging_group("telegram", "telegram:9")
    assert mg["unknown_sender_policy"] == "request_approval"
    reasons = db_rows(store, "SELECT reason FROM unregistered_senders")
    assert reasons == [{"reason": "no_agent_wired"}]


@pytest.mark.parametrize("text", ["/clear", "/CLEAR", "   /clear", "／ｃｌｅａｒ", "/Compact now"])
def test_member_cannot_run_admin_commands(env, text):
    store, s, r = env
    ag = db_row(store, "SELECT id FROM agent_groups")["id"]
    mg = store.messaging_group("cli", "local")["id"]
    store.conn.execute("UPDATE messaging_groups SET unknown_sender_policy='public' WHERE id=?",
                       (mg,))
    store.ensure_user("cli:guest", "cli")
    store.conn.execute("INSERT INTO agent_group_members VALUES ('cli:guest', ?, NULL, 'x')",
                       (ag,))
    ev = Event("cli", "local", "g1", text=text, sender_id="guest", is_mention=True)
    assert r.route(ev) == []
    assert _wakes(store) == []  # the agent was not woken
    sess = db_row(store, "SELECT id FROM sessions")
    rows, p = _rows(store, s, sess["id"])
    assert rows == []  # nothing reached the agent
    assert sessiondb.SessionOutbound(p).undelivered(sessiondb.SessionInbound(p).delivered_ids()) == []  # the host never writes the agent's outbound.db
    out = db_rows(store, "SELECT * FROM channel_outbox")  # the denial goes straight to the chat
    assert len(out) == 1 and "Permission denied" in json.loads(out[0]["content"])["text"]
    assert (out[0]["channel_type"], out[0]["platform_id"]) == ("cli", "local")


def test_owner_may_run_admin_commands_and_dropped_commands_vanish(env):
    store, s, r = env
    assert len(r.route(_cli("/clear", "o1"))) == 1
    assert r.route(_cli("/login", "o2")) == []
    sid = db_row(store, "SELECT id FROM sessions")["id"]
    rows, _ = _rows(store, s, sid)
    assert [x["id"].split(":")[0] for x in rows] == ["o1"]


def test_stranger_is_refused_on_a_strict_chat(env):
    store, s, r = env
    assert r.route(Event("cli", "local", "s1", text="hi", sender_id="mallory",
                         is_mention=True)) == []
    assert db_rows(store, "SELECT reason FROM unregistered_senders")[0]["reason"] == \
        "unknown_sender_strict"


def test_accumulate_stores_context_without_waking(env):
    store, s, r = env
    mg = store.messaging_group("cli", "local")["id"]
    store.conn.execute("UPDATE messaging_group_agents SET engage_mode='pattern',"
                       " engage_pattern='^@andy', ignored_message_policy='accumulate'"
                       " WHERE messaging_group_id=?", (mg,))
    assert r.route(_cli("just chatting", "a1")) == []
    assert _wakes(store) == []
    assert len(r.route(_cli("@andy what now?", "a2"))) == 1
    sid = db_row(store, "SELECT id FROM sessions")["id"]
    rows, _ = _rows(store, s, sid)
    assert [(x["id"].split(":")[0], x["trigger"]) for x in rows] == [("a1", 0), ("a2", 1)]


def _group_chat(store, ag, mode="shared", engage="pattern", pattern=".", channel="threaded"):
    mg = store.create_messaging_group(channel, f"{channel}:g1", "grp", True, "public")
    store.wire(mg, ag, destination="grp", engage_mode=engage, engage_pattern=pattern,
               session_mode=mode)
    return mg


def _ev(mid, thread=None, mention=False, channel="threaded", text="hi"):
    return Event(channel, f"{channel}:g1", mid, text=text, thread_id=thread, sender_id="u1",
                 is_mention=mention, is_group=True)


def test_threaded_group_forces_per_thread_sessions(env):
    store, s, r = env
    ag = db_row(store, "SELECT id FROM agent_groups")["id"]
    _group_chat(store, ag, mode="shared")
    a = r.route(_ev("1", thread="t1"))
    b = r.route(_ev("2", thread="t2"))
    c = r.route(_ev("3", thread="t1"))
    assert a == c and a != b
    assert {x["thread_id"] for x in db_rows(store, "SELECT thread_id FROM sessions WHERE"
                                            " messaging_group_id IS NOT NULL AND thread_id"
                                            " IS NOT NULL")} == {"t1", "t2"}


def test_unthreaded_adapter_drops_the_thread(env):
    store, s, r = env
    ag = db_row(store, "SELECT id FROM agent_groups")["id"]
    _group_chat(store, ag, channel="flat")
    a = r.route(_ev("1", thread="t1", channel="flat"))
    b = r.route(_ev("2", thread="t2", channel="flat"))
    assert a == b


def test_agent_shared_session_has_no_reply_address(env):
    store, s, r = env
    ag = db_row(store, "SELECT id FROM agent_groups")["id"]
    _group_chat(store, ag, mode="agent-shared")
    (sid,) = r.route(_ev("1", thread="t1"))
    sess = store.session(sid)
    assert sess["messaging_group_id"] is None
    p = sessiondb.SessionPaths(str(s.session_dir(ag, sid)))
    row = sqlite3.connect(p.inbound).execute("SELECT * FROM session_routing").fetchone()
    assert row[1:] == (None, None, None)
    assert r.route(_ev("2", thread="t9")) == [sid]


def test_mention_sticky_follows_up_without_a_mention(env):
    store, s, r = env
    ag = db_row(store, "SELECT id FROM agent_groups")["id"]
    _group_chat(store, ag, engage="mention-sticky", pattern=None)
    assert r.route(_ev("1", thread="t1")) == []  # no session yet, no mention
    first = r.route(_ev("2", thread="t1", mention=True))
    assert len(first) == 1
    assert r.route(_ev("3", thread="t1")) == first  # sticky within the thread
    assert r.route(_ev("4", thread="t2")) == []  # another thread is not


def test_fan_out_by_priority_one_session_per_agent(env):
    store, s, r = env
    ag = db_row(store, "SELECT id FROM agent_groups")["id"]
    other = store.create_agent_group("other", "other", "anthropic", "m", "o")
    mg = _group_chat(store, ag, channel="flat")
    store.wire(mg, other, destination="grp", priority=5)
    sids = r.route(_ev("1", channel="flat"))
    assert [store.session(x)["agent_group_id"] for x in sids] == [other, ag]


def test_an_edit_engages_a_start_anchored_pattern(env):
    store, s, r = env
    ag = db_row(store, "SELECT id FROM agent_groups")["id"]
    _group_chat(store, ag, channel="flat", pattern="^@andy")

    def edit(mid, text, flagged=True):
        return Event("flat", "flat:g1", mid, text=f"[edited] {text}", sender_id="u1",
                     is_group=True, payload={"edited": True} if flagged else {})

    assert r.route(edit("edit1:1", "just chatting")) == []
    assert r.route(edit("edit2:2", "@andy what now?", flagged=False)) == []  # not an edit
    (sid,) = r.route(edit("edit3:3", "@andy what now?"))
    rows, _ = _rows(store, s, sid)
    assert [(x["id"].split(":")[:2], x["trigger"]) for x in rows] == [(["edit3", "3"], 1)]
    assert json.loads(rows[0]["content"])["text"] == "[edited] @andy what now?"  # as sent


def test_a_known_sender_costs_no_user_write_and_a_new_name_is_kept(env):
    """ensure_user runs for every message: a sender already known under that name is
    left as it is (no write transaction), a changed display name is stored."""
    store, s, router = env
    router.route(_cli("hello", "m1"))
    uid = local_user_id()
    name = db_row(store, "SELECT display_name FROM users WHERE id=?", (uid,))["display_name"]
    before = store.conn.total_changes
    store.ensure_user(uid, "cli", name)
    store.ensure_user(uid, "cli")
    assert store.conn.total_changes == before
    store.ensure_user(uid, "cli", "New Name")
    assert store.conn.total_changes == before + 1
    assert db_row(store, "SELECT display_name FROM users WHERE id=?",
                  (uid,))["display_name"] == "New Name"
