"""Every channel's parser of outside input, fuzzed in-process with hypothesis (issue 20,
item 6): Telegram updates, Discord gateway events (raw JSON, through discord.py's own
parsers as the worker wires them), Slack Socket Mode envelopes, terminal frames (and a
whole terminal connection), the web API's JSON bodies, and WhatsApp Web messages (the
neonize event converted by the client seam, then the adapter's payload). The WhatsApp
Cloud webhook parser is fuzzed in test_webhook_door.py.

Each property drives the real parsing code with payloads shaped like the platform's,
fields kept, dropped or replaced by anything JSON can hold. What must hold: the parser
hands the host a well-formed event (the router's reader takes it) or nothing, or
refuses with the module's own error in one line; never another exception, so no worker
dies and no event is half-stored. Seeds that once failed are kept as `@example`s.
Derandomized, so CI runs the same cases every time."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from types import SimpleNamespace
from typing import Any

import pytest

from nanoclaw.routing.router import Event

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

fuzz = hsettings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])

# ---- what outside input looks like ---------------------------------------------------------
MISSING = object()
nums = st.integers() | st.integers(-2**70, 2**70) | st.floats() | st.sampled_from(
    [0, -1, 1, 2**63, -2**63, float("inf"), float("-inf"), float("nan"), 1e300])
texts = st.text(max_size=20) | st.sampled_from(
    ["", " ", "\n", "\x00", "\ud800", "a\nb", "1", "-5", "ncq:q1:0", "ncq::1", "ncq:q1:99999",
     "@nanobot", "<@42>", "<@UBOT>", "🙂", "x" * 300, "ncq:\ud800:0"])
scalars = st.none() | st.booleans() | nums | texts
anything = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    texts, kids, max_size=3), max_leaves=10)


def shaped(base: dict[str, Any], fields: dict[str, Any] | None = None) -> st.SearchStrategy:
    """Dicts like `base`, the way a platform (or a bug, or an attacker) could send them: a
    few keys (none, one or two) replaced by anything at all or dropped; every other key
    keeps its value or takes one from its strategy in `fields`, and `fields` keys not in
    `base` are optional extras. Mostly well-formed, so the parsers get past their first
    check and the odd value meets the code behind it."""
    fields = fields or {}
    keys = sorted({*base, *fields})

    def build(broken: frozenset) -> st.SearchStrategy:
        parts = {}
        for k in keys:
            if k in broken:
                parts[k] = anything | st.just(MISSING)
            elif k in base:
                parts[k] = st.just(base[k]) | fields[k] if k in fields else st.just(base[k])
            else:  # an extra: present a third of the time
                parts[k] = st.one_of(st.just(MISSING), st.just(MISSING), fields[k])
        return st.fixed_dictionaries(parts)

    return st.frozensets(st.sampled_from(keys), max_size=2).flatmap(build).map(
        lambda d: {k: v for k, v in d.items() if v is not MISSING})


def one_line(msg: Any) -> None:
    text = str(msg)
    assert text and "\n" not in text and "\r" not in text, repr(text)


# ---- the host every adapter talks to -------------------------------------------------------
_SQL = sqlite3.connect(":memory:", check_same_thread=False)


def _bind(*values: Any) -> None:
    """Bind `values` as the real store does: a string SQLite cannot take (a lone
    surrogate) raises here as it would there."""
    _SQL.execute("SELECT " + ", ".join("?" * len(values)), values)


class Host:
    """A ChannelHost that checks each event the way the store and router will take it."""

    def __init__(self, cards: dict[str, dict] | None = None) -> None:
        self.events: list[tuple] = []
        self.cards = cards or {}

    async def inbound(self, platform_id: str, message_id: str, payload: dict[str, Any],
                      thread_id: str | None = None, kind: str = "chat") -> bool:
        _bind(platform_id, message_id, thread_id)  # raises as the store's INSERT would
        assert isinstance(platform_id, str) and platform_id, platform_id
        assert isinstance(message_id, str) and message_id, message_id
        assert thread_id is None or isinstance(thread_id, str), thread_id
        assert kind in ("chat", "action")
        assert isinstance(payload, dict)
        stored = json.dumps(payload)  # what enqueue_inbound writes
        if kind == "chat":
            assert isinstance(payload["text"], str)
            assert isinstance(payload["is_mention"], bool)
            assert isinstance(payload["is_group"], bool)
            # the runner's inbox stringifies an attachment's name and type (inbox._safe)
            assert all(isinstance(a, dict) for a in payload.get("attachments", []))
            if "reply_to" in payload:
                assert all(isinstance(v, str) for v in payload["reply_to"].values())
            Event.from_row({"channel_type": "x", "platform_id": platform_id,
                            "message_id": message_id, "thread_id": thread_id,
                            "kind": kind, "payload": stored})
        else:
            assert {type(payload[k]) for k in ("question_id", "option", "user_id")} == {str}
        self.events.append((platform_id, message_id, payload, thread_id, kind))
        return True

    def question(self, card_id: str, platform_id: str | None = None) -> dict | None:
        _bind(card_id, platform_id)  # the store's query
        return self.cards.get(card_id)

    def kick(self, platform_id: str | None = None) -> None:
        pass


CARD = {"type": "ask_question", "questionId": "q1", "title": "T", "question": "Which?",
        "options": ["yes", {"label": "no", "value": "n"}]}


# ---- Telegram: one getUpdates update -------------------------------------------------------
def _telegram(host: Host):
    from nanoclaw.channels.telegram_inbound import TelegramInbound

    class File:
        async def download_as_bytearray(self):
            return bytearray(b"data")

    class Bot:
        async def get_file(self, fid):
            if fid.startswith("ok"):
                return File()
            raise OSError("no such file")

        async def answer_callback_query(self, *a, **kw):
            return True

    class Tg(TelegramInbound):
        async def _edit(self, chat_id, message_id, text):
            pass

    tg = Tg()
    tg.bot, tg.me, tg.username, tg.host = Bot(), SimpleNamespace(id=42), "nanobot", host
    return tg


tg_user = shaped({"id": 7, "is_bot": False, "first_name": "Ann"},
                 {"id": st.sampled_from([7, 42, "7"]), "is_bot": st.booleans(),
                  "last_name": texts, "username": texts})
tg_entity = shaped({"type": "mention", "offset": 0, "length": 8},
                   {"offset": nums, "length": nums})
tg_message = shaped(
    {"message_id": 5, "chat": {"id": -100, "type": "supergroup"}, "from": {"id": 7},
     "text": "hi @nanobot"},
    {"message_id": st.integers(), "chat": shaped({"id": -100, "type": "private"},
                                                 {"id": st.integers(), "type": texts}),
     "from": tg_user, "text": texts, "caption": texts,
     "entities": st.lists(tg_entity | anything, max_size=3),
     "caption_entities": st.lists(tg_entity, max_size=2),
     "reply_to_message": shaped({"message_id": 4, "text": "before", "from": {"id": 42}},
                                {"from": tg_user}),
     "is_topic_message": st.booleans(), "message_thread_id": nums | texts,
     "document": shaped({"file_id": "ok1", "file_name": "a.txt", "mime_type": "text/plain",
                         "file_size": 10}, {"file_size": nums, "file_id": texts}),
     "photo": st.lists(shaped({"file_id": "ok2", "file_size": 3}), max_size=2)})
tg_click = shaped({"id": "cb1", "data": "ncq:q1:0", "from": {"id": 7},
                   "message": {"message_id": 9, "chat": {"id": -100}}},
                  {"data": texts, "message": shaped({"message_id": 9,
                                                     "chat": {"id": -100}})})
tg_update = st.builds(
    lambda uid, body: {"update_id": uid, **body}, st.integers(0, 2**40),
    st.fixed_dictionaries({"message": tg_message})
    | st.fixed_dictionaries({"edited_message": tg_message})
    | st.fixed_dictionaries({"callback_query": tg_click})
    | shaped({}, {"message": tg_message, "edited_message": tg_message,
                  "callback_query": tg_click, "channel_post": tg_message}))


@fuzz
@given(update=tg_update)
@example(update={"update_id": 1, "message": {"message_id": 5, "chat": {"id": 1},
                                              "text": "@nanobot", "entities": [
                                                  {"type": "mention", "offset": float("inf")}]}})
@example(update={"update_id": 1, "message": {"message_id": 5, "chat": {"id": 1}, "text": "x",
                                              "from": {"id": 7, "first_name": "A",
                                                       "username": 5}}})
@example(update={"update_id": 1, "edited_message": {"message_id": 5, "chat": {"id": 1},
                                                     "from": [1]}})
def test_telegram_update_is_stored_well_formed_or_skipped(update):
    host = Host({"q1": CARD})
    asyncio.run(_telegram(host)._handle(update))  # never raises: skipped is logged
    assert len(host.events) <= 1


# ---- Discord: raw gateway events through discord.py's parsers ------------------------------
def _discord(host: Host):
    import discord

    from nanoclaw.channels.discord_channel import DiscordChannel, _safe

    ch = DiscordChannel(SimpleNamespace(), host)  # type: ignore[arg-type]
    c = discord.Client(intents=discord.Intents.default(), max_messages=None)
    parsers = c._connection.parsers
    for k, f in list(parsers.items()):
        parsers[k] = _safe(k, f)  # as setup() wires them
    c._connection.user = discord.ClientUser(state=c._connection, data={
        "id": "42", "username": "nano", "discriminator": "0", "avatar": None, "bot": True})
    ch.client, ch.last_ok = c, time.monotonic()
    for h in (ch.on_message, ch.on_raw_message_edit, ch.on_interaction):
        c.event(h)
    errors: list[BaseException] = []

    async def on_error(event: str, *a: Any, **kw: Any) -> None:
        import sys

        errors.append(sys.exc_info()[1])  # type: ignore[arg-type]

    c.on_error = on_error  # type: ignore[method-assign]
    return ch, parsers, errors


dc_user = shaped({"id": "7", "username": "ann", "discriminator": "0", "avatar": None},
                 {"id": st.sampled_from(["7", "42", "-1", str(2**64)]),
                  "bot": st.booleans(), "global_name": texts})
dc_base = {"id": "1001", "channel_id": "2001", "author": {"id": "7", "username": "ann",
                                                           "discriminator": "0",
                                                           "avatar": None},
           "content": "hi <@42>", "timestamp": "2024-01-01T00:00:00+00:00",
           "edited_timestamp": None, "tts": False, "mention_everyone": False,
           "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
           "pinned": False, "type": 0}
dc_attachment = shaped({"id": "9", "filename": "a.txt", "size": 3,
                        "url": "http://127.0.0.1:9/a", "proxy_url": "http://127.0.0.1:9/a"},
                       {"size": nums, "content_type": texts})
dc_message = shaped(dc_base, {
    "id": st.sampled_from(["1001", "0"]), "channel_id": st.sampled_from(["2001", "0"]),
    "guild_id": st.sampled_from(["3001", "2001"]), "author": dc_user,
    "content": texts, "type": st.sampled_from([0, 19, 7, 99]),
    "edited_timestamp": st.sampled_from(["2024-01-01T00:01:00+00:00", "garbage", ""]),
    "mentions": st.lists(dc_user, max_size=2),
    "attachments": st.lists(dc_attachment, max_size=2),
    "referenced_message": shaped(dc_base, {"author": dc_user}),
    "message_reference": shaped({"message_id": "1000", "channel_id": "2001"})})
dc_interaction = shaped(
    {"id": "77", "application_id": "1", "type": 3, "token": "t", "version": 1,
     "channel_id": "2001", "user": {"id": "7", "username": "ann", "discriminator": "0",
                                    "avatar": None},
     "data": {"custom_id": "ncq:q1:1", "component_type": 2}},
    {"type": st.sampled_from([1, 2, 3, 5]), "data": shaped(
        {"custom_id": "ncq:q1:1", "component_type": 2}, {"custom_id": texts}),
     "channel": shaped({"id": "2001", "type": 11, "parent_id": "2000"})})
dc_event = st.tuples(st.sampled_from(["MESSAGE_CREATE", "MESSAGE_UPDATE"]), dc_message) \
    | st.tuples(st.just("INTERACTION_CREATE"), dc_interaction)


@fuzz
@given(event=dc_event)
def test_discord_gateway_event_is_stored_well_formed_or_dropped(event):
    """What the gateway sends goes through discord.py's parser (wrapped as setup() does:
    a parser's exception drops the event with one log line) and our handlers; a handler
    that raises loses the event with a traceback, so none may."""
    name, data = event
    host = Host({"q1": CARD})

    async def main() -> list[BaseException]:
        ch, parsers, errors = _discord(host)
        await ch.client._async_setup_hook()  # the loop its dispatch schedules handlers on
        parsers[name](data)  # never raises (_safe)
        me = asyncio.current_task()
        while pending := [t for t in asyncio.all_tasks() if t is not me]:
            await asyncio.wait(pending, timeout=20)
        return errors

    errors = asyncio.run(main())
    assert not errors, errors
    assert len(host.events) <= 1


def test_discord_seam_reaches_the_handlers():
    """The fuzzed seam is live: a well-formed MESSAGE_CREATE becomes one event."""
    host = Host()

    async def main() -> list[BaseException]:
        ch, parsers, errors = _discord(host)
        await ch.client._async_setup_hook()
        parsers["MESSAGE_CREATE"](dc_base)
        me = asyncio.current_task()
        while pending := [t for t in asyncio.all_tasks() if t is not me]:
            await asyncio.wait(pending, timeout=20)
        return errors

    assert asyncio.run(main()) == []
    ((pid, mid, payload, thread, kind),) = host.events
    assert (pid, mid, payload["text"], payload["is_mention"]) == (
        "discord:2001", "1001", "hi @nano", True)


# ---- Slack: a Socket Mode envelope ---------------------------------------------------------
def _slack(host: Host):
    from nanoclaw.channels.slack_inbound import SlackInbound

    class Web:
        async def users_info(self, user):
            if user.startswith("U"):
                return {"user": {"profile": {"display_name": "Ann"}, "name": "ann"}}
            raise OSError("users.info failed")

        async def chat_update(self, **kw):
            return {"ok": True}

    class Resp:
        def raise_for_status(self):
            pass

        async def read(self):
            return b"file"

    class Get:
        def __init__(self, url):
            self.url = url

        async def __aenter__(self):
            if "ok" in self.url:
                return Resp()
            raise OSError("refused")

        async def __aexit__(self, *exc):
            return False

    class Http:
        def get(self, url, headers=None):
            return Get(url)

    class Client:
        def __init__(self):
            self.acks: list[Any] = []

        async def send_socket_mode_response(self, resp):
            self.acks.append(resp.envelope_id)

    sl = SlackInbound()
    sl.web, sl.http, sl.bot_user, sl.host = Web(), Http(), "UBOT", host  # type: ignore
    sl.settings = SimpleNamespace(slack_bot_token="xoxb-test")
    return sl, Client()


sl_file = shaped({"name": "a.txt", "mimetype": "text/plain", "size": 4,
                  "url_private_download": "https://files/ok"},
                 {"size": nums, "url_private": texts})
sl_message = shaped(
    {"type": "message", "channel": "C1", "user": "U7", "text": "hi <@UBOT>",
     "ts": "1700000000.000100"},
    {"channel": st.sampled_from(["C1", "D1", ""]),
     "user": st.sampled_from(["U7", "UBOT", "W1"]), "text": texts,
     "ts": st.sampled_from(["1.2", "3.4"]) | texts, "thread_ts": texts,
     "channel_type": st.sampled_from(["im", "channel"]),
     "subtype": st.sampled_from(["message_changed", "file_share", "thread_broadcast",
                                 "message_deleted", "bot_message"]),
     "bot_id": st.sampled_from(["", "B1"]), "files": st.lists(sl_file | anything, max_size=2),
     "edited": shaped({"ts": "1700000001.0"}, {"ts": texts})})
sl_event = sl_message | sl_message.flatmap(lambda m: shaped(m, {
    "message": sl_message, "previous_message": sl_message}))
sl_action = shaped({"action_id": "ncq:q1:0", "action_ts": "1.2"}, {"action_id": texts})
sl_interactive = shaped(
    {"type": "block_actions", "actions": [{"action_id": "ncq:q1:0"}],
     "channel": {"id": "C1"}, "user": {"id": "U7"}, "trigger_id": "tr1",
     "message": {"ts": "1.1"}},
    {"actions": st.lists(sl_action | anything, max_size=3),
     "container": shaped({"channel_id": "C1", "message_ts": "1.1"}),
     "channel": shaped({"id": "C1"})})
sl_envelope = st.fixed_dictionaries({
    "type": st.just("events_api"), "envelope_id": st.just("env-1") | texts,
    "payload": st.fixed_dictionaries({"event": sl_event})}) | st.fixed_dictionaries({
        "type": st.just("interactive"), "envelope_id": st.just("env-2"),
        "payload": sl_interactive}) | shaped(
    {"type": "events_api", "envelope_id": "env-1", "payload": {"event": {}}},
    {"type": st.sampled_from(["events_api", "interactive", "slash_commands", "hello"]),
     "payload": shaped({}, {"event": sl_event}) | sl_interactive})


@fuzz
@given(envelope=sl_envelope)
@example(envelope={"type": "events_api", "envelope_id": "e", "payload": {"event": {
    "type": "message", "channel": "C1", "user": "U7", "ts": "1", "text": "x",
    "files": [{"name": "a", "size": float("inf"), "url_private": "https://files/ok"}]}}})
def test_slack_envelope_is_acked_once_stored_well_formed_or_dropped(envelope):
    from slack_sdk.socket_mode.request import SocketModeRequest

    host = Host({"q1": CARD})
    try:
        req = SocketModeRequest.from_dict(envelope)
    except ValueError:
        return  # the SDK refuses it before any listener of ours runs
    if req is None:
        return
    sl, client = _slack(host)
    asyncio.run(sl._request(client, req))  # never raises
    assert client.acks == [req.envelope_id]  # acked, or Slack redelivers it forever
    assert len(host.events) <= 1 or req.type == "interactive"


# ---- the terminal: one frame, and a whole connection ---------------------------------------
cli_obj = shaped({"type": "message", "text": "hi", "chat": "local", "id": "m-1"},
                 {"type": st.sampled_from(["message", "subscribe", "bye"]),
                  "chat": st.sampled_from(["local", "a-b_c", "-x", "a" * 65, "a\n"]),
                  "id": st.sampled_from(["m.1", "", "a b", "x" * 129]) | texts})
cli_line = (cli_obj | anything).map(lambda o: json.dumps(o).encode()) | st.binary(
    max_size=60) | st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass"))


@fuzz
@given(line=cli_line)
@example(line=b'"\\ud800"')
@example(line=b'{"type": "\\ud800"}')
@example(line=b"[" * 70 + b"]" * 70)
def test_terminal_frame_parses_or_is_refused_in_one_line(line):
    from nanoclaw.channels.cli import MSG_ID, BadFrame, parse_frame

    try:
        frame = parse_frame(line)
    except BadFrame as e:
        one_line(e)
        return
    assert frame["type"] in ("message", "subscribe")
    if frame["type"] == "message":
        assert isinstance(frame["text"], str) and frame["text"].strip()
        assert MSG_ID.match(frame["id"])


@fuzz
@given(lines=st.lists(cli_line.filter(lambda b: b"\n" not in b), min_size=1, max_size=6))
def test_a_terminal_connection_answers_each_frame_in_one_line_and_stays(lines):
    """Each line gets exactly one answer frame (ack, subscribed or error), each one JSON
    line, and the connection reads on until the client closes it."""
    from nanoclaw.channels.cli import CliChannel

    host = Host()

    class Writer:
        def __init__(self) -> None:
            self.out = bytearray()
            self.closed = False

        def write(self, data: bytes) -> None:
            self.out += data

        async def drain(self) -> None:
            pass

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

    async def main() -> Writer:
        ch = CliChannel(SimpleNamespace(), host)  # type: ignore[arg-type]
        ch.clients, ch.user = {}, "owner"
        reader, writer = asyncio.StreamReader(), Writer()
        reader.feed_data(b"\n".join(lines) + b"\n")
        reader.feed_eof()
        await ch._client(reader, writer)  # type: ignore[arg-type]
        return writer

    w = asyncio.run(main())
    answers = bytes(w.out).split(b"\n")
    assert answers[-1] == b""
    frames = [json.loads(a) for a in answers[:-1]]
    assert len(frames) == len([x for x in lines if x.strip()]), (lines, frames)
    for f in frames:
        assert f["type"] in ("ack", "subscribed", "error")
        if f["type"] == "error":
            one_line(f["error"])
    assert w.closed
    assert len([f for f in frames if f["type"] == "ack"]) == len(host.events)


# ---- the web API: JSON bodies --------------------------------------------------------------
@pytest.fixture
def web(tmp_path):
    """A WebChannel's app on a real central DB, served in-process (aiohttp's test
    server on 127.0.0.1), one event loop for every example."""
    from aiohttp import web as aioweb
    from aiohttp.test_utils import TestClient, TestServer

    from nanoclaw import config as cfg
    from nanoclaw.channels.web import WebChannel
    from nanoclaw.db.store import Store

    s = cfg.Settings(data_dir=tmp_path / "data", logs_dir=tmp_path / "logs",
                     groups_dir=tmp_path / "groups")
    s.data_dir.mkdir(parents=True)
    host = Host({"q1": CARD})
    loop = asyncio.new_event_loop()
    ch = WebChannel(s, host)
    ch.store, ch.token, ch.owner, ch.user, ch.seq, ch.boot = (
        Store.open(s.data_dir), "tok", "local:owner", "owner", 0, "b")
    ch.events = {}

    async def up() -> TestClient:
        ch.changed = asyncio.Condition()
        app = aioweb.Application(client_max_size=2 << 20, middlewares=[ch._guard])
        ch.routes(app)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        return client

    client = loop.run_until_complete(up())
    try:
        yield SimpleNamespace(loop=loop, client=client, host=host, ch=ch)
    finally:
        loop.run_until_complete(client.close())
        ch.store.close()
        loop.close()


web_obj = shaped({"text": "hi", "chat": "local", "id": "w-1", "question_id": "q1",
                  "index": 0, "name": "c1"},
                 {"chat": st.sampled_from(["local", "x y", "-a", "a" * 65]),
                  "id": st.sampled_from(["w.1", "", "a\nb"]) | texts,
                  "question_id": st.sampled_from(["q1", "q2", "\ud800"]) | texts,
                  "index": st.sampled_from([0, 1, 2, -1, True, 2**70]) | nums,
                  "name": st.sampled_from(["c2", "local", "Bad Name", "\ud800"]),
                  "agent": st.sampled_from(["ag-none", "", "\ud800"]) | texts})
web_body = (web_obj | anything).map(lambda o: json.dumps(o).encode()) | st.binary(
    max_size=40) | st.sampled_from([b"[" * 100, b'{"text": "\\ud800"}', b"\xff"])
web_call = st.tuples(st.sampled_from(["/api/send", "/api/answer", "/api/chats"]),
                     web_body, st.sampled_from(["application/json",
                                                "application/json; charset=utf-16",
                                                "text/plain; charset=bogus"]))


@example(call=("/api/answer", b'{"question_id": "\\ud800", "index": 0}', "application/json"))
@example(call=("/api/chats", b'{"name": "c3", "agent": "\\ud800"}', "application/json"))
@fuzz
@given(call=web_call)
def test_web_api_body_is_taken_or_refused_with_one_line(web, call):
    path, body, ctype = call
    before = len(web.host.events)

    async def post() -> tuple[int, bytes]:
        r = await web.client.post(path, data=body, headers={
            "Authorization": "Bearer tok", "Content-Type": ctype})
        return r.status, await r.read()

    status, raw = web.loop.run_until_complete(post())
    assert status in (200, 201, 400, 404, 409), (status, raw[:300])
    answer = json.loads(raw)
    if status >= 400:
        one_line(answer["error"])
        assert len(web.host.events) == before  # a refusal stores nothing
    elif path != "/api/chats":
        assert len(web.host.events) == before + 1


# ---- WhatsApp Web: a neonize message event → WAMessage → the adapter's payload -------------
def _whatsapp(host: Host, tmp_path):
    from collections import OrderedDict

    from fakes.fake_wa_client import ME, ME_LID, FakeWAClient
    from nanoclaw.channels.whatsapp import WhatsAppChannel

    ch = WhatsAppChannel(SimpleNamespace(), host)  # type: ignore[arg-type]
    ch.client = FakeWAClient(lids={"900000000000009@lid": "15551112222@s.whatsapp.net"})
    ch.client.up = True
    ch.dir = tmp_path
    ch.me = (ME, ME_LID)
    ch.lids, ch.known, ch.sent, ch.parts = {}, OrderedDict(), OrderedDict(), {}
    ch.cards = {"whatsapp:15551112222": {"qid": "q1", "pid": "whatsapp:15551112222",
                                        "mids": ["3EB0card"]}}
    return ch


jids = st.sampled_from(["15551112222@s.whatsapp.net", "15551112222:3@s.whatsapp.net",
                        "900000000000009@lid", "900000000000001@lid",
                        "15550000000@s.whatsapp.net", "120363000000000001@g.us",
                        "status@broadcast", "", "@", "x@y@z", ":@lid", "."]) | texts
wa_media = st.builds(lambda kind, name, mime, size: SimpleNamespace(
    kind=kind, name=name, mime=mime, size=size), st.sampled_from(["image", "document"]),
    texts, texts, st.none() | st.integers(-1, 2**40))
wa_message = st.builds(
    lambda **kw: kw, id=texts.filter(bool), chat=jids, sender=jids, sender_alt=jids,
    chat_alt=jids, push_name=texts, text=texts | st.sampled_from(["1", "2.", " 9)", "0"]),
    is_group=st.booleans(), from_me=st.booleans(), is_edit=st.booleans(),
    mentions=st.lists(jids, max_size=2), quoted_id=texts | st.just("3EB0card"),
    quoted_sender=jids, quoted_text=texts, reaction=st.none() | texts,
    media=st.lists(wa_media, max_size=2))


@fuzz
@given(fields=wa_message)
@example(fields={"id": "m1", "chat": "15551112222@s.whatsapp.net", "sender": "x@lid",
                 "text": "1", "media": []})
def test_whatsapp_message_becomes_a_well_formed_payload(tmp_path, fields):
    from nanoclaw.channels.whatsapp_client import WAMedia, WAMessage

    host = Host({"q1": CARD})
    media = [WAMedia(m.kind, m.name, m.mime, m.size, m.name) for m in fields.pop("media")]
    msg = WAMessage(**fields, media=media)
    ch = _whatsapp(host, tmp_path)
    ch.client.files = {m.handle: b"data" for m in media if m.name.startswith("a")}
    asyncio.run(ch._handle(msg))  # what _on_event runs; its guard would drop the message
    assert len(host.events) <= 1


pb_jid = st.builds(lambda j: dict(zip(("User", "Server"), (j.partition("@")[0],
                                                            j.partition("@")[2]))), jids)
pb_ctx = st.fixed_dictionaries({}, optional={
    "stanzaID": texts, "participant": texts, "mentionedJID": st.lists(texts, max_size=2),
    "quotedMessage": st.fixed_dictionaries({}, optional={
        "conversation": texts, "extendedTextMessage": st.fixed_dictionaries(
            {}, optional={"text": texts})})})
pb_media = st.fixed_dictionaries({}, optional={
    "caption": texts, "mimetype": texts, "fileLength": st.integers(0, 2**64 - 1),
    "contextInfo": pb_ctx})
pb_inner = st.fixed_dictionaries({}, optional={
    "conversation": texts,
    "extendedTextMessage": st.fixed_dictionaries({}, optional={"text": texts,
                                                               "contextInfo": pb_ctx}),
    "imageMessage": pb_media, "stickerMessage": pb_media,
    "documentMessage": st.builds(lambda m, n: {**m, "fileName": n}, pb_media, texts),
    "reactionMessage": st.fixed_dictionaries({}, optional={
        "text": texts, "key": st.fixed_dictionaries({}, optional={"ID": texts})})})
pb_message = st.one_of(pb_inner, pb_inner.map(lambda m: {"ephemeralMessage": {"message": m}}),
                       pb_inner.map(lambda m: {"documentWithCaptionMessage": {"message": m}}))
pb_event = st.fixed_dictionaries({
    "Info": st.fixed_dictionaries({"ID": texts, "Pushname": texts, "MessageSource":
                                   st.fixed_dictionaries({}, optional={
                                       "Chat": pb_jid, "Sender": pb_jid,
                                       "SenderAlt": pb_jid, "RecipientAlt": pb_jid,
                                       "IsGroup": st.booleans(),
                                       "IsFromMe": st.booleans()})}),
    "Message": pb_message}, optional={"IsEdit": st.booleans()})


@fuzz
@given(ev=pb_event)
def test_whatsapp_neonize_event_converts_and_becomes_a_payload(tmp_path, ev):
    """The client seam's conversion of a neonize MessageEv (any text, any JID, wrapped or
    not, media with any mime type or length), then the adapter, as _on_event runs them."""
    neonize = pytest.importorskip("neonize.events")
    from google.protobuf.json_format import ParseDict

    from nanoclaw.channels.whatsapp_client import _parse

    try:
        e = ParseDict(ev, neonize.MessageEv())
    except Exception:  # protobuf refuses what the wire could not carry (lone surrogates)
        return
    msg = _parse(e)
    host = Host({"q1": CARD})
    ch = _whatsapp(host, tmp_path)
    ch.client.files = {}
    asyncio.run(ch._handle(msg))
    assert len(host.events) <= 1
