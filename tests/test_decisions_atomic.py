"""Decisions are all or nothing (architecture review, habit 8), and a replayed message
keeps its thread (review M4), on a real central DB and real session DBs.

A chat or sender approval, the naming of a new agent and `init-first-agent` each write
in one transaction: a failure part-way (a constraint the DB enforces; here a trigger
that refuses one insert, since every step is otherwise find-or-create) leaves the
approval open to be decided again and writes nothing. A click connecting a chat to an
agent removed since the card went out is answered with that reason, writes nothing and
gets a fresh card. The message an approval kept is replayed through a router that knows
the threaded channels, so an approved first message from Telegram lands in the session
of its thread.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from dbread import db_row, db_rows
from nanoclaw import config
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.approvals import cards
from nanoclaw.cli import main as cli
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.routing.router import Event, Router
from nanoclaw.util import local_user_id

OWNER = local_user_id()
HANDLE = OWNER.split(":", 1)[1]
THREADED = frozenset({"telegram", "discord", "slack"})  # as `load_builtin().threaded()`


@pytest.fixture
def env(tmp_path, monkeypatch):
    for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data", "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                 "NANOCLAW_GROUPS_DIR": tmp_path / "groups",
                 "NANOCLAW_TIMEZONE": "UTC"}.items():
        monkeypatch.setenv(k, str(v))
    s = config.load()
    store = Store.open(s.data_dir)
    ensure_defaults(store, s)
    ag = db_row(store, "SELECT id FROM agent_groups")["id"]
    yield store, s, Router(store, s, THREADED), ag
    store.close()


def refuse_inserts(store: Store, table: str) -> None:
    """The DB refuses any insert into `table` (SQLITE_CONSTRAINT, as a constraint would),
    for this connection only."""
    store.conn.execute(f"CREATE TEMP TRIGGER refuse_{table} BEFORE INSERT ON main.{table}"
                       " BEGIN SELECT RAISE(ABORT, 'refused for the test'); END")


def allow_inserts(store: Store, table: str) -> None:
    store.conn.execute(f"DROP TRIGGER temp.refuse_{table}")


def mention(platform_id: str, mid: str, text: str = "@bot hi", sender: str = "9",
            thread: str | None = None) -> Event:
    return Event("telegram", platform_id, mid, text=text, sender_id=sender, sender_name="Zoe",
                 is_mention=True, is_group=True, thread_id=thread)


def owner_clicks(card_id: str, option: str, mid: str) -> Event:
    return Event("cli", "local", mid, kind="action",
                 payload={"question_id": card_id, "option": option, "user_id": HANDLE})


def chat_card(store: Store) -> dict:
    (row,) = db_rows(store, "SELECT * FROM channel_outbox WHERE idem_key LIKE 'card:chan-%'")
    return json.loads(row["content"])


def notices(store: Store) -> list[str]:
    return [json.loads(r["content"])["text"] for r in
            db_rows(store, "SELECT content FROM channel_outbox WHERE idem_key LIKE 'notice:%'"
                    " ORDER BY id")]


def member(store: Store, uid: str, ag: str) -> bool:
    return db_row(store, "SELECT 1 AS x FROM agent_group_members WHERE user_id=? AND"
                    " agent_group_id=?", (uid, ag)) is not None


def inbound(s, session: dict) -> list[dict]:
    c = sqlite3.connect(sessiondb.of(s, session).inbound)
    c.row_factory = sqlite3.Row
    return [dict(r) for r in c.execute("SELECT * FROM messages_in ORDER BY seq")]


def count(store: Store, table: str) -> int:
    return db_row(store, f"SELECT COUNT(*) AS n FROM {table}")["n"]


# ---- 1. a chat approval naming a removed agent --------------------------------------------


def test_connecting_a_chat_to_a_removed_agent_says_why_and_keeps_the_approval(env):
    store, s, r, ag = env
    helper = store.create_agent_group("helper", "helper", "anthropic", "m", "helper")
    assert r.route(mention("telegram:-200", "n1")) == []
    mg = store.messaging_group("telegram", "telegram:-200")
    card = chat_card(store)
    assert f"connect:{helper}" in [o["value"] for o in card["options"]]
    store.conn.execute("DELETE FROM agent_groups WHERE id=?", (helper,))  # removed meanwhile

    r.route(owner_clicks(card["questionId"], f"connect:{helper}", "k1"))
    (said,) = notices(store)
    assert "no longer exists" in said and "'helper'" in said and "\n" not in said
    assert "already decided" not in said
    # nothing written: the approval is open, the chat neither connected nor refused
    assert db_row(store, "SELECT * FROM pending_channel_approvals WHERE messaging_group_id=?",
                    (mg["id"],))
    assert store.messaging_group("telegram", "telegram:-200")["denied_at"] is None
    assert store.wirings(mg["id"]) == [] and not member(store, "telegram:9", ag)
    # a fresh card offers today's agents; choosing again on it connects and replays
    fresh = db_rows(store, "SELECT * FROM channel_outbox WHERE idem_key LIKE 'card:chan-%'"
                    " ORDER BY id")[-1]
    assert (fresh["channel_type"], fresh["platform_id"]) == ("cli", "local")
    options = [o["value"] for o in json.loads(fresh["content"])["options"]]
    assert options == [f"connect:{ag}", "new", "reject"]
    r.route(owner_clicks(card["questionId"], f"connect:{helper}", "k2"))  # not on it now
    assert notices(store)[-1] == "That is not one of this card's options."
    r.route(owner_clicks(card["questionId"], f"connect:{ag}", "k3"))
    assert [w["agent_group_id"] for w in store.wirings(mg["id"])] == [ag]
    assert member(store, "telegram:9", ag)
    assert db_rows(store, "SELECT * FROM pending_channel_approvals") == []
    (sess,) = db_rows(store, "SELECT * FROM sessions")
    assert [json.loads(m["content"])["text"] for m in inbound(s, sess)] == ["@bot hi"]


def test_the_terminal_gets_the_reason_too(env):
    store, s, r, ag = env
    helper = store.create_agent_group("helper", "helper", "anthropic", "m", "helper")
    r.route(mention("telegram:-200", "n1"))
    card_id = chat_card(store)["questionId"]
    store.conn.execute("DELETE FROM agent_groups WHERE id=?", (helper,))
    with pytest.raises(Exception) as e:  # `admin approvals approve` shows it as one line
        cards.decide(store, s, card_id, f"connect:{helper}", OWNER, r.replay)
    assert count(store, "pending_channel_approvals") == 1
    assert type(e.value).__name__ == "StillOpen" and "no longer exists" in str(e.value)


# ---- 1 and 2. a failure part-way writes nothing ------------------------------------------


def test_a_chat_connection_that_fails_part_way_writes_nothing(env):
    store, s, r, ag = env
    r.route(mention("telegram:-200", "n1"))
    mg = store.messaging_group("telegram", "telegram:-200")
    card_id = chat_card(store)["questionId"]
    refuse_inserts(store, "agent_group_members")  # the last write: admitting the sender
    with pytest.raises(sqlite3.IntegrityError):  # the router worker retries the click
        r.route(owner_clicks(card_id, f"connect:{ag}", "k1"))
    assert count(store, "pending_channel_approvals") == 1
    assert store.wirings(mg["id"]) == [] and count(store, "agent_destinations") == 1
    assert count(store, "sessions") == 0
    allow_inserts(store, "agent_group_members")
    r.route(owner_clicks(card_id, f"connect:{ag}", "k1"))  # the retry decides it
    assert notices(store) == []
    assert member(store, "telegram:9", ag) and count(store, "sessions") == 1


def test_a_chat_wired_meanwhile_is_still_connected_by_the_click(env):
    store, s, r, ag = env
    r.route(mention("telegram:-200", "n1"))
    mg = store.messaging_group("telegram", "telegram:-200")
    store.wire(mg["id"], ag, destination="team", engage_mode="mention")  # from the terminal
    r.route(owner_clicks(chat_card(store)["questionId"], f"connect:{ag}", "k1"))
    assert [w["engage_mode"] for w in store.wirings(mg["id"])] == ["mention"]
    assert member(store, "telegram:9", ag) and count(store, "sessions") == 1
    assert db_rows(store, "SELECT * FROM pending_channel_approvals") == [] and notices(store) == []


def test_a_sender_admission_that_fails_part_way_writes_nothing(env):
    store, s, r, ag = env
    mg = store.create_messaging_group("telegram", "telegram:-100", "team", True,
                                      "request_approval")
    store.wire(mg, ag, destination="team")
    assert r.route(mention("telegram:-100", "u1", "hello bot", sender="42")) == []
    (req,) = db_rows(store, "SELECT * FROM pending_sender_approvals")
    refuse_inserts(store, "agent_group_members")
    with pytest.raises(sqlite3.IntegrityError):
        r.route(owner_clicks(req["id"], "allow", "k1"))
    assert db_row(store, "SELECT * FROM pending_sender_approvals WHERE id=?", (req["id"],))
    assert not member(store, "telegram:42", ag)
    allow_inserts(store, "agent_group_members")
    r.route(owner_clicks(req["id"], "allow", "k1"))
    assert notices(store) == []
    assert member(store, "telegram:42", ag)
    assert db_rows(store, "SELECT * FROM pending_sender_approvals") == []
    assert count(store, "sessions") == 1  # the first message, replayed


def test_naming_a_new_agent_that_fails_part_way_writes_nothing(env):
    store, s, r, ag = env
    r.route(mention("telegram:-300", "n1", "@bot hello team"))
    card_id = chat_card(store)["questionId"]
    r.route(owner_clicks(card_id, "new", "k1"))
    groups = count(store, "agent_groups")
    refuse_inserts(store, "messaging_group_agents")  # after the group and its config
    with pytest.raises(sqlite3.IntegrityError):
        r.route(Event("cli", "local", "d1", text="Team Helper", sender_id=HANDLE))
    row = db_row(store, "SELECT * FROM pending_channel_approvals")
    assert row and row["naming_by"] == OWNER  # still waiting for the name
    assert count(store, "agent_groups") == groups and count(store, "container_configs") == groups
    assert not (s.groups_dir / "team-helper").exists()
    allow_inserts(store, "messaging_group_agents")
    assert r.route(Event("cli", "local", "d2", text="Team Helper", sender_id=HANDLE)) == []
    new = db_row(store, "SELECT * FROM agent_groups WHERE name='team-helper'")
    assert new and (s.groups_dir / new["folder"]).is_dir()
    assert db_rows(store, "SELECT * FROM pending_channel_approvals") == []


# ---- 3. init-first-agent -------------------------------------------------------------------


def test_init_first_agent_that_fails_part_way_writes_nothing(env, capsys):
    store, s, r, ag = env
    tables = ("agent_groups", "container_configs", "users", "user_roles", "messaging_groups",
              "messaging_group_agents", "agent_destinations")
    before = {t: count(store, t) for t in tables}
    # the wiring, its last write, is refused by the DB; the CLI opens its own connection
    store.conn.execute("CREATE TRIGGER refuse_wiring BEFORE INSERT ON messaging_group_agents"
                       " BEGIN SELECT RAISE(ABORT, 'refused for the test'); END")
    argv = ["init-first-agent", "--name", "Helper", "--channel", "telegram", "--chat", "-100",
            "--user", "42", "--group"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoclaw: refused by the database:") and "\n" not in err
    assert {t: count(store, t) for t in tables} == before
    assert db_row(store, "SELECT 1 AS x FROM container_configs WHERE cli_scope='global'") is None
    assert not (s.groups_dir / "helper").exists()
    store.conn.execute("DROP TRIGGER refuse_wiring")
    assert cli.main(argv) == 0
    g = db_row(store, "SELECT * FROM agent_groups WHERE folder='helper'")
    assert store.container_config(g["id"])["cli_scope"] == "global"
    assert db_row(store, "SELECT 1 AS x FROM user_roles WHERE user_id='telegram:42' AND"
                    " role='owner'")
    mg = store.messaging_group("telegram", "-100")
    assert [(w["agent_group_id"], w["engage_mode"]) for w in store.wirings(mg["id"])] == \
        [(g["id"], "mention")]
    assert (s.groups_dir / "helper" / "CLAUDE.md").is_file()
    assert cli.main(argv) == 0  # again: find-or-create, nothing doubled
    assert count(store, "agent_groups") == before["agent_groups"] + 1
    assert len(store.wirings(mg["id"])) == 1


# ---- 4. the replay keeps the thread --------------------------------------------------------


def _threaded_session(store: Store, s, ag: str, thread: str) -> dict:
    (sess,) = db_rows(store, "SELECT * FROM sessions WHERE agent_group_id=? AND messaging_group_id="
                      "(SELECT id FROM messaging_groups WHERE channel_type='telegram')", (ag,))
    assert sess["thread_id"] == thread
    (msg,) = inbound(s, sess)
    assert msg["thread_id"] == thread
    return sess


@pytest.mark.parametrize("via", ["click", "terminal"])
def test_an_approved_chat_replays_its_first_message_in_its_thread(env, via):
    store, s, r, ag = env
    assert r.route(mention("telegram:-200", "n1", thread="77")) == []
    card_id = chat_card(store)["questionId"]
    if via == "click":
        r.route(owner_clicks(card_id, f"connect:{ag}", "k1"))
    else:  # `nanoclaw approvals approve chan-… --agent …`: no router of its own
        assert cli.main(["approvals", "approve", card_id, "--agent", ag]) == 0
    _threaded_session(store, s, ag, "77")


def test_an_allowed_sender_replays_in_its_thread(env):
    store, s, r, ag = env
    mg = store.create_messaging_group("telegram", "telegram:-100", "team", True,
                                      "request_approval")
    store.wire(mg, ag, destination="team")
    assert r.route(mention("telegram:-100", "u1", sender="42", thread="5")) == []
    (req,) = db_rows(store, "SELECT * FROM pending_sender_approvals")
    r.route(owner_clicks(req["id"], "allow", "k1"))
    _threaded_session(store, s, ag, "5")


def test_a_newly_named_agent_replays_in_its_thread(env):
    store, s, r, ag = env
    r.route(mention("telegram:-300", "n1", thread="9"))
    r.route(owner_clicks(chat_card(store)["questionId"], "new", "k1"))
    r.route(Event("cli", "local", "d1", text="Threads", sender_id=HANDLE))
    new = db_row(store, "SELECT id FROM agent_groups WHERE name='threads'")["id"]
    _threaded_session(store, s, new, "9")


# ---- an approval is opened with its cards, or not at all ----------------------------------


def test_an_approval_whose_card_cannot_be_queued_is_not_stored(env):
    """The approval row and the card asking about it are one transaction: a refused card
    leaves no approval that nobody was asked about (the next message asks again)."""
    store, s, router, ag = env
    store.conn.execute("UPDATE messaging_groups SET unknown_sender_policy='request_approval'")
    refuse_inserts(store, "channel_outbox")
    with pytest.raises(sqlite3.IntegrityError, match="refused for the test"):
        router.route(Event("cli", "local", "m1", text="hi", sender_id="stranger"))
    assert count(store, "pending_sender_approvals") == 0
    allow_inserts(store, "channel_outbox")
    router.route(Event("cli", "local", "m2", text="hi", sender_id="stranger"))
    assert count(store, "pending_sender_approvals") == 1
    assert db_row(store, "SELECT 1 AS x FROM channel_outbox WHERE idem_key LIKE 'card:snd-%'")


def test_an_approval_action_has_one_handler():
    """A second handler for an action already handled is refused (it used to be dropped
    by `setdefault`, so the first one kept running and nobody knew)."""
    from nanoclaw.approvals import requests as approvals
    from nanoclaw.delivery import actions  # noqa: F401  (registers install_packages)

    first = approvals.ON_APPROVE["install_packages"]
    approvals.on_approve("install_packages", first)  # the same one again: fine
    with pytest.raises(ValueError, match="has a handler already"):
        approvals.on_approve("install_packages", lambda *a: "other")
    assert approvals.ON_APPROVE["install_packages"] is first
