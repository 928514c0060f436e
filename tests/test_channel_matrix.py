"""Matrix end to end against a real Synapse (tests/servers/synapse.py, started once per
run) behind the fault-injecting proxy of tests/fakes/fake_matrix.py: a real host whose
`channel:matrix` worker drives matrix-nio. What every channel does is in
tests/test_channel_contract.py, `-k matrix` (a 429's retry_after_ms is waited out there);
here is what only Matrix does: invites and the owner's approval, mentions in a room's
thread, a cold DM, a worker killed mid-conversation (plain and end-to-end encrypted), a
gappy timeline paged back, an event the bot cannot decrypt, sanitised HTML, a stalled
/sync and one whose token stops moving, login and upload limits. The parsers of what
Matrix sends are fuzzed at the end."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Host, wait_for
from fakes.fake_matrix import FakeMatrix, allow
from fakes.hosts import enqueue, inbound_events, log, outbox, session_inbound, wire_chat

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nanoclaw.channels.matrix_inbound import (  # noqa: E402
    BadEvent,
    MatrixInbound,
    Me,
    mentions,
    parse_event,
)
from nanoclaw.channels.matrix_outbound import matrix_html  # noqa: E402

WORKER = "channel:matrix"


def _synapse():
    from servers.synapse import PYTHON, shared

    if not PYTHON.exists():
        pytest.skip(f"no Synapse venv at {PYTHON} (make test-servers)")
    return shared()


@pytest.fixture(scope="session")
def synapse():
    return _synapse()


def start_host(base, fake: FakeMatrix, **env: str) -> tuple[Host, Any]:
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(base, model.url, {**fake.host_env(**env), "NANOCLAW_SEND_ATTEMPTS": "3",
                               "NANOCLAW_WEB_ENABLED": "false"})
    h.start()
    wait_for(lambda: fake.connected(h), 30, what="matrix connected")
    return h, model


@pytest.fixture(scope="module")
def world(synapse, tmp_path_factory):
    fake = FakeMatrix(synapse).start()
    h, model = start_host(tmp_path_factory.mktemp("matrix"), fake)
    yield fake, h
    h.cleanup()
    model.stop()
    fake.stop()


@pytest.fixture(scope="module")
def live(synapse, tmp_path_factory):
    """A host of its own (a fresh crash-loop breaker: its first restart is at once) with
    one-second syncs, so a stalled one is found dead within seconds."""
    fake = FakeMatrix(synapse).start()
    h, model = start_host(tmp_path_factory.mktemp("matrix-live"), fake,
                          MATRIX_SYNC_TIMEOUT="0.5", NANOCLAW_CHANNEL_LIVENESS="1")
    yield fake, h
    h.cleanup()
    model.stop()
    fake.stop()


def pid(room: str) -> str:
    return f"matrix:{room}"


def sent(fake: FakeMatrix, room: str, who: Any = None, thread: str | None = None) -> list:
    """What the bot sent to a room, as `who` (default Ann) sees it."""
    return fake.users.bot_sent(who or fake.ann, room, fake.bot.user_id, thread)


def texts(fake: FakeMatrix, room: str, who: Any = None) -> list[str]:
    return [s.text for s in sent(fake, room, who)]


def answered(fake: FakeMatrix, room: str, text: str, thread: str | None = None,
             timeout: float = 60, who: Any = None):
    return wait_for(lambda: next((s for s in sent(fake, room, who, thread) if s.text == text),
                                 None), timeout, what=f"{text!r} in {room}")


def agent_saw(host: Host, room: str) -> list[str]:
    """The texts the agent was given from a room, in order (a replay would show twice)."""
    return [json.loads(m["content"]).get("text") for m in session_inbound(host, "matrix",
                                                                         pid(room))
            if m["kind"] == "chat"]


# ---- invites, approval, mentions --------------------------------------------------------
def test_a_dm_from_a_new_user_is_answered_after_the_owners_approval(world, synapse):
    fake, host = world
    bob = synapse.register(f"bob-{os.urandom(3).hex()}", "Bob")
    room = fake.users.create_room(bob, [fake.bot.user_id], direct=True)
    fake.users.say(bob, room, "hello from Matrix")
    card = wait_for(lambda: host.q("SELECT * FROM channel_outbox WHERE idem_key LIKE"
                                   " 'card:chan-%'"), 30, what="the owner's approval card")[0]
    assert card["channel_type"] == "cli"
    assert fake.bot.user_id not in fake.users.members(bob, room)  # not joined: not allowed
    assert "not allowed yet" in log(host)
    qid = json.loads(card["content"])["questionId"]
    r = host.cli("approvals", "approve", qid, "--agent", "main")
    assert r.returncode == 0, r.stderr
    got = answered(fake, room, "echo: hello from Matrix", who=bob)
    assert fake.bot.user_id in fake.users.members(bob, room)
    ev = next(e for e in inbound_events(host, "matrix") if e["message_id"] == got.reply_to)
    assert ev["payload"]["sender_id"] == f"matrix:{bob.user_id}"
    assert ev["payload"]["sender_name"] == "Bob" and ev["payload"]["is_group"] is False
    assert "invited me to a direct chat" in inbound_events(host, "matrix")[0]["payload"]["text"]
    assert texts(fake, room, bob).count("echo: hello from Matrix") == 1


def test_a_room_mention_is_answered_in_its_thread(world, synapse):
    fake, host = world
    carl = synapse.register(f"carl-{os.urandom(3).hex()}", "Carl")
    room = fake.users.create_room(fake.ann, [fake.bot.user_id, carl.user_id], direct=False,
                                  name="team")
    synapse.call("POST", f"/_matrix/client/v3/join/{room}", {}, carl.access_token)
    wire_chat(host, "matrix", pid(room), is_group=True, engage_mode="mention")
    wait_for(lambda: fake.bot.user_id in fake.users.members(fake.ann, room), 30, what="joined")
    root = fake.users.say(fake.ann, room, "planning the offsite")
    fake.users.say(carl, room, "just chatting", thread=root)
    asked = fake.users.say(carl, room, "Claw what time is it", thread=root)
    got = answered(fake, room, "echo: Claw what time is it", root)
    assert got.thread == root
    pill = fake.users.say(fake.ann, room, "and you?", thread=root, **{
        "m.mentions": {"user_ids": [fake.bot.user_id]}})
    answered(fake, room, "echo: and you?", root)
    fake.users.send(carl, room, {"msgtype": "m.text", "body": "thanks!", "m.relates_to": {
        "rel_type": "m.thread", "event_id": root, "is_falling_back": False,
        "m.in_reply_to": {"event_id": got.id}}})  # a reply to the bot: no name needed
    answered(fake, room, "echo: thanks!", root)
    evs = {e["message_id"]: e for e in inbound_events(host, "matrix")
           if e["platform_id"] == pid(room)}
    assert evs[asked]["thread_id"] == root and evs[asked]["payload"]["is_mention"] is True
    assert evs[pill]["payload"]["is_mention"] is True and evs[asked]["payload"]["is_group"]
    sent = fake.bot_sent(room)
    assert all(s.thread == root for s in sent)  # nothing outside the thread
    assert "echo: just chatting" not in [s.text for s in sent]
    assert "echo: planning the offsite" not in [s.text for s in sent]


def test_a_cold_dm_opens_a_direct_room(world, synapse):
    """An approval card for a Matrix user goes to `@dm:matrix:<mxid>`: a direct room."""
    fake, host = world
    erin = synapse.register(f"erin-{os.urandom(3).hex()}", "Erin")
    enqueue(host, "dm-erin", "matrix", f"@dm:matrix:{erin.user_id}", {"text": "a question"})
    wait_for(lambda: (outbox(host, "dm-erin") or {}).get("status") == "sent", 30)
    got = synapse.call("GET", "/_matrix/client/v3/sync?timeout=0", None, erin.access_token)
    (room,) = got["rooms"]["invite"]
    member = [e for e in got["rooms"]["invite"][room]["invite_state"]["events"]
              if e.get("state_key") == erin.user_id][0]
    assert member["content"]["is_direct"] is True and member["sender"] == fake.bot.user_id
    synapse.call("POST", f"/_matrix/client/v3/join/{room}", {}, erin.access_token)
    assert texts(fake, room, erin) == ["a question"]
    dm = host.q("SELECT m.platform_id FROM user_dms d JOIN messaging_groups m ON"
                " m.id=d.messaging_group_id WHERE d.user_id=?", (f"matrix:{erin.user_id}",))
    assert dm == [{"platform_id": pid(room)}]


# ---- restarts ---------------------------------------------------------------------------
def test_a_killed_worker_neither_replays_nor_skips(world):
    fake, host = world
    room = fake.chat(101)
    wire_chat(host, "matrix", pid(room))
    fake.user_says(room, "one")
    answered(fake, room, "echo: one")
    before = host.worker_pid(WORKER)
    os.kill(before, signal.SIGKILL)  # mid-conversation: the next messages come while down
    fake.user_says(room, "two")
    fake.user_says(room, "three")
    wait_for(lambda: host.worker_pid(WORKER) not in (None, before), 30, what="restarted")
    answered(fake, room, "echo: three")  # the two may reach the agent as one turn
    time.sleep(1.5)  # a replay would show by now
    assert [e["payload"]["text"] for e in inbound_events(host, "matrix")
            if e["platform_id"] == pid(room)] == ["one", "two", "three"]
    assert agent_saw(host, room) == ["one", "two", "three"]  # each once, none skipped
    got = texts(fake, room)
    assert got[0] == "echo: one" and got[-1] == "echo: three" and len(got) == len(set(got))


def test_a_gappy_timeline_is_paged_back_nothing_skipped(world):
    """More messages than one sync carries (100 a room) while the bot's sync is held: the
    next sync is `limited`, and the rest is read back from /messages to the saved token."""
    fake, host = world
    room = fake.chat(105)
    wire_chat(host, "matrix", pid(room))
    rule = fake.inject("sync", stall=True)  # the bot's next sync hangs until released
    try:  # a state event ends the sync now waiting, so the next one comes (and is held)
        fake.hs.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.topic/",
                     {"topic": "gap"}, fake.ann.access_token)
        wait_for(lambda: fake.calls_of("sync", "stalled"), 30, what="a held sync")
        sent = [fake.users.say(fake.ann, room, f"m{i}") for i in range(110)]
    finally:
        rule.count = 0
        fake.release()
    wait_for(lambda: len([e for e in inbound_events(host, "matrix")
                          if e["platform_id"] == pid(room)]) >= 110, 60, what="all stored")
    got = [e["message_id"] for e in inbound_events(host, "matrix")
           if e["platform_id"] == pid(room)]
    assert got == sent  # each once, in order, none skipped
    assert "paged back after a gap" in log(host)


# ---- sanitised HTML, liveness ----------------------------------------------------------
def test_markdown_becomes_sanitised_html(world):
    fake, host = world
    room = fake.chat(102)
    md = ("**bold** and _it_ <script>alert(1)</script> <b onclick=x>raw</b>\n\n"
          "[bad](javascript:alert(1)) [good](https://example.org) `a<b`")
    enqueue(host, "md-102", "matrix", pid(room), {"text": md})
    wait_for(lambda: (outbox(host, "md-102") or {}).get("status") == "sent", 30)
    (s,) = fake.bot_sent(room)
    c = s.raw["content"]
    html = c["formatted_body"]
    assert c["format"] == "org.matrix.custom.html"
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html
    assert "&lt;script&gt;" in html and "<script" not in html
    assert "<b " not in html and "onclick" not in html.replace("onclick=x", "")  # as text
    assert "&lt;b onclick=x&gt;" in html
    assert "javascript:" not in html.split("href=")[-1] and 'href="javascript' not in html
    assert '<a href="https://example.org">good</a>' in html
    assert "<code>a&lt;b</code>" in html
    assert "**" not in c["body"] and "bold" in c["body"]


def test_a_stalled_sync_is_found_dead_and_the_worker_reconnects(live):
    fake, host = live
    room = fake.chat(103)
    wire_chat(host, "matrix", pid(room))
    before = host.worker_pid(WORKER)
    rule = fake.inject("sync", count=1000, stall=True)  # answers nothing, never
    try:
        wait_for(lambda: "the connection is dead" in log(host), 30, what="found dead")
        wait_for(lambda: host.worker_pid(WORKER) not in (None, before), 30, what="restarted")
    finally:
        rule.count = 0
        fake.release()
    fake.user_says(room, "still there?")
    answered(fake, room, "echo: still there?")
    assert "no good sync for" in log(host)


def test_a_sync_whose_token_stops_moving_is_found_dead(live):
    fake, host = live
    assert fake.proxy is not None
    fake.proxy.frozen = True  # answers at once, never moving on
    try:
        wait_for(lambda: "the sync token stopped moving" in log(host), 30, what="found dead")
        # the worker exits non-zero for the breaker to restart (later: a second crash)
        wait_for(lambda: "worker channel:matrix died (exit 1)" in log(host).split(
            "the sync token stopped moving", 1)[-1], 30, what="the worker exited")
    finally:
        fake.proxy.frozen = False


# ---- end-to-end encryption ---------------------------------------------------------------
class NioUser:
    """A user's own matrix-nio client with E2EE, syncing in a thread of its own."""

    def __init__(self, url: str, account: Any, store: str):
        from nio import AsyncClient, AsyncClientConfig, RoomMessage

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.got: list[tuple[str, Any]] = []
        cfg = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=False)

        async def init() -> Any:
            c = AsyncClient(url, account.user_id, account.device_id, store_path=store,
                            config=cfg)
            c.restore_login(account.user_id, account.device_id, account.access_token)
            await c.keys_upload()
            c.add_event_callback(lambda room, ev: self.got.append((room.room_id, ev)),
                                 RoomMessage)
            await c.sync(timeout=0, full_state=True)
            return c

        self.client = self.run(init())
        self.task = asyncio.run_coroutine_threadsafe(
            self.client.sync_forever(timeout=500), self.loop)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def say(self, room: str, text: str) -> str:
        got = self.run(self.client.room_send(room, "m.room.message",
                                             {"msgtype": "m.text", "body": text},
                                             ignore_unverified_devices=True))
        return got.event_id

    def seen(self, room: str) -> list[str]:
        return [getattr(ev, "body", "") for r, ev in list(self.got) if r == room
                and ev.sender != self.client.user_id]

    def knows_devices_of(self, user: str) -> bool:
        return bool(list(self.client.device_store.active_user_devices(user)))

    def close(self) -> None:
        self.task.cancel()
        try:
            self.run(self.client.close(), 5)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def e2ee(synapse, tmp_path_factory):
    fake = FakeMatrix(synapse).start()
    base = tmp_path_factory.mktemp("matrix-e2ee")
    h, model = start_host(base, fake, MATRIX_E2EE="1", MATRIX_SYNC_TIMEOUT="1")
    dana = synapse.register(f"dana-{os.urandom(3).hex()}", "Dana")
    allow(h, dana.user_id)
    (base / "dana-store").mkdir()
    user = NioUser(synapse.url, dana, str(base / "dana-store"))
    yield fake, h, user, dana
    user.close()
    h.cleanup()
    model.stop()
    fake.stop()


