"""Card ids the agent cannot forge (security review H3).

An agent's question card used to be sent with the agent's own `questionId`, a click
whose id had no open question fell through to the approvals, and a button index was
mapped to an option of the newest card with that id on the channel, whatever message
was clicked. So a poll reusing an approval's id turned an admin's Reject into Approve.

These tests replay that attack through the real delivery, router, channel runner and
Telegram adapter (python-telegram-bot against the fake Bot API), and the web page's
`/api/answer`, for the three kinds of approval card (`appr-`, `chan-`, `snd-`).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any, Callable

import aiohttp
import pytest

from dbread import db_row, db_rows
from fakes.fake_telegram import FakeTelegram
from nanoclaw import config
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.channels.runner import ChannelRunner
from nanoclaw.cli import agent as agent_cli  # noqa: F401  (installs the ncl action, as workers/delivery.py does)
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.delivery.delivery import Delivery
from nanoclaw.routing.router import Event, Router
from nanoclaw.util import is_approval_card, local_user_id

OWNER = local_user_id()
ADMIN, MEMBER, NEWBIE, STRANGER = 9, 2, 3, 5
GROUP = -100


class World:
    """A host's databases, its router and delivery passes, and one channel worker
    (runner + real adapter) in this thread's event loop."""

    def __init__(self, tmp_path, monkeypatch, channel: str, env: dict[str, str]) -> None:
        for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data",
                     "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                     "NANOCLAW_GROUPS_DIR": tmp_path / "groups", **env}.items():
            monkeypatch.setenv(k, str(v))
        self.s = s = config.load()
        self.store = Store.open(s.data_dir)
        ensure_defaults(self.store, s)
        self.ag = db_row(self.store, "SELECT id FROM agent_groups")["id"]
        self.router = Router(self.store, s)
        self.delivery = Delivery(self.store, s)
        self.loop = asyncio.new_event_loop()
        self.runner = ChannelRunner(self.store, s, channel)
        if channel == "telegram":
            from nanoclaw.channels.telegram import TelegramChannel as Adapter
        else:
            from nanoclaw.channels.web import WebChannel as Adapter  # type: ignore[assignment]
        self.adapter = Adapter(s, self.runner)
        self.runner.adapter = self.adapter
        self.loop.run_until_complete(self.adapter.setup())

    def close(self) -> None:
        self.loop.run_until_complete(self.adapter.teardown())
        self.loop.close()
        self.store.close()

    def pump(self, until: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Run the channel worker's sends, the router over stored events and delivery's
        pass (as the host's workers do) until `until()` is true; returns its value."""
        async def go() -> Any:
            end = time.monotonic() + timeout
            while True:
                self.runner.version = -1  # our own writes do not move data_version
                await self.runner.send_due(time.time())
                for row in self.store.pending_inbound():
                    self.router.route(Event.from_row(row))
                    self.store.mark_routed(row["id"])
                self.delivery.last_full = 0  # see sessions made since the last pass
                self.delivery.pass_once(time.time())
                got = until()
                if got:
                    return got
                assert time.monotonic() < end, "timed out"
                await asyncio.sleep(0.05)
        return self.loop.run_until_complete(go())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    # ---- the agent's side --------------------------------------------------------------
    def paths(self, sid: str) -> sessiondb.SessionPaths:
        return sessiondb.of(self.s, self.store.session(sid))

    def agent_writes(self, sid: str, content: dict, kind: str = "chat-sdk",
                     channel_type: str | None = None, platform_id: str | None = None) -> str:
        """A messages_out row, the way a (hostile) agent can write one (odd seq)."""
        p = self.paths(sid)
        c = sqlite3.connect(p.outbound)
        try:
            top = max(c.execute("SELECT COALESCE(MAX(seq),0) FROM messages_out").fetchone()[0],
                      sqlite3.connect(p.inbound).execute(
                          "SELECT COALESCE(MAX(seq),0) FROM messages_in").fetchone()[0])
            mid = f"out-{time.time_ns()}"
            c.execute("INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind,"
                      " platform_id, channel_type, content) VALUES (?,?,?,?,?,?,?,?)",
                      (mid, top + 1 if top % 2 == 0 else top + 2, None,
                       "2026-01-01T00:00:00.000Z", kind, platform_id, channel_type,
                       json.dumps(content)))
            c.commit()
        finally:
            c.close()
        return mid

    def answers(self, sid: str) -> list[dict]:
        """The question responses the agent received."""
        c = sqlite3.connect(self.paths(sid).inbound)
        try:
            rows = c.execute("SELECT content FROM messages_in WHERE kind='system'").fetchall()
        finally:
            c.close()
        return [x for x in (json.loads(r[0]) for r in rows)
                if x.get("type") == "question_response"]

    def notes(self, sid: str) -> list[str]:
        c = sqlite3.connect(self.paths(sid).inbound)
        try:
            rows = c.execute("SELECT content FROM messages_in WHERE channel_type='agent'")
            return [json.loads(r[0]).get("text", "") for r in rows]
        finally:
            c.close()

    # ---- the host's side ---------------------------------------------------------------
    def card_row(self, card_id: str, channel: str) -> dict | None:
        """The sent outbox row of the host's own card (an approval) with this id."""
        for r in db_rows(self.store, "SELECT * FROM channel_outbox WHERE channel_type=? AND"
                              " status='sent' AND session_id IS NULL ORDER BY id", (channel,)):
            if json.loads(r["content"]).get("questionId") == card_id:
                return r
        return None

    def agent_card(self, out_id: str) -> dict | None:
        """The sent outbox row of the agent's message `out_id`."""
        return db_row(self.store, "SELECT * FROM channel_outbox WHERE message_out_id=? AND"
                             " status='sent'", (out_id,))

    def member(self, user: str) -> bool:
        return db_row(self.store, "SELECT 1 AS x FROM agent_group_members WHERE user_id=?",
                             (user,)) is not None

    def notices(self) -> list[str]:
        return [json.loads(r["content"])["text"] for r in db_rows(self.store, 
            "SELECT content FROM channel_outbox WHERE idem_key LIKE 'notice:%' ORDER BY id")]


# ---- Telegram ---------------------------------------------------------------------------
@pytest.fixture
def tg():
    fake = FakeTelegram().start()
    yield fake
    fake.stop()


@pytest.fixture
def w(tmp_path, monkeypatch, tg):
    world = World(tmp_path, monkeypatch, "telegram", {
        "TELEGRAM_BOT_TOKEN": tg.token, "TELEGRAM_API_BASE": tg.url,
        "NANOCLAW_TELEGRAM_POLL_TIMEOUT": "1", "NANOCLAW_WEB_ENABLED": "false"})
    st = world.store
    for u in (ADMIN, MEMBER, NEWBIE):
        st.ensure_user(f"telegram:{u}", "telegram")
    st.grant_role(f"telegram:{ADMIN}", "admin")  # global: every kind of card goes to them
    st.conn.execute("INSERT INTO agent_group_members VALUES (?, ?, NULL, 'x')",
                    (f"telegram:{MEMBER}", world.ag))
    mg = st.create_messaging_group("telegram", f"telegram:{GROUP}", "team", True)
    st.wire(mg, world.ag, destination="team")
    yield world
    world.close()


def _session(w: World) -> str:
    """The group's session, opened by the member talking to the agent."""
    (sid,) = w.router.route(Event("telegram", f"telegram:{GROUP}", "m1", text="hi",
                                  sender_id=str(MEMBER), is_mention=True, is_group=True))
    return sid


def _buttons(tg: FakeTelegram, row: dict) -> tuple[int, list[str]]:
    """(message id, callback data of each button) of a sent card."""
    msg = tg.messages[int(row["platform_message_id"])]
    data = [b[0]["callback_data"] for b in msg["reply_markup"]["inline_keyboard"]]
    assert all(len(d.encode()) <= 64 for d in data)  # Telegram's callback_data limit
    return msg["message_id"], data


def _poll(w: World, sid: str, question_id: str, values: list[str]) -> dict:
    """The hostile poll: the approval's id as its questionId, every option its value."""
    out = w.agent_writes(sid, {
        "type": "ask_question", "questionId": question_id, "title": "Lunch poll",
        "question": "Pizza today?",
        "options": [{"label": lbl, "value": v} for lbl, v in zip(("Yes", "No", "Maybe"), values)]},
        channel_type="telegram", platform_id=f"telegram:{GROUP}")
    return w.pump(lambda: w.agent_card(out))


def _attack(w: World, tg: FakeTelegram, card_id: str, value: str, reject: int,
            decided: Callable[[], Any]) -> tuple[str, str]:
    """A poll reusing `card_id`; the member answers it, then the admin clicks the reject
    button (index `reject`) on the real approval card. Returns (the agent's session,
    the admin's card text afterwards)."""
    sid = _session(w)
    real = w.pump(lambda: w.card_row(card_id, "telegram"))
    poll = _poll(w, sid, card_id, [value] * (reject + 1))
    poll_card = json.loads(poll["content"])
    # the host named the poll: not the approval's id, nothing of it on the buttons
    assert poll_card["questionId"] != card_id
    assert not is_approval_card(poll_card["questionId"])
    poll_mid, poll_data = _buttons(tg, poll)
    assert all(card_id not in d for d in poll_data)
    # the member answers the poll: an answer for the agent, under its own id
    tg.click(GROUP, poll_mid, poll_data[0], user_id=MEMBER)
    (ans,) = w.pump(lambda: w.answers(sid))
    assert ans == {"type": "question_response", "questionId": card_id, "selectedOption": value,
                   "userId": f"telegram:{MEMBER}"}
    # the admin rejects on the real card
    real_mid, real_data = _buttons(tg, real)
    assert len(real_data) > reject
    tg.click(ADMIN, real_mid, real_data[reject], user_id=ADMIN)
    w.pump(decided)
    text = w.pump(lambda: "✓" in (tg.messages[real_mid].get("text") or "")
                  and tg.messages[real_mid]["text"])
    assert "Lunch poll" not in text and "Pizza" not in text
    assert w.answers(sid) == [ans]  # the admin's click never reached the agent
    return sid, text


def test_a_poll_reusing_an_approval_id_cannot_turn_reject_into_approve(w, tg):
    sid = _session(w)
    w.agent_writes(sid, {"action": "cli", "args": ["members", "add", f"telegram:{NEWBIE}"],
                         "requestId": "r1"}, kind="system")
    appr = w.pump(lambda: db_row(w.store, "SELECT * FROM pending_approvals"))
    aid = appr["approval_id"]
    assert aid.startswith("appr-") and appr["approver_user_id"] == f"telegram:{ADMIN}"

    def decided():
        return db_row(w.store, "SELECT * FROM pending_approvals WHERE approval_id=? AND"
                          " status!='pending'", (aid,))
    _, text = _attack(w, tg, aid, "approve", 1, decided)
    row = decided()
    assert (row["status"], row["decided_by"]) == ("rejected", f"telegram:{ADMIN}")
    assert not w.member(f"telegram:{NEWBIE}")
    assert text.startswith("Agent command") and text.endswith("✓ Rejected")
    assert any("was rejected" in n for n in w.notes(sid))


def test_a_poll_reusing_a_chat_approval_id_cannot_connect_the_chat(w, tg):
    assert w.router.route(Event("telegram", "telegram:-200", "n1", text="@bot hi",
                                sender_id=str(STRANGER), is_mention=True, is_group=True)) == []
    mg = w.store.messaging_group("telegram", "telegram:-200")
    card_id = f"chan-{mg['id']}"

    def decided():
        return db_row(w.store, "SELECT denied_at FROM messaging_groups WHERE id=? AND denied_at"
                          " IS NOT NULL", (mg["id"],))
    _, text = _attack(w, tg, card_id, f"connect:{w.ag}", 2, decided)
    assert w.store.wirings(mg["id"]) == []
    assert db_rows(w.store, "SELECT * FROM pending_channel_approvals") == []
    assert not w.member(f"telegram:{STRANGER}")
    assert text.startswith("New chat") and text.endswith("✓ Rejected")


def test_a_poll_reusing_a_sender_approval_id_cannot_admit_the_sender(w, tg):
    mg = w.store.create_messaging_group("telegram", "telegram:-300", "lobby", True,
                                        "request_approval")
    w.store.wire(mg, w.ag, destination="lobby")
    assert w.router.route(Event("telegram", "telegram:-300", "s1", text="let me in",
                                sender_id=str(STRANGER), is_mention=True, is_group=True)) == []
    (req,) = db_rows(w.store, "SELECT * FROM pending_sender_approvals")
    assert req["id"].startswith("snd-")

    def decided():
        return not db_rows(w.store, "SELECT * FROM pending_sender_approvals")
    _, text = _attack(w, tg, req["id"], "allow", 1, decided)
    assert not w.member(f"telegram:{STRANGER}")
    assert text.startswith("New sender") and text.endswith("✓ Denied")


def test_a_click_on_an_older_card_gets_that_cards_options(w, tg):
    """Two cards with the same agent questionId: each click answers from its own card."""
    sid = _session(w)
    first = _poll(w, sid, "dup", ["a1", "b1"])
    second = _poll(w, sid, "dup", ["a2", "b2", "c2"])
    ids = {json.loads(r["content"])["questionId"] for r in (first, second)}
    assert len(ids) == 2 and "dup" not in ids
    # a click naming the agent's id cannot say which card it was made on: refused
    w.router.route(Event("telegram", f"telegram:{GROUP}", "k1", kind="action", payload={
        "question_id": "dup", "option": "a2", "user_id": str(MEMBER)}))
    assert w.answers(sid) == [] and len(w.notices()) == 1
    first_mid, first_data = _buttons(tg, first)
    tg.click(GROUP, first_mid, first_data[1], user_id=MEMBER)
    (ans,) = w.pump(lambda: w.answers(sid))
    assert (ans["questionId"], ans["selectedOption"]) == ("dup", "b1")
    assert w.pump(lambda: (tg.messages[first_mid].get("text") or "").endswith("✓ No"))
    second_mid, second_data = _buttons(tg, second)
    tg.click(GROUP, second_mid, second_data[2], user_id=MEMBER)
    w.pump(lambda: len(w.answers(sid)) == 2)
    assert [a["selectedOption"] for a in w.answers(sid)] == ["b1", "c2"]
    # both answered: a further click on either is refused, not sent to an approval
    tg.click(GROUP, first_mid, first_data[0], user_id=MEMBER)
    w.pump(lambda: len(w.notices()) == 2)
    assert len(w.answers(sid)) == 2
    assert w.notices()[-1] == "This question was already answered (or has expired)."


def test_forged_clicks_on_an_approval_card_are_refused(w, tg):
    sid = _session(w)
    w.agent_writes(sid, {"action": "cli", "args": ["members", "add", f"telegram:{NEWBIE}"],
                         "requestId": "r1"}, kind="system")
    aid = w.pump(lambda: db_row(w.store, "SELECT * FROM pending_approvals"))["approval_id"]
    real = w.pump(lambda: w.card_row(aid, "telegram"))
    real_mid, real_data = _buttons(tg, real)
    events = lambda: db_rows(w.store, "SELECT * FROM inbound_events WHERE kind='action'")  # noqa: E731
    # the approval card's button data sent from the group chat: no such card there
    tg.push({"callback_query": {
        "id": "forged1", "from": {"id": MEMBER, "is_bot": False, "first_name": "M"},
        "chat_instance": "ci", "data": real_data[0], "message": {
            "message_id": real_mid, "date": 0, "chat": {"id": GROUP, "type": "supergroup"}}}})
    w.pump(lambda: any(c.params.get("callback_query_id") == "forged1" for c in
                       tg.calls_of("answerCallbackQuery")))
    assert events() == []
    # from the admin's chat, but by the member: the router refuses it
    tg.click(ADMIN, real_mid, real_data[0], user_id=MEMBER)
    w.pump(lambda: w.notices())
    assert w.notices() == ["Only the approver or an admin can decide this."]
    # a forged click event naming an option the card does not have
    w.router.route(Event("telegram", f"telegram:{ADMIN}", "f1", kind="action", payload={
        "question_id": aid, "option": "approve-everything", "user_id": str(ADMIN)}))
    assert db_row(w.store, "SELECT status FROM pending_approvals")["status"] == "pending"
    assert not w.member(f"telegram:{NEWBIE}")
    # the admin's own click still decides it
    tg.click(ADMIN, real_mid, real_data[0], user_id=ADMIN)
    w.pump(lambda: db_row(w.store, "SELECT 1 AS x FROM pending_approvals WHERE status='approved'"))
    assert w.member(f"telegram:{NEWBIE}")


def test_an_agent_id_naming_an_approval_never_reaches_approvals_from_the_router(w, tg):
    """A click carrying an approval-looking id is only ever a decision; one carrying a
    question card's id only ever an answer, whatever the agent called its question."""
    sid = _session(w)
    w.agent_writes(sid, {"action": "cli", "args": ["members", "add", f"telegram:{NEWBIE}"],
                         "requestId": "r1"}, kind="system")
    aid = w.pump(lambda: db_row(w.store, "SELECT * FROM pending_approvals"))["approval_id"]
    poll = _poll(w, sid, aid, ["approve", "approve"])
    card = json.loads(poll["content"])["questionId"]
    # the member (may answer the agent, may not decide) clicks with the agent's id (the
    # approval's): a decision, refused for them; the agent hears nothing
    w.router.route(Event("telegram", f"telegram:{GROUP}", "k1", kind="action", payload={
        "question_id": aid, "option": "approve", "user_id": str(MEMBER)}))
    assert w.answers(sid) == []
    assert w.notices() == ["Only the approver or an admin can decide this."]
    # with the poll's card id: an answer for the agent, under its own id; no decision
    w.router.route(Event("telegram", f"telegram:{GROUP}", "k2", kind="action", payload={
        "question_id": card, "option": "approve", "user_id": str(MEMBER)}))
    assert [a["questionId"] for a in w.answers(sid)] == [aid]
    assert db_row(w.store, "SELECT status FROM pending_approvals")["status"] == "pending"


# ---- the web page -------------------------------------------------------------------------
@pytest.fixture
def web(tmp_path, monkeypatch):
    from nanoclaw.channels.web import ensure_web_chat

    world = World(tmp_path, monkeypatch, "web", {"NANOCLAW_WEB_ENABLED": "true",
                                                  "NANOCLAW_WEB_PORT": "0"})
    ensure_web_chat(world.store, "local")
    yield world
    world.close()


def _api(web: World, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    async def call() -> tuple[int, dict]:
        a = web.adapter
        async with aiohttp.ClientSession() as http:
            async with http.request(method, f"http://127.0.0.1:{a.port}{path}", json=body,
                                    headers={"Authorization": f"Bearer {a.token}"}) as r:
                return r.status, await r.json()
    return web.run(call())


def test_the_web_answer_resolves_the_card_on_the_page(web):
    (sid,) = web.router.route(Event("web", "local", "w1", text="hi", sender_id=OWNER,
                                    is_mention=True))
    web.agent_writes(sid, {"action": "cli", "args": ["members", "add", "cli:newbie"],
                           "requestId": "r1"}, kind="system")
    aid = web.pump(lambda: db_row(web.store, "SELECT * FROM pending_approvals"))["approval_id"]
    web.pump(lambda: web.card_row(aid, "web"))  # the owner's card, mirrored
    out = web.agent_writes(sid, {
        "type": "ask_question", "questionId": aid, "title": "Lunch poll",
        "question": "Pizza today?", "options": [{"label": "Yes", "value": "approve"},
                                                {"label": "No", "value": "approve"}]},
        channel_type="web", platform_id="local")
    web.pump(lambda: web.agent_card(out))
    status, got = _api(web, "GET", "/api/events?after=0&wait=0")
    cards = {e["title"]: e["question_id"] for e in got["events"] if e["type"] == "card"}
    assert cards["Agent command"] == aid and cards["Lunch poll"] != aid
    # the poll is answered (for the agent); asked from another chat, it is not found
    assert _api(web, "POST", "/api/answer", {"chat": "other", "question_id":
                                             cards["Lunch poll"], "index": 0})[0] == 404
    assert _api(web, "POST", "/api/answer", {"question_id": cards["Lunch poll"],
                                             "index": 0}) == (200, {"ok": True,
                                                                    "option": "approve"})
    (ans,) = web.pump(lambda: web.answers(sid))
    assert ans["questionId"] == aid and ans["userId"] == OWNER
    # the owner rejects on the approval card: rejected, whatever the poll said
    assert _api(web, "POST", "/api/answer", {"question_id": aid, "index": 1}) == \
        (200, {"ok": True, "option": "reject"})
    row = web.pump(lambda: db_row(web.store, "SELECT * FROM pending_approvals WHERE"
                                        " status!='pending'"))
    assert (row["status"], row["decided_by"]) == ("rejected", OWNER)
    assert db_row(web.store, "SELECT 1 AS x FROM agent_group_members WHERE user_id='cli:newbie'"
                        ) is None
    assert len(web.answers(sid)) == 1  # the owner's decision never reached the agent


# ---- cards sent before the host named them ------------------------------------------------
def test_open_questions_keep_the_id_their_buttons_carry(monkeypatch):
    """The migration: an open question asked under the agent's id keeps that id as its
    card id (its buttons carry it), and the agent's id beside it for the answer."""
    from nanoclaw.db import central as db
    from nanoclaw.db import migrations as schema

    upto = [n for n, _ in schema.MIGRATIONS].index("question-card-ids")
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    monkeypatch.setattr(db, "MIGRATIONS", schema.MIGRATIONS[:upto])
    db.migrate(conn)
    conn.execute("INSERT INTO agent_groups VALUES ('ag', 'main', 'main', NULL, 'x')")
    conn.execute("INSERT INTO sessions (id, agent_group_id, created_at) VALUES ('s', 'ag', 'x')")
    conn.execute("INSERT INTO pending_questions (question_id, session_id, message_out_id,"
                 " platform_id, channel_type, options_json, created_at) VALUES"
                 " ('q-old', 's', 'out-1', 'telegram:1', 'telegram', '[\"a\"]', 'x')")
    monkeypatch.setattr(db, "MIGRATIONS", schema.MIGRATIONS)
    assert "question-card-ids" in db.migrate(conn)
    conn.row_factory = sqlite3.Row
    (row,) = conn.execute("SELECT * FROM pending_questions").fetchall()
    assert (row["card_id"], row["question_id"], row["message_out_id"]) == \
        ("q-old", "q-old", "out-1")
    store = Store(conn)
    assert store.question_card("q-old")["session_id"] == "s"
    # a new card from the same session under the same agent id gets its own card id
    card = store.open_question_card("s", "out-2", "q-old", "telegram", "telegram:1", None,
                                    "T", ["a"], "x")
    assert card != "q-old" and card.startswith("q-")
    assert store.open_question_card("s", "out-2", "q-old", "telegram", "telegram:1", None,
                                    "T", ["a"], "x") == card  # asked once per message
    assert len(store.question_cards_asking("telegram", "telegram:1", "q-old")) == 2
