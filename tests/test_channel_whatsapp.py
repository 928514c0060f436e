"""WhatsApp Web: the adapter and the login, against a fake of our own `WAClient` seam.

How it runs: `nanoclaw.channels.whatsapp_client.new_client` (the one factory the adapter
and the login call) is pointed at `FakeWAClient`; the adapter, built through the LAZY
registry, runs inside the real `ChannelRunner` on a real central database, and one test
runs the whole `channel:whatsapp` worker (`host.runner.run(ChannelWorker)`) in this
process to see its exit code. A full `nanoclaw run` host is not used: its worker is
another process, which the in-process fake cannot reach.

What this does NOT cover, and cannot offline: the real WhatsApp Web protocol (the
Noise_XX handshake against WhatsApp's pinned server key, binary XML nodes), Signal
sessions and their corruption, media encryption and upload, WhatsApp's real timing of
QR refreshes and pairing, how whatsmeow reconnects, what WhatsApp actually sends in a
LID-addressed group, rate limits and bans. That neonize's API is called as
`NeonizeClient` calls it is checked only as far as importing and constructing it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dbread import db_row, db_rows
from fakes.fake_wa_client import ME, ME_LID, FakeWAClient
from fakes.hosts import session_inbound, wire_chat
from nanoclaw import config
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.channels import load_builtin
from nanoclaw.channels import whatsapp_client as wac
from nanoclaw.channels.base import ChannelDead
from nanoclaw.channels.runner import ChannelRunner
from nanoclaw.channels.whatsapp_client import WAEvent
from nanoclaw.channels.whatsapp_login import login, render_qr
from nanoclaw.db.store import Store
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

ROOT = Path(__file__).resolve().parent.parent
ANN = "15551112222@s.whatsapp.net"
GROUP = "120363000000000001@g.us"


@pytest.fixture
def env(tmp_path, monkeypatch):
    for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data", "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                 "NANOCLAW_GROUPS_DIR": tmp_path / "groups", "NANOCLAW_WHATSAPP_ENABLED": "1",
                 "NANOCLAW_SEND_ATTEMPTS": "3", "NANOCLAW_POLL_IDLE": "0.05",
                 "NANOCLAW_CHANNEL_LIVENESS": "30", "NANOCLAW_WHATSAPP_SILENCE": "60",
                 "NANOCLAW_RUNTIME": "process"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("WHATSAPP_PHONE_NUMBER", raising=False)
    s = config.load()
    store = Store.open(s.data_dir)
    ensure_defaults(store, s)
    yield SimpleNamespace(s=s, store=store, data=s.data_dir, monkeypatch=monkeypatch,
                          q=lambda sql, args=(): db_rows(store, sql, args))
    store.close()


def settings(env, **extra) -> config.Settings:
    for k, v in extra.items():
        env.monkeypatch.setenv(k, str(v))
    return config.load()


async def until(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    """The adapter (from the registry) under the real ChannelRunner, with `fake` as its
    WhatsApp library."""

    def __init__(self, env, fake: FakeWAClient, s: config.Settings | None = None):
        self.env, self.fake, self.s = env, fake, s or env.s
        env.monkeypatch.setattr(wac, "new_client", lambda _settings: fake)

    async def __aenter__(self) -> "Running":
        self.store = Store.open(self.s.data_dir)
        self.runner = ChannelRunner(self.store, self.s, "whatsapp")
        self.adapter = load_builtin().get("whatsapp")(self.s, self.runner)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.runner.run(self.adapter, self.stop))
        await until(lambda: self.fake.up or self.task.done(), what="connected")
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        try:
            await asyncio.wait_for(self.task, 10)
        except (ChannelDead, ConfigError):
            pass
        self.store.close()

    def send(self, idem: str, pid: str, content: dict, kind: str = "chat",
             in_reply_to: str | None = None) -> None:
        """Queue a send as delivery would (another connection), and nudge the runner."""
        self.env.store.enqueue_send(idem, "whatsapp", pid, None, kind, content,
                                    in_reply_to=in_reply_to)
        self.runner.wakeup.set()

    def outbox(self, idem: str) -> dict:
        return db_row(self.env.store, "SELECT * FROM channel_outbox WHERE idem_key=?", (idem,))

    def events(self, kind: str = "chat") -> list[dict]:
        rows = db_rows(self.env.store, "SELECT * FROM inbound_events WHERE channel_type='whatsapp'"
                                " AND kind=? ORDER BY id", (kind,))
        return [r | {"payload": json.loads(r["payload"])} for r in rows]


def go(coro):
    return asyncio.run(coro)


def errors() -> tuple[list[str], int]:
    lines: list[str] = []
    return lines, logger.add(lambda m: lines.append(str(m)), level="ERROR")


# ---- login --------------------------------------------------------------------------
def test_login_prints_the_qr_code_and_each_refreshed_one(env):
    fake = FakeWAClient(paired=False, script=[
        WAEvent("qr", code="2@first,abc"), 0.05, WAEvent("qr", code="2@second,def"), 0.05,
        lambda: fake.pair_success()])
    out = io.StringIO()
    assert go(login(env.s, out, client=fake)) == 0
    text = out.getvalue()
    first, second = render_qr("2@first,abc"), render_qr("2@second,def")
    assert first != second and first in text and second in text
    assert text.index(first) < text.index("expired") < text.index(second)
    assert "Linked as 15550000000@s.whatsapp.net" in text
    d = env.s.data_dir / "channels" / "whatsapp"
    assert (os.stat(d).st_mode & 0o777) == 0o700
    assert json.loads((d / "status.json").read_text())["state"] == "linked"
    assert (os.stat(d / "status.json").st_mode & 0o777) == 0o600
    assert fake.disconnects == 1 and not any(c[0] == "pair_phone" for c in fake.calls)


def test_login_by_pairing_code(env):
    s = settings(env, WHATSAPP_PHONE_NUMBER="+1 (555) 000-0000")
    fake = FakeWAClient(paired=False, pair_code="WXYZ-1234", script=[
        WAEvent("qr", code="2@ignored"), 0.05, lambda: fake.pair_success()])
    out = io.StringIO()
    assert go(login(s, out, client=fake)) == 0
    assert ("pair_phone", ("15550000000",)) in fake.calls
    assert "WXYZ-1234" in out.getvalue() and render_qr("2@ignored") not in out.getvalue()


def test_login_that_never_completes_says_so(env):
    out = io.StringIO()
    assert go(login(env.s, out, client=FakeWAClient(paired=False), timeout=0.3)) == 1
    assert "Run the command again" in out.getvalue()
    out = io.StringIO()  # already linked: nothing to do
    assert go(login(env.s, out, client=FakeWAClient(paired=True))) == 0
    assert "already linked" in out.getvalue()



def test_the_terminal_verb_links_it_and_doctor_reports_it(env, capsys):
    """`nanoclaw channels login whatsapp` is the login above, on the terminal: the QR
    code is printed there; `channels` and `doctor` then show the channel's state."""
    from nanoclaw.cli.main import main

    fake = FakeWAClient(paired=False, script=[
        WAEvent("qr", code="2@verb,xyz"), 0.05, lambda: fake.pair_success()])
    env.monkeypatch.setattr(wac, "new_client", lambda _s: fake)
    assert main(["channels", "login", "whatsapp"]) == 0
    assert render_qr("2@verb,xyz") in capsys.readouterr().out
    assert main(["channels"]) == 0
    listing = capsys.readouterr().out
    assert "whatsapp         on   (linked" in listing
    assert main(["channels", "login", "telegram"]) == 1
    assert "has no login" in capsys.readouterr().err
    main(["doctor"])
    assert "channel whatsapp: linked" in capsys.readouterr().out

