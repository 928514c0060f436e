"""GitHub issue and PR comments as chat (issue 14).

End to end: a real host whose `webhooks` worker (the door) takes GitHub-signed webhooks
from `HookSender` and whose `channel:github` worker drives gidgethub against a fake
GitHub REST API on 127.0.0.1 (tests/fakes/fake_github.py); one host for those tests,
each on a repository of its own. The fake sends the bot's own comments back by webhook,
as GitHub does, so every answer here is also a chance for a self-reply loop.

In-process, on a fake clock (nothing waits in real time): the content-creation pacer
over a burst of 100 answers, GitHub's 403/429 with retry-after, the 65,536-character
split, the reconcile loop's conditional requests and `X-Poll-Interval`, the polling-only
mode, the attachment allowlist, and the inbound parsers under hypothesis.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from conftest import Host, wait_for
from fakes.clock import FakeClock
from fakes.fake_github import ANN, BOT, MARKER, SECRET, FakeGitHub, HookSender, sign
from fakes.hosts import inbound_events, session_inbound
from nanoclaw import config
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.channels import webhook_names
from nanoclaw.channels.base import OutboundMessage, RetryAfter
from nanoclaw.channels.github import GitHubChannel
from nanoclaw.channels.github_api import Allowlist, Pacer
from nanoclaw.channels.github_inbound import NotGitHub, parse_event, parse_listed
from nanoclaw.channels.runner import ChannelRunner
from nanoclaw.db.store import Store

BOB = {"login": "bob", "id": 2002, "type": "User"}
DEPENDABOT = {"login": "dependabot[bot]", "id": 49699333, "type": "Bot"}
MEMBERS_ONLY = "I answer members of this project only."


# ---- one host, end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gh():
    fake = FakeGitHub().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory, gh):
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path_factory.mktemp("gh"), model.url, {
        **gh.host_env(), "NANOCLAW_SEND_ATTEMPTS": "2", "NANOCLAW_WEB_ENABLED": "false",
        "GITHUB_MEMBERS_ONLY_REPLY": MEMBERS_ONLY})
    h.start()
    gh.attach(h)
    wait_for(lambda: gh.connected(h), 30, what="door up and the channel's first call")
    yield h
    h.cleanup()
    model.stop()


@pytest.fixture(scope="module")
def hook(host, gh) -> HookSender:
    assert gh.sender is not None
    return gh.sender


def serve(host: Host, gh: FakeGitHub, repo: str, members=(ANN,)) -> None:
    """A repository wired to the default agent as an approved one is: a strict group chat,
    engaged by a mention and then sticky per thread; `members` by numeric id."""
    store = Store.open(host.data)
    try:
        ag = store.agent_groups()[0]["id"]
        pid = f"github:{repo}"
        mg = store.messaging_group("github", pid)
        mg_id = mg["id"] if mg else store.create_messaging_group("github", pid, repo, True,
                                                                 policy="strict")
        store.wire(mg_id, ag, destination=repo.replace("/", "-"), engage_mode="mention-sticky",
                   engage_pattern=None)
        for m in members:
            store.ensure_user(f"github:{m['id']}", "github", m["login"])
            store.add_member(f"github:{m['id']}", ag, "test")
    finally:
        store.close()
    gh._issue(repo, 1)


def bodies(gh: FakeGitHub, repo: str, number: int | None = None) -> list[str]:
    return [MARKER.sub("", c["body"]) for c in gh.bot_comments(repo, number)]  # as shown


def answered(gh: FakeGitHub, repo: str, number: int, text: str, timeout: float = 60) -> None:
    wait_for(lambda: text in bodies(gh, repo, number), timeout, what=f"{text!r} on #{number}")


def events_of(host: Host, repo: str) -> list[dict]:
    return [e for e in inbound_events(host, "github") if e["platform_id"] == f"github:{repo}"]


def test_a_mention_is_answered_on_its_issue_then_the_thread_without_one(host, gh, hook):
    repo = "octo/app"
    serve(host, gh, repo)
    gh._issue(repo, 7), gh._issue(repo, 8)
    c = gh.comment(repo, 7, "@nano-bot hello")
    answered(gh, repo, 7, "echo: @nano-bot hello")
    (ev,) = events_of(host, repo)
    assert (ev["message_id"], ev["thread_id"]) == (str(c["id"]), "7")
    assert ev["payload"]["sender_id"] == str(ANN["id"]) and ev["payload"]["is_mention"]
    gh.comment(repo, 7, "and a follow-up")  # no mention: the thread was joined
    answered(gh, repo, 7, "echo: and a follow-up")
    gh.comment(repo, 8, "not joined here")  # another issue: no mention, no answer
    gh.comment(repo, 8, "@nano-bot now here")
    answered(gh, repo, 8, "echo: @nano-bot now here")
    assert bodies(gh, repo, 8) == ["echo: @nano-bot now here"]
    assert bodies(gh, repo, 7) == ["echo: @nano-bot hello", "echo: and a follow-up"]


def test_an_opened_issue_and_a_review_comment_are_answered_in_their_thread(host, gh, hook):
    repo = "octo/review"
    serve(host, gh, repo)
    with gh.lock:
        issue = gh._issue(repo, None, ANN, "Crash on start", "@nano-bot it crashes")
    assert hook.deliver("issues", {"action": "opened", "issue": issue, "sender": ANN,
                                   "repository": {"full_name": repo}}) == 200
    answered(gh, repo, issue["number"], "echo: Crash on start\n\n@nano-bot it crashes")
    c = gh.comment(repo, 9, "@nano-bot why this line?", review=True)  # on a PR's diff
    answered(gh, repo, 9, "echo: @nano-bot why this line?")
    assert [(e["message_id"], e["thread_id"]) for e in events_of(host, repo)] == [
        (f"issue{issue['id']}", str(issue["number"])), (f"rc{c['id']}", "9")]


def test_a_non_member_is_not_answered_and_is_recorded(host, gh, hook):
    repo = "octo/public"
    serve(host, gh, repo)
    gh.comment(repo, 1, "@nano-bot hi, I am Ann")
    answered(gh, repo, 1, "echo: @nano-bot hi, I am Ann")
    gh.comment(repo, 1, "@nano-bot let me in", user=BOB)  # by numeric id: not a member
    answered(gh, repo, 1, MEMBERS_ONLY)
    gh.comment(repo, 1, "still Ann")
    answered(gh, repo, 1, "echo: still Ann")
    assert bodies(gh, repo, 1) == ["echo: @nano-bot hi, I am Ann", MEMBERS_ONLY,
                                   "echo: still Ann"]
    (row,) = host.q("SELECT * FROM unregistered_senders WHERE platform_id=?", (f"github:{repo}",))
    assert row["user_id"] == f"github:{BOB['id']}" and row["reason"] == "unknown_sender_strict"
    # a renamed account keeps its id: a member who now calls himself "bob" is still Ann
    gh.comment(repo, 1, "renamed but a member", user={**ANN, "login": "bob"})
    answered(gh, repo, 1, "echo: renamed but a member")


def test_a_new_repository_is_strict_and_nothing_answers_there(host, gh, hook):
    repo = "octo/unknown"
    gh._issue(repo, 1)
    gh.comment(repo, 1, "@nano-bot who are you?", user=BOB)
    wait_for(lambda: events_of(host, repo), 30, what="stored")
    (mg,) = host.q("SELECT * FROM messaging_groups WHERE platform_id=?", (f"github:{repo}",))
    assert mg["unknown_sender_policy"] == "strict" and mg["is_group"] == 1
    wait_for(lambda: host.q("SELECT * FROM unregistered_senders WHERE platform_id=?",
                            (f"github:{repo}",)), 30, what="recorded")
    assert bodies(gh, repo) == []


def test_comments_made_while_the_host_was_down_are_reconciled_and_answered_once(host, gh,
                                                                                hook):
    repo = "octo/down"
    serve(host, gh, repo)
    gh.comment(repo, 1, "@nano-bot before")
    answered(gh, repo, 1, "echo: @nano-bot before")
    wait_for(lambda: host.q("SELECT 1 FROM host_state WHERE key=?",
                            (f"github:since:{repo}:issues",)), 30, what="reconcile cursor")
    host.stop()
    lost = len(hook.lost)
    away = [gh.comment(repo, 1, "while you were away"),  # the webhooks go nowhere
            gh.comment(repo, 1, "and one more")]
    assert len(hook.lost) == lost + 2  # GitHub does not retry: only reconcile can find them
    host.start()
    wait_for(lambda: gh.connected(host), 30, what="up again")
    answered(gh, repo, 1, "echo: and one more")
    for c in away:
        assert [e["message_id"] for e in events_of(host, repo)].count(str(c["id"])) == 1
    wait_for(lambda: len([x for x in gh.calls_of("list") if x.params["repo"] == repo]) >= 6,
             30, what="more reconcile passes")
    out = bodies(gh, repo, 1)
    assert out.count("echo: @nano-bot before") == 1 and len(out) == len(set(out))
    rows = session_inbound(host, "github", f"github:{repo}")  # each reached the agent once
    for text in ("while you were away", "and one more"):
        assert sum(text in (m["content"] or "") for m in rows) == 1, text


def test_a_comment_seen_by_webhook_and_by_reconcile_is_answered_once(host, gh, hook):
    repo = "octo/both"
    serve(host, gh, repo)
    c = gh.comment(repo, 1, "@nano-bot once please")
    wait_for(lambda: any(c["id"] in x.params["ids"] for x in gh.calls_of("list")
                         if x.params["repo"] == repo), 30, what="reconcile saw it too")
    answered(gh, repo, 1, "echo: @nano-bot once please")
    assert hook.redeliver() == 200  # and GitHub's manual redelivery, same delivery id
    nxt = gh.comment(repo, 1, "next")
    answered(gh, repo, 1, "echo: next")
    assert [e["message_id"] for e in events_of(host, repo)] == [str(c["id"]), str(nxt["id"])]
    rows = session_inbound(host, "github", f"github:{repo}")  # the agent saw it once
    assert sum("once please" in (m["content"] or "") for m in rows) == 1
    assert bodies(gh, repo, 1) == ["echo: @nano-bot once please", "echo: next"]


def test_a_bad_signature_gets_401_and_stores_nothing(host, gh, hook):
    repo = "octo/forged"
    serve(host, gh, repo)
    c = gh._comment(repo, 1, ANN, "@nano-bot forged")
    raw = json.dumps(gh.comment_event(repo, c)).encode()
    assert hook.post("issue_comment", raw, signature=None) == 401  # SHA-1 alone: refused
    assert hook.post("issue_comment", raw, signature="sha256=" + "0" * 64) == 401
    assert hook.post("issue_comment", raw, signature=sign(raw, "not-the-secret")) == 401
    assert hook.post("issue_comment", raw.replace(b"forged", b"FORGED"),
                     signature=sign(raw)) == 401
    assert hook.post("issue_comment", raw, signature=sign(raw)[7:]) == 401
    assert events_of(host, repo) == []
    assert hook.post("issue_comment", b"not json", signature=sign(b"not json")) == 400
    assert hook.post("ping", b'{"zen": "hi"}', signature=sign(b'{"zen": "hi"}')) == 200
    assert hook.post("issue_comment", raw) == 200
    assert [e["message_id"] for e in events_of(host, repo)] == [str(c["id"])]


def test_the_bots_own_comment_by_webhook_never_wakes_the_agent(host, gh, hook):
    repo = "octo/self"
    serve(host, gh, repo)
    gh.comment(repo, 1, "@nano-bot start")
    answered(gh, repo, 1, "echo: @nano-bot start")  # the thread is joined: sticky
    mine = gh.comment(repo, 1, "@nano-bot talking to myself", user=BOT)
    other = gh.comment(repo, 1, "@nano-bot bump deps", user=DEPENDABOT)
    gh.comment(repo, 1, "@nano-bot after")
    answered(gh, repo, 1, "echo: @nano-bot after")
    ids = [e["message_id"] for e in events_of(host, repo)]
    assert str(mine["id"]) not in ids and str(other["id"]) not in ids
    assert bodies(gh, repo, 1) == ["echo: @nano-bot start", "@nano-bot talking to myself",
                                   "echo: @nano-bot after"]
    # every answer of the bot came back by webhook and none was stored: no loop
    assert not [e for e in inbound_events(host, "github")
                if e["payload"].get("sender_id") in (str(BOT["id"]), str(DEPENDABOT["id"]))]


# ---- in-process, on a fake clock ----------------------------------------------------------
@pytest.fixture
def fake():
    f = FakeGitHub().start()
    yield f
    f.stop()


@pytest.fixture
def world(tmp_path, monkeypatch, fake):
    clock = FakeClock()
    env = {"NANOCLAW_DATA_DIR": tmp_path / "data", "NANOCLAW_LOGS_DIR": tmp_path / "logs",
           "NANOCLAW_GROUPS_DIR": tmp_path / "groups", "NANOCLAW_SEND_ATTEMPTS": "3",
           "GITHUB_TOKEN": fake.token, "GITHUB_BOT_USERNAME": BOT["login"],
           "GITHUB_API_BASE": fake.url, "GITHUB_POLL_INTERVAL": "5"}
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    settings = config.load()
    store = Store.open(settings.data_dir)
    ensure_defaults(store, settings)
    runner = ChannelRunner(store, settings, "github", clock=clock)
    yield settings, store, runner, clock
    store.close()


def run(coro):
    return asyncio.run(coro)


async def _up(settings, runner, clock, pacer=None) -> GitHubChannel:
    ch = GitHubChannel(settings, runner, clock=clock, pacer=pacer)
    runner.adapter = ch
    await ch.setup(reconcile=False)
    return ch


def test_a_burst_of_100_answers_is_paced_and_none_lost(world, fake):
    settings, store, runner, clock = world
    fake.clock = clock  # GitHub's own content-creation limit, on the same fake clock
    repo, start = "octo/burst", clock()
    fake._issue(repo, 1)
    for i in range(100):
        store.enqueue_send(f"b-{i}", "github", f"github:{repo}", "1", "chat",
                           {"text": f"answer {i}"})

    async def go():
        ch = await _up(settings, runner, clock)
        try:
            for _ in range(200):
                await runner.tick(clock())
                if len(fake.bot_comments(repo)) == 100 or runner.next_due is None:
                    break
                clock.to(runner.next_due)
        finally:
            await ch.teardown()
    run(go())
    assert sorted(bodies(fake, repo)) == sorted(f"answer {i}" for i in range(100))  # none lost
    assert not fake.calls_of("create", "limited:403")  # GitHub never had to refuse one
    stamps = sorted(fake.created)
    assert all(sum(1 for t in stamps if s <= t < s + 60) <= 80 for s in stamps)
    assert clock() - start >= 60  # the last 20 waited for the minute to pass
    rows = store.conn.execute("SELECT status, attempts FROM channel_outbox").fetchall()
    assert {r[0] for r in rows} == {"sent"} and max(r[1] for r in rows) <= 1  # not counted


def test_without_our_pacing_githubs_limits_answer_retry_after(world, fake):
    settings, store, runner, clock = world
    fake.clock = clock
    repo = "octo/limits"
    fake._issue(repo, 1)

    async def go():
        ch = await _up(settings, runner, clock, pacer=Pacer(per_minute=10**6, per_hour=10**6))
        try:
            for i in range(80):
                await ch.deliver(f"github:{repo}", "1", OutboundMessage(f"x{i}", "chat",
                                                                        {"text": f"m{i}"}))
            with pytest.raises(RetryAfter) as secondary:  # 403 "secondary rate limit"
                await ch.deliver(f"github:{repo}", "1", OutboundMessage("x80", "chat",
                                                                        {"text": "m80"}))
            clock.advance(61)
            fake.inject("create", status=429, retry_after=7, repo=repo)
            with pytest.raises(RetryAfter) as too_many:
                await ch.deliver(f"github:{repo}", "1", OutboundMessage("x81", "chat",
                                                                        {"text": "m81"}))
            got = await ch.deliver(f"github:{repo}", "1", OutboundMessage("x82", "chat",
                                                                          {"text": "m82"}))
            return secondary.value.seconds, too_many.value.seconds, got
        finally:
            await ch.teardown()
    secondary, too_many, got = run(go())
    assert (secondary, too_many) == (60, 7)
    assert fake.calls_of("create", "limited:403") and got == str(fake.bot_comments(repo)[-1]["id"])


def test_a_long_answer_is_split_at_65536_characters(world, fake):
    settings, store, runner, clock = world
    repo = "octo/long"
    fake._issue(repo, 3)
    rng = random.Random(14)
    text = "\n\n".join(" ".join(rng.choices(["alpha", "beta", "gamma"], k=5000))
                       for _ in range(8))
    assert len(text) > 2 * 65536

    async def go():
        ch = await _up(settings, runner, clock)
        try:
            return await ch.deliver(f"github:{repo}", "3", OutboundMessage("long", "chat",
                                                                           {"text": text}))
        finally:
            await ch.teardown()
    first = run(go())
    got = bodies(fake, repo, 3)
    assert len(got) >= 3 and all(len(b) <= 65536 for b in got)
    assert " ".join(got).split() == text.split() and first == str(
        fake.bot_comments(repo, 3)[0]["id"])


def test_reconcile_uses_etags_honours_x_poll_interval_and_keeps_its_cursor(world, fake):
    settings, store, runner, clock = world
    fake.webhooks, fake.poll_interval = False, 90  # polling only; GitHub asks for 90 s
    repo = "octo/poll"
    mg = store.create_messaging_group("github", f"github:{repo}", repo, True, policy="public")
    store.wire(mg, store.agent_groups()[0]["id"], destination="poll",
               engage_mode="mention-sticky", engage_pattern=None)
    fake._issue(repo, 2)

    async def go():
        ch = await _up(settings, runner, clock)
        try:
            waits = [await ch.reconcile(clock())]      # 200, nothing yet: cursor set
            waits.append(await ch.reconcile(clock()))  # unchanged: 304
            c = fake.comment(repo, 2, "@nano-bot polled")
            fake.comment(repo, 2, "from a bot", user=DEPENDABOT)
            waits.append(await ch.reconcile(clock()))  # new: 200, stored
            waits.append(await ch.reconcile(clock()))  # the cursor moved: 200, seen again
            waits.append(await ch.reconcile(clock()))  # unchanged since then: 304
            return waits, c
        finally:
            await ch.teardown()
    waits, c = run(go())
    assert waits == [90] * 5  # X-Poll-Interval, above GITHUB_POLL_INTERVAL
    issues = [x for x in fake.calls_of("list") if not x.params["review"]]
    assert [x.params["status"] for x in issues] == [200, 304, 200, 200, 304]
    assert issues[3].params["ids"] and issues[3].params["since"] == c["updated_at"]
    evs = [dict(r) for r in store.conn.execute("SELECT * FROM inbound_events")]
    assert [(e["message_id"], e["thread_id"]) for e in evs] == [(str(c["id"]), "2")]
    assert json.loads(evs[0]["payload"])["is_mention"] is True
    assert store.get_state(f"github:since:{repo}:issues") == c["updated_at"]
    assert webhook_names(config.load()) == []  # no GITHUB_WEBHOOK_SECRET: no door, polling


def test_reconcile_waits_out_githubs_retry_after(world, fake):
    settings, store, runner, clock = world
    fake.webhooks = False
    repo = "octo/slow"
    fake._issue(repo, 1)

    async def go():
        ch = await _up(settings, runner, clock)
        ch.settings.github_repos = repo  # served without a wiring (GITHUB_REPOS)
        try:
            fake.inject("list", status=403, retry_after=120, repo=repo)
            waits = [await ch.reconcile(clock())]
            clock.advance(100)
            waits.append(await ch.reconcile(clock()))  # still held off: no request at all
            clock.advance(21)
            fake.comment(repo, 1, "@nano-bot after the pause")
            waits.append(await ch.reconcile(clock()))
            return waits
        finally:
            await ch.teardown()
    waits = run(go())
    assert waits[:2] == [120, 20] and waits[2] == 5  # then GITHUB_POLL_INTERVAL again
    assert [c.outcome for c in fake.calls_of("list", None) if c.params["repo"] == repo][:2] == [
        "injected:403", "ok"]
    assert [r[0] for r in store.conn.execute("SELECT thread_id FROM inbound_events")] == ["1"]


def test_the_door_serves_github_only_with_a_secret(world, monkeypatch):
    from nanoclaw.cli.channels import report

    line = next(x for x in report(config.load()) if x.startswith("github "))
    assert "no webhook" in line and "/webhook/github" not in line
    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", SECRET)
    assert "github" in webhook_names(config.load())
    line = next(x for x in report(config.load()) if x.startswith("github "))
    assert line.endswith("/webhook/github")


def test_attachment_links_are_fetched_only_from_the_allowlist(world, fake):
    settings, *_ = world
    allow = Allowlist(settings)
    assert allow.allowed("https://github.com/user-attachments/files/1/a.txt")
    assert allow.allowed(f"{fake.url}/user-attachments/files/1/a.txt")  # the API's host
    for bad in ("https://evil.example/user-attachments/files/1/a.txt",
                "http://github.com/user-attachments/files/1/a.txt",  # not https
                "https://github.com/octo/app/issues/1",              # not an attachment
                "https://user@github.com/user-attachments/files/1/a",
                "https://github.com.evil.example/user-attachments/files/1/a",
                "file:///etc/passwd", "https://github.com/user-attachments/../x"):
        assert not allow.allowed(bad), bad


# ---- the parsers, fuzzed ------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

fuzz = hsettings(max_examples=300, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
anything = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                        | st.text(max_size=30), lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
user = st.fixed_dictionaries({"login": st.text(max_size=20) | anything,
                              "id": st.integers(-5, 2**60) | anything,
                              "type": st.sampled_from(["User", "Bot"]) | anything})
comment = st.fixed_dictionaries({"id": st.integers(-5, 2**60) | anything, "body": st.text() |
                                 anything, "user": user | anything,
                                 "updated_at": st.text(max_size=25) | anything,
                                 "created_at": st.text(max_size=25) | anything,
                                 "issue_url": st.text(max_size=60) | anything})
event = st.fixed_dictionaries({
    "action": st.sampled_from(["created", "edited", "deleted", "opened"]) | anything,
    "comment": comment | anything, "issue": st.fixed_dictionaries({
        "number": st.integers(-5, 2**40) | anything, "title": st.text(max_size=20) | anything,
        "body": st.text(max_size=40) | anything, "id": st.integers(1, 99) | anything,
        "user": user}) | anything,
    "pull_request": st.fixed_dictionaries({"number": st.integers(1, 99) | anything}),
    "repository": st.fixed_dictionaries({"full_name": st.sampled_from(
        ["octo/app", "x", "../etc", "a/b/c"]) | st.text(max_size=20) | anything})})


@fuzz
@given(name=st.sampled_from(["issue_comment", "pull_request_review_comment", "issues", "ping",
                             ""]), body=event | anything, mangle=st.booleans())
def test_a_webhook_body_parses_to_well_formed_comments_or_one_clear_error(name, body, mangle):
    raw = json.dumps(body, default=str).encode()
    if mangle:
        raw = raw[: len(raw) // 2]
    try:
        got = parse_event(name, raw)
    except NotGitHub as e:
        assert "\n" not in str(e)
        return
    for c in got:
        assert c.repo.count("/") == 1 and c.number > 0 and c.user_id > 0 and c.login
        assert c.key and c.platform_id == f"github:{c.repo}" and isinstance(c.body, str)


@fuzz
@given(item=comment | anything, review=st.booleans())
def test_a_listed_comment_parses_or_is_skipped(item, review):
    c = parse_listed("octo/app", item, review)
    assert c is None or (c.number > 0 and c.user_id > 0 and c.key and c.repo == "octo/app")
