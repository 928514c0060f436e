"""Microsoft Teams end to end: a real host whose `webhooks` worker (the door) takes
activities signed by a fake Bot Framework (`BotFrameworkSender`, RS256 with the fake's
key served as JWKS) and whose `channel:teams` worker posts to the fake's Bot Connector
(tests/fakes/fake_teams.py). One host for the file; each test uses chats of its own.
What every channel does (threads, splitting, 429s, refusals, edits, files, cards, typing,
a crash inside a send) is in tests/test_channel_contract.py, `-k teams`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import Host, wait_for

from fakes.fake_teams import APP_ID, FakeTeams, door_url, new_key, sign
from fakes.hosts import enqueue, inbound_events, log, outbox, session_inbound, wire_chat
from nanoclaw.channels.teams_webhook import parse
from nanoclaw.channels.text import split_bytes
from nanoclaw.channels.webhook import BadPayload

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def teams():
    fake = FakeTeams().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory, teams):
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path_factory.mktemp("teams"), model.url, {
        **teams.host_env(), "NANOCLAW_SEND_ATTEMPTS": "2", "NANOCLAW_WEB_ENABLED": "false"})
    h.start()
    wait_for(lambda: teams.connected(h), 30, what="door up and a bot token fetched")
    yield h
    h.cleanup()
    model.stop()


@pytest.fixture(scope="module")
def bf(host, teams):
    return teams.attach(host)


def pid(conv: str) -> str:
    return f"teams:{conv}"


def events(host: Host, conv: str, kind: str | None = None) -> list[dict]:
    return [e for e in inbound_events(host, "teams", kind) if e["platform_id"] == pid(conv)]


def reply(teams: FakeTeams, conv: str, text: str, thread: str | None = None,
          timeout: float = 60):
    return wait_for(lambda: next((s for s in teams.bot_sent(conv, thread) if s.text == text),
                                 None), timeout, what=f"{text!r} in {conv}")


def test_a_new_user_in_a_dm_is_approved_then_answered(host, teams, bf):
    dm = teams.dm(1)
    act = teams.activity(dm, "hello from Teams")
    bf.deliver(act)
    card = wait_for(lambda: host.q("SELECT * FROM channel_outbox WHERE idem_key LIKE"
                                   " 'card:chan-%'"), 30, what="the owner's approval card")[0]
    assert card["channel_type"] == "cli"  # the owner's terminal
    assert teams.bot_sent(dm) == []  # nothing reaches the agent before the owner says so
    qid = json.loads(card["content"])["questionId"]
    r = host.cli("approvals", "approve", qid, "--agent", "main")
    assert r.returncode == 0, r.stderr
    got = reply(teams, dm, "echo: hello from Teams")
    assert got.thread is None  # a personal chat has no reply chains
    (ev,) = events(host, dm)
    assert ev["message_id"] == act["id"] and ev["payload"]["sender_id"] == "teams:29:ann"
    assert ev["payload"]["is_group"] is False and ev["payload"]["is_mention"] is True
    sent = [c for c in teams.calls_of("activities") if c.params["chat"] == dm]
    assert sent and sent[0].params["conv"] == dm


def test_a_mention_in_a_channel_is_answered_in_its_thread_and_stripped(host, teams, bf):
    chan = "19:team-general@thread.tacv2"
    wire_chat(host, "teams", pid(chan), is_group=True, engage_mode="mention")
    root = teams.new_thread(chan)
    quiet = teams.activity(f"{chan};messageid={root}", "just chatting")
    bf.deliver(quiet)
    asked = teams.activity(f"{chan};messageid={root}", "what time is it", mention=True)
    bf.deliver(asked)
    got = reply(teams, chan, "echo: what time is it", root)
    assert got.thread == root and all(s.thread == root for s in teams.bot_sent(chan))
    evs = {e["message_id"]: e for e in events(host, chan)}
    assert evs[asked["id"]]["payload"]["text"] == "what time is it"  # our <at> removed
    assert evs[asked["id"]]["payload"]["is_mention"] is True
    assert evs[asked["id"]]["thread_id"] == root
    assert evs[quiet["id"]]["payload"]["is_mention"] is False
    assert "echo: just chatting" not in [s.text for s in teams.bot_sent(chan)]
    # a post at the channel's top level starts its own reply chain, answered inside it
    top = teams.activity(chan, "new topic", mention=True)
    bf.deliver(top)
    reply(teams, chan, "echo: new topic", top["id"])


def test_an_agents_question_card_is_answered_by_its_button(host, teams, bf):
    dm = teams.dm(2)
    wire_chat(host, "teams", pid(dm))
    q = {"title": "Lunch", "question": "Pizza or salad?", "timeout": 60,
         "options": [{"label": "Pizza", "value": "pizza"}, {"label": "Salad", "value": "salad"}]}
    bf.deliver(teams.activity(dm, f"[[tool:ask_user_question {json.dumps(q)}]]"))
    card = wait_for(lambda: next((s for s in teams.bot_sent(dm) if s.buttons), None), 60,
                    what="question card")
    adaptive = card.raw["attachments"][0]
    assert adaptive["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert [a["type"] for a in adaptive["content"]["actions"]] == ["Action.Submit"] * 2
    assert [t for t, _ in card.buttons] == ["Pizza", "Salad"]
    qid = host.q("SELECT question_id FROM pending_questions")[0]["question_id"]
    bf.deliver(teams.click(dm, card.raw, 1))
    rows = wait_for(lambda: [m for m in session_inbound(host, "teams", pid(dm))
                             if m["kind"] == "system"], 60, what="question_response row")
    assert json.loads(rows[0]["content"]) == {
        "type": "question_response", "questionId": qid, "selectedOption": "salad",
        "userId": "teams:29:ann"}
    wait_for(lambda: not host.q("SELECT * FROM pending_questions"), 30, what="tool took it")
    # a click on that card from another chat maps to nothing
    other = teams.dm(3)
    bf.deliver(teams.click(other, card.raw, 0))
    time.sleep(0.3)
    assert not events(host, other, "action")


def test_a_cold_dm_is_created_for_an_approval_card(host, teams):
    enqueue(host, "dm-t", "teams", "@dm:teams:29:bob", {"text": "psst"})
    wait_for(lambda: (outbox(host, "dm-t") or {}).get("status") == "sent", 30)
    (call,) = teams.calls_of("create")
    assert call.params["user"] == "29:bob"
    assert [s.text for s in teams.bot_sent("a:dm-29:bob")] == ["psst"]


def test_a_429_is_retried_after_its_retry_after(host, teams):
    dm = teams.dm(4)
    teams.rate_limit(dm, 1)
    enqueue(host, "rl-4", "teams", pid(dm), {"text": "slow"})
    wait_for(lambda: (outbox(host, "rl-4") or {}).get("status") == "sent", 30)
    calls = teams.send_calls(dm)
    assert [c.outcome for c in calls] == ["injected:429", "ok"]
    assert calls[1].at - calls[0].at >= 0.9
    assert [s.text for s in teams.bot_sent(dm)] == ["slow"]


def test_a_long_reply_is_split_within_28_kb_text_intact(host, teams):
    dm = teams.dm(5)
    text = "\n\n".join(("Grüße aus München 🎉 " * n).strip() for n in (300, 1200, 700))
    assert len(text.encode()) > 2 * 28_000
    enqueue(host, "long-5", "teams", pid(dm), {"text": text})
    wait_for(lambda: (outbox(host, "long-5") or {}).get("status") == "sent", 60)
    got = [s.text for s in teams.bot_sent(dm)]
    assert len(got) >= 3 and all(len(t.encode()) <= 24_000 for t in got)
    assert " ".join(got).split() == text.split()
    assert not [c for c in teams.send_calls(dm) if c.outcome != "ok"]  # none too big


def test_split_bytes_keeps_every_character_within_the_byte_limit():
    for text in ("a" * 100, "é" * 100, "🎉" * 50 + " x " * 30, "word " * 400):
        parts = split_bytes(text, 64)
        assert all(len(p.encode()) <= 64 for p in parts)
        assert "".join(parts).replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize("case, check", [
    ("no token", "no bearer token"),
    ("expired", "expired"),
    ("wrongly signed", "signature"),
    ("unknown key", "unknown signing key"),
    ("wrong audience", "audience"),
    ("wrong issuer", "issuer"),
    ("wrong serviceurl", "serviceurl"),
])
def test_a_bad_token_gets_401_stores_nothing_and_the_log_names_the_check(
        host, teams, bf, case, check):
    dm = f"a:forged-{case.replace(' ', '-')}"
    act = teams.activity(dm, f"forged: {case}")
    raw = json.dumps(act).encode()
    signing = {"expired": {"exp": time.time() - 3600},
               "wrongly signed": {"key": new_key()},
               "unknown key": {"kid": "not-a-key"},
               "wrong audience": {"aud": "someone-else"},
               "wrong issuer": {"iss": "https://evil.example"},
               "wrong serviceurl": {"serviceurl": "https://smba.trafficmanager.net/teams/"},
               }.get(case, {})
    auth = None if case == "no token" else f"Bearer {sign(act, **signing)}"
    assert bf.post_raw(raw, auth) == 401
    assert not events(host, dm)  # nothing stored
    wait_for(lambda: f"check failed: {check}" in log(host), 10, what=f"log names {check!r}")
    assert bf.post_raw(raw, f"Bearer {sign(act)}") == 200  # the same body, signed right
    wait_for(lambda: events(host, dm), 10, what="stored")


def test_a_forged_service_url_outside_the_allowlist_is_never_called(host, teams, bf):
    dm = "a:forged-service"
    evil = f"http://localhost:{teams.port}/svc"  # the fake, by a name not on the allowlist
    act = {**teams.activity(dm, "reply to me elsewhere"), "serviceUrl": evil}
    assert bf.post_raw(json.dumps(act).encode(), f"Bearer {sign(act)}") == 401
    wait_for(lambda: "check failed: serviceUrl not allowed" in log(host), 10)
    assert not events(host, dm)
    # even a stored serviceUrl (say, from before the allowlist changed) is not called
    from nanoclaw.db.store import Store

    store = Store.open(host.data)
    try:
        store.set_state(f"teams:service:{dm}", evil)
    finally:
        store.close()
    enqueue(host, "evil-1", "teams", pid(dm), {"text": "never"})
    row = wait_for(lambda: (r := outbox(host, "evil-1")) and r["status"] == "failed" and r, 30)
    assert row["attempts"] == 1 and "TEAMS_SERVICE_URL_ALLOW" in row["error"]
    assert not [c for c in teams.calls if c.params.get("chat") == dm]


def test_the_bot_token_and_the_signing_keys_are_cached(host, teams, bf):
    dm = teams.dm(6)
    wire_chat(host, "teams", pid(dm))
    tokens, keys = len(teams.calls_of("token")), len(teams.calls_of("keys"))
    for i in range(3):
        bf.deliver(teams.activity(dm, f"cached {i}"))
        reply(teams, dm, f"echo: cached {i}")
    assert len(teams.calls_of("token")) == tokens  # one token per process, until expiry
    assert len(teams.calls_of("keys")) == keys
    assert all(c.params["tenant"] == "botframework.com" and c.params["scope"] ==
               "https://api.botframework.com/.default" for c in teams.calls_of("token"))


def test_a_file_is_fetched_only_from_an_allowed_host(host, teams, bf):
    dm = teams.dm(7)
    wire_chat(host, "teams", pid(dm))
    good = teams.activity(dm, "see file", attachments=[
        teams.file_attachment("a.txt", b"attached", "text/plain"),
        {"contentType": "text/html", "content": "<p>see file</p>"}])
    bf.deliver(good)
    ev = wait_for(lambda: next((e for e in events(host, dm) if e["message_id"] == good["id"]),
                               None), 30)
    (att,) = ev["payload"]["attachments"]
    assert att["name"] == "a.txt" and "data" in att
    bad_att = teams.file_attachment("x.pdf", b"%PDF", "application/pdf")
    bad_att["content"]["downloadUrl"] = bad_att["content"]["downloadUrl"].replace(
        "127.0.0.1", "localhost")
    downloads = len(teams.calls_of("download"))
    bad = teams.activity(dm, "odd file", attachments=[bad_att])
    bf.deliver(bad)
    ev = wait_for(lambda: next((e for e in events(host, dm) if e["message_id"] == bad["id"]),
                               None), 30)
    (att,) = ev["payload"]["attachments"]
    assert "TEAMS_ATTACHMENT_HOSTS" in att["error"] and "data" not in att
    assert len(teams.calls_of("download")) == downloads


def test_kill9_of_the_door_and_the_channel_worker_loses_and_doubles_nothing(host, teams, bf):
    dms = [teams.dm(20 + i) for i in range(3)]
    for d in dms:
        wire_chat(host, "teams", pid(d))
    sent: list[tuple[str, str]] = []
    done = threading.Event()

    def send() -> None:
        try:
            for i in range(24):
                d = dms[i % 3]
                bf.deliver(teams.activity(d, f"burst {i}"), deadline=90)
                sent.append((d, f"burst {i}"))
                time.sleep(0.03)
        finally:
            done.set()

    t = threading.Thread(target=send, daemon=True)
    t.start()
    killed_at = 0.0
    for after, worker in ((6, "webhooks"), (14, "channel:teams")):
        old = host.worker_pid(worker)
        wait_for(lambda: len(sent) >= after, 60, what=f"{after} activities")
        assert not done.is_set()
        killed_at = time.time()  # the channel worker's, last
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: host.worker_pid(worker) not in (None, old), 30, what="restart")
    assert done.wait(120) and len(sent) == 24
    for d in dms:  # the last of each chat is answered (earlier ones may share a turn)
        last = [x for v, x in sent if v == d][-1]
        reply(teams, d, f"echo: {last}", timeout=90)
    twice = []
    for d in dms:  # every activity reached the agent exactly once, no reply twice...
        rows = session_inbound(host, "teams", pid(d))
        for x in [x for v, x in sent if v == d]:
            assert sum(f'"{x}"' in (m["content"] or "") or f">{x}<" in (m["content"] or "")
                       for m in rows) == 1, (x, [m["content"] for m in rows])
        out = teams.bot_sent(d)
        for text in {s.text for s in out}:
            at = [s.raw["at"] for s in out if s.text == text]
            if len(at) > 1:
                twice.append((text, at))
    # ...but the one Teams cannot help (docs/channels.md: at least once): a reply the
    # killed channel worker had posted and not yet recorded goes again after its restart,
    # as the Bot Connector takes no idempotency key. Only that one, and only if the kill
    # fell in that instant.
    assert len(twice) <= 1, twice
    for text, at in twice:
        # posted around the kill (or still on its way then), and again after the restart
        assert len(at) == 2 and at[0] < killed_at + 1.0 and at[1] > killed_at, \
            (text, at, killed_at)
    evs = [e for d in dms for e in events(host, d)]
    assert len(evs) == 24 and len({e["message_id"] for e in evs}) == 24
    assert door_url(host)


def test_a_refused_password_stops_the_channel_saying_why(tmp_path, teams):
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path / "badpw", model.url, {
        **teams.host_env(), "TEAMS_APP_PASSWORD": "wrong", "NANOCLAW_WEB_ENABLED": "false"})
    try:
        h.base.mkdir(parents=True, exist_ok=True)  # not h.start(): it waits for all RUNNING
        h.out = open(h.base / "host.out", "ab")
        h.proc = subprocess.Popen([sys.executable, "-m", "nanoclaw", "run"], cwd=h.base,
                                  env=h.env, stdout=h.out, stderr=subprocess.STDOUT)
        wait_for(lambda: "TEAMS_APP_PASSWORD refused" in log(h), 30, what="said why")
        wait_for(lambda: {w["name"]: w for w in h.workers()}.get("channel:teams", {}).get(
            "state") == "FATAL", 30, what="FATAL, not restarted in a loop")
    finally:
        h.cleanup()
        model.stop()


# ---- the parser, fuzzed ----------------------------------------------------------------
fuzz = hsettings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
anything = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(
                            st.text(max_size=8), c, max_size=3), max_leaves=8)
ident = st.sampled_from(["29:ann", "28:" + APP_ID, "", "a" * 600]) | anything
activity = st.fixed_dictionaries({
    "type": st.sampled_from(["message", "messageUpdate", "conversationUpdate", "invoke"])
    | anything,
    "id": st.sampled_from(["1700000000001", ""]) | anything,
    "conversation": st.fixed_dictionaries({"id": st.sampled_from([
        "a:dm1", "19:c@thread.tacv2;messageid=17", "19:c@thread.tacv2;messageid=",
        ";messageid=1"]) | anything, "conversationType": st.sampled_from(
        ["personal", "channel", "groupChat"]) | anything}) | anything,
    "from": st.fixed_dictionaries({"id": ident, "name": anything}) | anything,
    "recipient": st.fixed_dictionaries({"id": ident}) | anything,
    "text": st.text(max_size=40) | anything,
    "entities": st.lists(st.fixed_dictionaries({
        "type": st.just("mention") | anything, "text": st.just("<at>Claw</at>") | anything,
        "mentioned": st.fixed_dictionaries({"id": ident}) | anything}), max_size=2) | anything,
    "value": st.fixed_dictionaries({"ncq": st.just("ncq:q-1:0") | anything}) | anything,
    "attachments": st.lists(anything, max_size=2) | anything,
    "channelData": st.fixed_dictionaries({"eventType": anything}) | anything,
    "serviceUrl": st.just("https://smba.trafficmanager.net/teams/") | anything})


@fuzz
@given(body=activity | anything)
def test_an_activity_parses_to_a_well_formed_event_or_one_clear_error(body):
    try:
        got = parse(body)
    except BadPayload as e:
        assert "\n" not in str(e)
        return
    if got is None:
        return
    assert got.kind in ("chat", "edit", "action")
    assert got.platform_id.startswith("teams:") and ";" not in got.conversation
    assert got.id and got.key and got.user and isinstance(got.text, str)
    assert got.thread is None or 0 < len(got.thread) <= 128
    assert isinstance(got.is_group, bool) and isinstance(got.is_mention, bool)
    assert all(isinstance(a, dict) for a in got.files)
    if got.kind == "action":
        assert isinstance(got.value, dict) and isinstance(got.value["ncq"], str)