# ---- messages -----------------------------------------------------------------------
def test_message_in_reaches_the_agent_and_the_reply_goes_out(env):
    from nanoclaw.routing.router import Event, Router

    wire_chat(env, "whatsapp", "whatsapp:15551112222")
    fake = FakeWAClient()

    async def run():
        async with Running(env, fake) as r:
            m = await fake.message(ANN, "hello there", push_name="Ann",
                                   media=[("../../notes.txt", "text/plain", b"file body")])
            ev = (await until(r.events, what="inbound event"))[0]
            assert ev["platform_id"] == "whatsapp:15551112222" and ev["message_id"] == m.id
            p = ev["payload"]
            assert (p["text"], p["sender_id"], p["sender_name"]) == ("hello there",
                                                                     "15551112222", "Ann")
            assert p["is_mention"] is True and p["is_group"] is False
            assert p["attachments"][0]["name"] == ".._.._notes.txt"  # no path from a sender
            await until(lambda: ("typing", (ANN,)) in fake.calls, what="typing")
            (sid,) = Router(env.store, env.s).route(Event.from_row(
                db_row(env.store, "SELECT * FROM inbound_events WHERE id=?", (ev["id"],))))
            assert any("hello there" in (row["content"] or "") for row in
                       session_inbound(env, "whatsapp", "whatsapp:15551112222"))
            r.send("r1", "whatsapp:15551112222", {"text": "**echo**: hello there"},
                   in_reply_to=f"{m.id}:main")
            await until(lambda: (r.outbox("r1") or {}).get("status") == "sent", what="sent")
            [sent] = [x for x in fake.sent if x["kind"] == "text"]
            assert sent == {"kind": "text", "chat": ANN, "id": r.outbox("r1")[
                "platform_message_id"], "text": "*echo*: hello there", "quote": m.id}
            r.send("r2", "whatsapp:15551112222", {"operation": "reaction", "messageId": m.id,
                                                   "emoji": "👍"})
            await until(lambda: (r.outbox("r2") or {}).get("status") == "sent", what="react")
            assert fake.sent[-1] | {"id": ""} == {"kind": "reaction", "chat": ANN, "id": "",
                                                  "sender": ANN, "target": m.id, "emoji": "👍"}
            await fake.message(ANN, "hello there", id=m.id)  # a redelivery: stored once
            await asyncio.sleep(0.1)
            assert len(r.events()) == 1
    go(run())


