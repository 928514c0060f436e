"""The webhook door's rules (channels/webhook.py), for every platform: a tiny test
`Webhook` behind the real door, over real HTTP on 127.0.0.1, storing into a real central
database. Bad or missing signature: 401 and nothing stored; too big: 413; too many from
one address: 429 (per platform); a storage failure: 503, and the platform's retry then
stores it once; a failing platform answers 500 (or 503 when it could not even load) and
the others keep working; a redelivery is stored once.

Then the WhatsApp Cloud body parser (`CloudWebhook.receive`) under hypothesis: whatever
bytes arrive with a valid signature, it stores events or raises BadPayload, nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sqlite3
import threading
import urllib.error
import urllib.request
from typing import Any, Mapping

import pytest
from conftest import wait_for

from nanoclaw.channels.webhook import BadPayload, Door, DoorHost, Webhook, load_all
from nanoclaw.config import Settings
from nanoclaw.db.store import Store

KEY = b"door-test-key"


class Tiny(Webhook):
    """`X-Sig: <hex HMAC(KEY, body)>`; the body is `{"events": [{"chat", "id", "text"}]}`."""

    name = "tiny"
    fail: Exception | None = None

    def handshake(self, query: Mapping[str, str]) -> tuple[int, str]:
        return (200, query.get("c", "")) if query.get("t") == "ok" else (403, "no\n")

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        want = hmac.new(KEY, raw, hashlib.sha256).hexdigest()
        return hmac.compare_digest(headers.get("X-Sig", "").encode(), want.encode())

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        if self.fail is not None:
            raise self.fail
        try:
            events = json.loads(raw)["events"]
        except (ValueError, KeyError, TypeError) as e:
            raise BadPayload(str(e)) from None
        new = 0
        for ev in events:
            new += await self.host.inbound(f"{self.name}:{ev['chat']}", ev["id"],
                                           {"text": ev["text"]})
        return new


class Other(Tiny):
    name = "other"


TARGETS = {"tiny": f"{__name__}:Tiny", "other": f"{__name__}:Other",
           "broken": "nanoclaw.channels.no_such_module:Nothing"}


class DoorThread:
    """The door in its own thread and event loop, as the `webhooks` worker runs it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "door did not start"
        self.url = wait_for(lambda: self.state("webhook_url"), 10, what="door url")

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = Store.open(self.settings.data_dir)
        self.hooks = load_all(TARGETS, self.settings, self.store)
        self.stop = asyncio.Event()
        self.ready.set()
        try:
            self.loop.run_until_complete(Door(self.store, self.settings, self.hooks)
                                         .serve(self.stop))
        finally:
            self.store.close()
            self.loop.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)

    def state(self, key: str) -> str | None:
        conn = sqlite3.connect(self.settings.db_path)
        try:
            row = conn.execute("SELECT value FROM host_state WHERE key=?", (key,)).fetchone()
            return row[0] if row else None
        finally:
            conn.close()

    def stored(self) -> list[tuple[str, str, str]]:
        conn = sqlite3.connect(self.settings.db_path)
        try:
            return conn.execute("SELECT channel_type, platform_id, message_id FROM"
                                " inbound_events ORDER BY id").fetchall()
        finally:
            conn.close()

    def post(self, channel: str, body: bytes | dict, sig: str | None | bool = True,
             ) -> tuple[int, dict[str, str]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if sig is True:
            headers["X-Sig"] = hmac.new(KEY, raw, hashlib.sha256).hexdigest()
        elif isinstance(sig, str):
            headers["X-Sig"] = sig
        req = urllib.request.Request(f"{self.url}/webhook/{channel}", raw, headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=15) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


def events(*items: tuple[str, str, str]) -> dict[str, Any]:
    return {"events": [{"chat": c, "id": i, "text": t} for c, i, t in items]}


@pytest.fixture
def door(tmp_path):
    d = DoorThread(Settings(data_dir=tmp_path / "data", webhook_port=0, webhook_rate=6000,
                            webhook_max_bytes=4096))
    yield d
    d.close()


def test_a_bad_or_missing_signature_is_401_and_nothing_is_stored(door):
    body = events(("1", "m1", "hi"))
    assert door.post("tiny", body, sig=None)[0] == 401
    assert door.post("tiny", body, sig="00" * 32)[0] == 401
    assert door.post("tiny", json.dumps(body).encode() + b" ", sig=hmac.new(
        KEY, json.dumps(body).encode(), hashlib.sha256).hexdigest())[0] == 401  # other bytes
    assert door.stored() == []
    assert door.post("tiny", body)[0] == 200
    assert door.stored() == [("tiny", "tiny:1", "m1")]


def test_a_redelivery_is_stored_once(door):
    body = events(("1", "m1", "hi"), ("2", "m2", "yo"))
    assert door.post("tiny", body)[0] == 200
    assert door.post("tiny", body)[0] == 200  # Meta, Google, … send again: still 2xx
    assert door.post("tiny", events(("2", "m2", "yo"), ("2", "m3", "new")))[0] == 200
    assert door.stored() == [("tiny", "tiny:1", "m1"), ("tiny", "tiny:2", "m2"),
                             ("tiny", "tiny:2", "m3")]


def test_a_body_over_the_limit_is_413_and_nothing_is_stored(door):
    big = events(("1", "big", "x" * 5000))
    assert door.post("tiny", big)[0] == 413
    assert door.stored() == []
    assert door.post("tiny", b"{not json")[0] == 400  # verified, unreadable: nothing stored
    assert door.stored() == []


def test_unknown_paths_and_the_handshake(door):
    assert door.post("nope", events(("1", "m", "x")))[0] == 404
    assert door.get("/webhook/tiny?t=ok&c=abc") == (200, "abc")
    assert door.get("/webhook/tiny?t=bad&c=abc")[0] == 403
    assert door.get("/elsewhere")[0] == 404


def test_too_many_requests_from_one_address_is_429_per_platform(tmp_path):
    d = DoorThread(Settings(data_dir=tmp_path / "data", webhook_port=0, webhook_rate=10))
    try:  # 10 a minute: a burst of one, then one every 6 s
        assert d.post("tiny", events(("1", "r1", "a")))[0] == 200
        status, headers = d.post("tiny", events(("1", "r2", "b")))
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 7
        assert d.post("other", events(("1", "o1", "c")))[0] == 200  # its own bucket
        assert [m for _, _, m in d.stored()] == ["r1", "o1"]
    finally:
        d.close()


def test_a_storage_failure_is_503_and_the_retry_stores_it_once(door, monkeypatch):
    store = door.hooks["tiny"].host.store
    real = store.enqueue_inbound

    def locked(*a, **kw):
        raise sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(store, "enqueue_inbound", locked)
    body = events(("1", "s1", "hi"))
    assert door.post("tiny", body)[0] == 503  # the platform will retry
    assert door.stored() == []
    monkeypatch.setattr(store, "enqueue_inbound", real)
    assert door.post("tiny", body)[0] == 200
    assert door.post("tiny", body)[0] == 200
    assert door.stored() == [("tiny", "tiny:1", "s1")]


def test_one_platform_failing_harms_no_other(door):
    door.hooks["tiny"].fail = RuntimeError("a bug in one platform's code")
    assert door.post("tiny", events(("1", "f1", "x")))[0] == 500
    assert door.post("other", events(("1", "f2", "y")))[0] == 200
    assert door.post("broken", b"{}")[0] == 503  # failed to load: Meta-style retries later
    assert door.get("/webhook/broken?t=ok")[0] == 503
    door.hooks["tiny"].fail = None
    assert door.post("tiny", events(("1", "f1", "x")))[0] == 200
    assert door.stored() == [("other", "other:1", "f2"), ("tiny", "tiny:1", "f1")]


# ---- the WhatsApp Cloud body parser, fuzzed -----------------------------------------------
try:
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

PHONE = "1065"


def _cloud(tmp_path):
    from nanoclaw.channels.whatsapp_cloud_webhook import CloudWebhook

    s = Settings(data_dir=tmp_path / "fuzz", whatsapp_access_token="t",
                 whatsapp_phone_number_id=PHONE, whatsapp_app_secret="s",
                 whatsapp_verify_token="v", whatsapp_api_base="http://127.0.0.1:9")
    store = Store.open(s.data_dir)
    return CloudWebhook(s, DoorHost(store, "whatsapp-cloud")), store


if given is not None:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
        max_size=12)
    anything = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.text(max_size=8), kids, max_size=3), max_leaves=12)
    KINDS = ["text", "image", "document", "audio", "interactive", "reaction", "button",
             "location", "contacts", "sticker", "video", "unsupported", "nfm", 7, None]
    message = st.fixed_dictionaries({
        "from": st.sampled_from(["15551234567", "1", "", 5, None, "x" * 30]),
        "id": st.text(min_size=0, max_size=20) | st.integers(),
        "type": st.sampled_from(KINDS),
    }, optional={
        "text": st.fixed_dictionaries({"body": anything}) | anything,
        "image": st.fixed_dictionaries({"id": st.sampled_from(["m1", "a/b", "", 3])},
                                       optional={"caption": anything,
                                                 "mime_type": anything}) | anything,
        "document": st.fixed_dictionaries({"id": anything}, optional={
            "filename": anything}) | anything,
        "interactive": st.fixed_dictionaries({"type": anything}, optional={
            "button_reply": st.fixed_dictionaries({"id": st.sampled_from(
                ["ncq:q:0", "ncq::1", "ncq:q:x", "zz", ""]) | anything}) | anything,
            "list_reply": anything, "nfm_reply": anything}) | anything,
        "reaction": st.fixed_dictionaries({"message_id": anything, "emoji": anything}),
        "context": st.fixed_dictionaries({"id": anything, "from": anything}) | anything,
        "location": anything, "contacts": anything, "button": anything})
    value = st.fixed_dictionaries({"messages": st.lists(message | anything, max_size=3)},
                                  optional={"metadata": st.fixed_dictionaries({
                                      "phone_number_id": st.sampled_from([PHONE, "999", 1])}),
                                      "contacts": anything | st.lists(st.fixed_dictionaries({
                                          "wa_id": anything, "profile": anything})),
                                      "statuses": anything | st.lists(st.fixed_dictionaries({
                                          "status": st.sampled_from(["failed", "read"]),
                                          "errors": anything}), max_size=2)})
    body = st.fixed_dictionaries({"entry": st.lists(st.fixed_dictionaries({
        "changes": st.lists(st.fixed_dictionaries({
            "field": st.sampled_from(["messages", "statuses", 1]), "value": value | anything}),
            max_size=2) | anything}) | anything, max_size=2)}, optional={"object": anything})
    raw_bodies = (body.map(lambda b: json.dumps(b).encode()) | anything.map(
        lambda b: json.dumps(b).encode()) | st.binary(max_size=200)
        | st.sampled_from([b"[" * 5000, b'{"entry": ' + b"[" * 3000, b"\xff\xfe", b""]))

    @hsettings(max_examples=300, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])
    @given(raw=raw_bodies)
    def test_the_cloud_parser_stores_or_refuses_never_crashes(tmp_path, raw):
        hook, store = _cloud(tmp_path)
        try:
            try:
                n = asyncio.run(hook.receive(raw, {}))
            except BadPayload:
                return
            assert isinstance(n, int) and n >= 0
        finally:
            asyncio.run(hook.close())
            store.close()