def test_an_encrypted_dm_survives_a_killed_worker_and_undecryptable_is_told(e2ee):
    fake, host, user, dana = e2ee
    from nio import RoomCreateResponse

    made = user.run(user.client.room_create(is_direct=True, invite=[fake.bot.user_id],
                                            initial_state=[{
                                                "type": "m.room.encryption", "state_key": "",
                                                "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]))
    assert isinstance(made, RoomCreateResponse), made
    room = made.room_id
    wire_chat(host, "matrix", pid(room))
    wait_for(lambda: fake.bot.user_id in fake.users.members(dana, room), 30, what="joined")
    wait_for(lambda: room in user.client.rooms and fake.bot.user_id in
             user.client.rooms[room].users and user.knows_devices_of(fake.bot.user_id), 30,
             what="Dana's client knows the bot's device")
    first = user.say(room, "secret one")
    wait_for(lambda: "echo: secret one" in user.seen(room), 60, what="encrypted answer")
    (ev,) = [e for e in inbound_events(host, "matrix") if e["message_id"] == first]
    assert ev["payload"]["text"] == "secret one"  # decrypted by the bot
    raw = fake.users.history(dana, room)
    assert not [e for e in raw if e["type"] == "m.room.message"]  # all of it encrypted

    before = host.worker_pid(WORKER)
    os.kill(before, signal.SIGKILL)
    user.say(room, "secret two")
    user.say(room, "secret three")
    wait_for(lambda: host.worker_pid(WORKER) not in (None, before), 30, what="restarted")
    wait_for(lambda: "echo: secret three" in user.seen(room), 60, what="answer after restart")
    time.sleep(1.5)  # a replay would show by now
    assert agent_saw(host, room) == ["secret one", "secret two", "secret three"]
    echoes = [t for t in user.seen(room) if t.startswith("echo:")]
    assert echoes[0] == "echo: secret one" and echoes[-1] == "echo: secret three"
    assert len(echoes) == len(set(echoes))  # nothing answered twice

    # files both ways, encrypted in the media repository
    enqueue(host, "file-e2ee", "matrix", pid(room), {"text": "the report", "files": [
        {"name": "r.txt", "data": base64.b64encode(b"top secret").decode()}]})
    ev = wait_for(lambda: next((e for r, e in list(user.got) if r == room
                                and getattr(e, "body", "") == "r.txt"), None), 30,
                  what="the encrypted file")
    from nio.crypto import decrypt_attachment

    blob = user.run(user.client.download(mxc=ev.url)).body
    assert blob != b"top secret"  # the server holds ciphertext only
    assert decrypt_attachment(blob, ev.key["k"], ev.hashes["sha256"], ev.iv) == b"top secret"
    import io

    up, keys = user.run(user.client.upload(lambda *_: io.BytesIO(b"from dana"),
                                           content_type="text/plain", filename="d.txt",
                                           encrypt=True, filesize=9))
    fid = user.run(user.client.room_send(room, "m.room.message", {
        "msgtype": "m.file", "body": "d.txt", "filename": "d.txt",
        "file": {**keys, "url": up.content_uri}}, ignore_unverified_devices=True)).event_id
    got = wait_for(lambda: next((e for e in inbound_events(host, "matrix")
                                 if e["message_id"] == fid), None), 30, what="file stored")
    (att,) = got["payload"]["attachments"]
    assert att["name"] == "d.txt" and base64.b64decode(att["data"]) == b"from dana"

    # Dana's client encrypts with a new Megolm session whose key it never shares (as a
    # client that refuses to send keys to unverified devices would)
    async def unshared() -> str:
        olm = user.client.olm
        olm.create_outbound_group_session(room)
        olm.outbound_group_sessions[room].shared = True  # but not sent to anyone
        got = await user.client.room_send(room, "m.room.message",
                                          {"msgtype": "m.text", "body": "can you read me"})
        return got.event_id

    bad = user.run(unshared())
    wait_for(lambda: any("could not decrypt your message" in t for t in user.seen(room)), 60,
             what="the sender told")
    assert f"could not decrypt event {bad}" in log(host)
    assert "OlmUnverifiedDeviceError" not in log(host)


def test_a_refused_token_is_configuration_not_a_crash_loop(synapse, tmp_path):
    from nanoclaw.channels.matrix import MatrixChannel
    from nanoclaw.config import Settings
    from nanoclaw.errors import ConfigError

    s = Settings(matrix_homeserver=synapse.url, matrix_access_token="syt_not_a_token",
                 data_dir=tmp_path)
    ch = MatrixChannel(s, SimpleNamespace(store=None, kick=lambda *a: None))
    with pytest.raises(ConfigError, match="MATRIX_ACCESS_TOKEN was refused"):
        asyncio.run(ch.setup())


def test_a_password_login_is_kept_and_its_device_reused(synapse, tmp_path):
    from nanoclaw.channels.matrix import MatrixChannel
    from nanoclaw.config import Settings

    acct = synapse.register(f"pw-{os.urandom(3).hex()}", "PW")
    s = Settings(matrix_homeserver=synapse.url, matrix_user_id=acct.user_id,
                 matrix_password=acct.password, data_dir=tmp_path)
    state: dict[str, str] = {}
    host = SimpleNamespace(store=SimpleNamespace(get_state=state.get,
                                                 set_state=state.__setitem__),
                           kick=lambda *a: None)

    async def start_stop() -> str:
        ch = MatrixChannel(s, host)
        await ch.setup()
        device = ch.client.device_id
        await ch.teardown()
        return device

    first, again = asyncio.run(start_stop()), asyncio.run(start_stop())
    assert first == again  # the kept session, not a new login (a new device)
    saved = tmp_path / "channels" / "matrix" / "session.json"
    assert json.loads(saved.read_text())["device_id"] == first
    assert saved.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "channels" / "matrix").stat().st_mode & 0o777 == 0o700
    devices = synapse.call("GET", "/_matrix/client/v3/devices", None, acct.access_token)
    assert len(devices["devices"]) == 2  # the registration's and ours, once


def test_files_past_the_servers_upload_limit_are_refused_both_ways():
    from nanoclaw.channels.base import SendError
    from nanoclaw.channels.matrix_outbound import MatrixOutbound

    out = MatrixOutbound()
    out.upload_limit, out.client = 10, SimpleNamespace(rooms={})
    with pytest.raises(SendError, match="upload limit") as e:
        asyncio.run(out._upload("!r:localhost", "big.bin", b"x" * 11))
    assert e.value.permanent
    inbound = MatrixInbound()
    inbound.upload_limit = 10
    got = asyncio.run(inbound._fetch({"name": "big.bin", "mime": None, "url": "mxc://s/m",
                                      "file": None, "size": 11}))
    assert got["error"] == "larger than 10 bytes" and "data" not in got


# ---- parsers of outside input, fuzzed ---------------------------------------------------
ME = Me("@claw:localhost", ("Claw", "claw"))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=12), kids, max_size=5), max_leaves=20)
KEYS = st.sampled_from(["type", "event_id", "sender", "content", "state_key", "msgtype",
                        "body", "m.relates_to", "rel_type", "m.new_content", "m.in_reply_to",
                        "url", "info", "file", "filename", "formatted_body", "m.mentions",
                        "user_ids", "size", "is_falling_back"])