def test_group_message_and_mentions(env):
    fake = FakeWAClient()

    async def run():
        async with Running(env, fake) as r:
            quiet = await fake.message(GROUP, "just chatting", "777@lid",
                                       sender_alt="15557770000@s.whatsapp.net")
            by_lid = await fake.message(GROUP, "@bot ping", "777@lid", mentions=[ME_LID])
            by_pn = await fake.message(GROUP, "hey", ANN, mentions=[ME.replace("@", ":3@")])
            by_text = await fake.message(GROUP, "ask @15550000000 about it", ANN)
            reply = await fake.message(GROUP, "and?", ANN, quoted_id="3EB0X",
                                       quoted_sender=ME_LID, quoted_text="earlier answer")
            evs = {e["message_id"]: e for e in await until(
                lambda: len(r.events()) == 5 and r.events(), what="five events")}
            assert {e["platform_id"] for e in evs.values()} == {f"whatsapp:{GROUP}"}
            assert evs[quiet.id]["payload"]["is_mention"] is False
            assert evs[quiet.id]["payload"]["is_group"] is True
            assert evs[quiet.id]["payload"]["sender_id"] == "15557770000"
            for m in (by_lid, by_pn, by_text, reply):
                assert evs[m.id]["payload"]["is_mention"] is True, m.text
            assert evs[reply.id]["payload"]["reply_to"] == {
                "id": "3EB0X", "text": "earlier answer", "sender": "15550000000"}
            await fake.message(GROUP, "from me elsewhere", ME, from_me=True)
            await asyncio.sleep(0.1)
            assert len(r.events()) == 5  # our own messages are not input
    go(run())


def test_lid_and_phone_number_are_one_person(env):
    fake = FakeWAClient(lids={"333@lid": "15553334444@s.whatsapp.net"})

    async def run():
        async with Running(env, fake) as r:
            await fake.message("111@lid", "via lid", "111@lid",
                               sender_alt="15551110000@s.whatsapp.net")
            await fake.message(GROUP, "lid again, no alt", "111@lid")
            await fake.message("15551110000@s.whatsapp.net", "by number",
                               sender_alt="111@lid")
            await fake.message("333@lid", "known to the library's store")
            await fake.message("444@lid", "nobody knows")
            evs = await until(lambda: len(r.events()) == 5 and r.events(), what="events")
            ids = [(e["platform_id"], e["payload"]["sender_id"]) for e in evs]
            assert ids == [("whatsapp:15551110000", "15551110000"),
                           (f"whatsapp:{GROUP}", "15551110000"),
                           ("whatsapp:15551110000", "15551110000"),
                           ("whatsapp:15553334444", "15553334444"),
                           ("whatsapp:444@lid", "444@lid")]
            r.send("l1", "whatsapp:444@lid", {"text": "hi"})
            await until(lambda: (r.outbox("l1") or {}).get("status") == "sent", what="sent")
            assert fake.sent[-1]["chat"] == "444@lid"
            assert await r.adapter.open_dm("+1 555 333 4444") == "whatsapp:15553334444"
            assert await r.adapter.open_dm("333@lid") == "whatsapp:15553334444"
    go(run())


def test_long_reply_is_split_within_4000(env):
    fake = FakeWAClient()
    words = " ".join(["alpha", "beta", "gamma", "delta"] * 600)  # ~13600 characters
    text = f"first paragraph\n\n{words}"

    async def run():
        async with Running(env, fake) as r:
            r.send("long", "whatsapp:15551112222", {"text": text})
            await until(lambda: (r.outbox("long") or {}).get("status") == "sent", what="sent")
            got = fake.texts(ANN)
            assert len(got) >= 4 and all(len(t) <= 4000 for t in got)
            assert " ".join(got[1:]).split() == words.split() or \
                " ".join(got).split() == text.split()
            assert r.outbox("long")["platform_message_id"] == fake.sent[0]["id"]
    go(run())


def test_card_is_numbered_text_and_a_number_answers_it(env):
    fake = FakeWAClient()
    card = {"type": "ask_question", "questionId": "q-wa-1", "title": "Deploy?",
            "question": "Ship it now?", "options": [
                {"label": "Yes", "selectedLabel": "Shipping", "value": "yes"},
                {"label": "Later", "selectedLabel": "Postponed", "value": "later"}]}

    async def run():
        async with Running(env, fake) as r:
            r.send("card:q-wa-1", "whatsapp:15551112222", card, kind="chat-sdk")
            await until(lambda: (r.outbox("card:q-wa-1") or {}).get("status") == "sent",
                        what="card sent")
            [shown] = fake.texts(ANN)
            assert "Ship it now?" in shown and "Reply with the number" in shown
            assert shown.index("1. Yes") < shown.index("2. Later")
            await fake.message(ANN, " 2 ")
            [act] = await until(lambda: r.events("action"), what="action event")
            assert act["platform_id"] == "whatsapp:15551112222"
            assert act["payload"] == {"question_id": "q-wa-1", "option": "later",
                                      "user_id": "15551112222"}
            await until(lambda: "✓ Postponed" in fake.texts(ANN), what="confirmation")
            await fake.message(ANN, "2")  # answered once: now it is just a message
            await until(lambda: r.events(), what="chat event")
            assert len(r.events("action")) == 1
    go(run())


# ---- failures -----------------------------------------------------------------------
@pytest.mark.parametrize("what", ["logged_out", "conflict"])
def test_logout_or_conflict_is_told_and_not_restarted(env, what):
    fake = FakeWAClient()
    lines, sink = errors()

    async def run():
        async with Running(env, fake) as r:
            await (fake.logged_out() if what == "logged_out" else fake.conflict())
            with pytest.raises(ConfigError) as e:
                await asyncio.wait_for(r.task, 10)
            return str(e.value)
    try:
        msg = go(run())
    finally:
        logger.remove(sink)
    word = "logged this device out" if what == "logged_out" else "conflict"
    assert word in msg and "nanoclaw" in msg
    assert sum(word in line for line in lines) == 1  # told once, at ERROR
    status = json.loads((env.s.data_dir / "channels/whatsapp/status.json").read_text())
    assert status["state"] == what and word in status["reason"]
    assert fake.disconnects == 1