SHAPED = st.recursive(st.none() | st.integers() | st.text(max_size=30)
                      | st.sampled_from(["m.room.message", "m.text", "m.file", "m.replace",
                                         "m.thread", "$e", "@a:b", "mxc://s/m",
                                         ME.user_id]),
                      lambda kids: st.dictionaries(KEYS, kids, max_size=6)
                      | st.lists(kids, max_size=3), max_leaves=25)


@hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(JSON, SHAPED), st.booleans())
def test_event_parsing_never_crashes(ev, group):
    try:
        got = parse_event(ev, ME, group, "Ann", {})
    except BadEvent:
        return
    if got is not None:
        assert got.message_id and isinstance(got.payload["text"], str)
        assert got.payload["sender_id"].startswith("matrix:@") or \
            got.payload["sender_id"].startswith("matrix:")


@hsettings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(JSON, SHAPED))
def test_a_bad_event_is_one_log_line_never_a_crash(ev):
    """Through the handler the sync loop calls: stored, skipped, or one warning."""
    stored: list[Any] = []

    async def inbound(*a: Any, **k: Any) -> bool:
        stored.append(a)
        return True

    store = SimpleNamespace(inbound_seen=lambda *a: False, sent_content=lambda *a: None,
                            latest_sent_question=lambda *a: None)
    h = MatrixInbound()
    h.host = SimpleNamespace(store=store, inbound=inbound, question=lambda *a: None)
    h.me, h.thread_of, h.upload_limit = ME, {}, 1 << 20
    h.client = SimpleNamespace(download=None)
    room = SimpleNamespace(room_id="!r:localhost", joined_count=2, invited_count=0,
                           user_name=lambda u: "Ann")
    lines: list[str] = []
    from nanoclaw.log import logger

    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        asyncio.run(h._room_event(room, SimpleNamespace(source=ev)))
    finally:
        logger.remove(sink)
    assert len(lines) <= 1 + len(stored)  # a file that failed to download says so too


@hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(JSON, st.text(max_size=40))
def test_mention_detection_never_crashes(content, body):
    c = content if isinstance(content, dict) else {"body": body}
    assert mentions(c, ME) in (True, False)


@hsettings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=400))
def test_agent_markdown_never_passes_raw_html(text):
    for chunk in matrix_html(text, 200):
        for tag in ("<script", "<img", "<iframe", "<b ", "<div", "<span", "onerror"):
            assert tag not in chunk.markup.replace("&lt;", "")


def test_mentions_examples():
    assert mentions({"body": "hey Claw, hi"}, ME)
    assert mentions({"body": "x", "m.mentions": {"user_ids": [ME.user_id]}}, ME)
    assert mentions({"body": "x", "formatted_body":
                     '<a href="https://matrix.to/#/%40claw%3Alocalhost">Claw</a>'}, ME)
    assert not mentions({"body": "clawing at the door"}, ME)
    assert not mentions({"body": "hello"}, ME)