def test_the_worker_exits_with_the_config_code_on_logout(env):
    """The whole channel:whatsapp worker, in this process: exit 78 (EXIT_CONFIG), which
    the supervisor marks FATAL and does not restart."""
    from nanoclaw.host.runner import EXIT_CONFIG, run
    from workers.channel import ChannelWorker

    fake = FakeWAClient(script=[0.2, lambda: fake.logged_out("MAIN_DEVICE_GONE")])
    env.monkeypatch.setattr(wac, "new_client", lambda _s: fake)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert run(ChannelWorker(env.s, "channel:whatsapp")) == EXIT_CONFIG
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    assert fake.connects == 1 and fake.disconnects == 1


def test_unlinked_worker_asks_for_login_instead_of_showing_qr(env):
    fake = FakeWAClient(paired=False)

    async def run():
        runner = ChannelRunner(env.store, env.s, "whatsapp")
        adapter = load_builtin().get("whatsapp")(env.s, runner)
        with pytest.raises(ConfigError, match="channels login whatsapp"):
            await runner.run(adapter, asyncio.Event())
    env.monkeypatch.setattr(wac, "new_client", lambda _s: fake)
    go(run())
    assert fake.connects == 0


def test_reconnect_after_a_transport_drop(env):
    fake = FakeWAClient()

    async def run():
        async with Running(env, fake) as r:
            await fake.drop()
            r.send("d1", "whatsapp:15551112222", {"text": "while down"})
            await until(lambda: (r.outbox("d1") or {}).get("next_attempt_at"), what="parked")
            assert fake.sent == [] and r.outbox("d1")["status"] == "pending"
            assert r.outbox("d1")["attempts"] == 0  # waiting for a connection is not a try
            await fake.reconnect()
            await until(lambda: r.outbox("d1")["status"] == "sent", what="sent after reconnect")
            assert fake.texts(ANN) == ["while down"]
            assert r.outbox("d1")["attempts"] == 1 and not r.task.done()
    go(run())


def test_a_transport_that_stays_down_exits_to_the_breaker(env):
    fake = FakeWAClient()
    s = settings(env, NANOCLAW_CHANNEL_LIVENESS="0.5")

    async def run():
        async with Running(env, fake, s) as r:
            await fake.drop()
            with pytest.raises(ChannelDead, match="no working connection"):
                await asyncio.wait_for(r.task, 10)
    go(run())


def test_watchdog_fires_on_a_connected_but_deaf_client(env):
    fake = FakeWAClient()
    s = settings(env, NANOCLAW_WHATSAPP_SILENCE="0.6")

    async def run():
        async with Running(env, fake, s) as r:
            for _ in range(6):  # receipts and messages keep it alive…
                await asyncio.sleep(0.25)
                await fake.receipt()
            assert not r.task.done()
            with pytest.raises(ChannelDead, match="connected but deaf"):  # …silence does not
                await asyncio.wait_for(r.task, 10)
            assert r.adapter.connected and fake.disconnects == 1  # up, but deaf; closed
    go(run())


# ---- isolation ----------------------------------------------------------------------
def test_neonize_loads_only_in_the_whatsapp_worker():
    code = ("import sys; from nanoclaw import config; from nanoclaw.host import registry;"
            " names = registry.channel_names(config.load());"
            " import nanoclaw.channels.whatsapp, nanoclaw.channels.whatsapp_login;"
            " print('whatsapp' in names, 'neonize' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "NANOCLAW_WHATSAPP_ENABLED": "1"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True False"


def test_the_real_client_imports_and_builds_offline(tmp_path):
    """neonize's classes and events as NeonizeClient uses them exist; nothing connects."""
    import importlib.util

    if importlib.util.find_spec("neonize") is None:
        pytest.skip("neonize is not installed")
    code = ("import asyncio, pathlib, sys\n"
            "try:\n from nanoclaw.channels.whatsapp_client import NeonizeClient\n"
            f" c = NeonizeClient(pathlib.Path({str(tmp_path / 'neonize.db')!r}))\n"
            "except ImportError as e:\n print('SKIP', e); sys.exit()\n"
            "print(type(c.c).__name__, asyncio.run(c.is_paired()), len(c.c.event.list_func))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)  # its own process: the Go runtime stays out of pytest's
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("SKIP"):  # e.g. python-magic without libmagic1
        pytest.skip(f"neonize does not import here: {out.stdout[5:].strip()}")
    assert out.stdout.split() == ["NewAClient", "False", "15"]
    assert not (tmp_path / "neonize.db").exists()


PROTO_CHECK = """
import asyncio, json, pathlib, sys
try:
    from neonize.aioze.events import LoggedOutEv, MessageEv, PairStatusEv, StreamReplacedEv
    from neonize.proto.Neonize_pb2 import JID, MessageInfo, MessageSource
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import (
        ContextInfo, ExtendedTextMessage, FutureProofMessage, ImageMessage, Message)
    from nanoclaw.channels.whatsapp_client import NeonizeClient
except ImportError as e:
    print('SKIP', e); sys.exit()
j = lambda s, d=0: JID(User=s.split('@')[0], Server=s.split('@')[1], Device=d)
c = NeonizeClient(pathlib.Path(sys.argv[1]))
got = []
async def grab(ev):
    got.append(ev)
c.handler = grab
src = MessageSource(Chat=j('120363000000000001@g.us'), Sender=j('777@lid', 3),
                    SenderAlt=j('15557770000@s.whatsapp.net'), IsGroup=True)
text = ExtendedTextMessage(text='hi @bot', contextInfo=ContextInfo(
    mentionedJID=['900@lid'], stanzaID='Q1', participant='15550000000@s.whatsapp.net',
    quotedMessage=Message(conversation='earlier')))
img = Message(ephemeralMessage=FutureProofMessage(message=Message(imageMessage=ImageMessage(
    caption='a photo', mimetype='image/jpeg', fileLength=12))))
async def main():
    await c._message(None, MessageEv(Info=MessageInfo(ID='M1', Pushname='Ann', MessageSource=src),
                                     Message=Message(extendedTextMessage=text), IsEdit=True))
    await c._message(None, MessageEv(Info=MessageInfo(ID='M2', MessageSource=src), Message=img))
    await c._logged_out(None, LoggedOutEv(Reason=4))
    await c._simple(None, StreamReplacedEv())
    await c._pair(None, PairStatusEv(ID=j('15550000000@s.whatsapp.net', 5),
                                     Status=PairStatusEv.SUCCESS))
asyncio.run(main())
m1, m2 = got[0].message, got[1].message
print(json.dumps([
    [m1.id, m1.chat, m1.sender, m1.sender_alt, m1.push_name, m1.text, m1.is_group, m1.is_edit,
     m1.mentions, m1.quoted_id, m1.quoted_sender, m1.quoted_text],
    [m2.text, [(f.kind, f.name, f.mime, f.size) for f in m2.media]],
    [(e.kind, e.reason, e.jid) for e in got[2:]]]))
"""


def test_the_real_client_maps_neonize_events(tmp_path):
    """NeonizeClient's handlers fed neonize's own protobuf events (built here, offline):
    what the adapter gets from them."""
    import importlib.util

    if importlib.util.find_spec("neonize") is None:
        pytest.skip("neonize is not installed")
    out = subprocess.run([sys.executable, "-c", PROTO_CHECK, str(tmp_path / "n.db")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"neonize does not import here: {out.stdout[5:].strip()}")
    m1, m2, evs = json.loads(out.stdout)
    assert m1 == ["M1", "120363000000000001@g.us", "777@lid", "15557770000@s.whatsapp.net",
                  "Ann", "hi @bot", True, True, ["900@lid"], "Q1",
                  "15550000000@s.whatsapp.net", "earlier"]
    assert m2 == ["a photo", [["image", "image.jpg", "image/jpeg", 12]]]
    assert evs == [["logged_out", "MAIN_DEVICE_GONE", ""], ["conflict", "", ""],
                   ["pair_success", "", "15550000000@s.whatsapp.net"]]
