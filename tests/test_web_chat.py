"""The local web chat, end to end: a real host, the page in real headless Chromium
(Debian's `chromium`, driven by Playwright; no browser is ever downloaded), plus the
API's guards (token, Host header, malformed bodies) and its chats: listing, making one
wired to a chosen agent group, one long poll for all of them."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request

import pytest
from conftest import Host, wait_for

from dbread import db_rows
from fakes.hosts import enqueue, inbound_events, worker

CHROMIUM = os.environ.get("NANOCLAW_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    from nanoclaw.devtools.fake_model import FakeModel

    model = FakeModel(port=0, delay_ms=0)
    model.start()
    h = Host(tmp_path_factory.mktemp("web"), model.url)
    h.start()
    wait_for(lambda: h.q("SELECT value FROM host_state WHERE key='web_url'"), 30,
             what="web chat address")
    yield h
    h.cleanup()
    model.stop()


def chat_log(page, chat: str):
    """The part of the page that shows one chat's conversation."""
    return page.locator(f"main.log[data-chat='{chat}']")


def web_chat(host, name: str) -> dict | None:
    rows = host.q("SELECT * FROM messaging_groups WHERE channel_type='web' AND platform_id=?",
                  (name,))
    return rows[0] if rows else None


def wired_agents(host, name: str) -> list[str]:
    return sorted(r["agent_group_id"] for r in host.q(
        "SELECT w.agent_group_id FROM messaging_group_agents w JOIN messaging_groups m"
        " ON m.id=w.messaging_group_id WHERE m.channel_type=? AND m.platform_id=?",
        ("web" if name != "cli:local" else "cli", name.split(":")[-1])))


def main_agent(host) -> str:
    return host.q("SELECT id FROM agent_groups WHERE folder='main'")[0]["id"]


def address(host) -> tuple[str, str]:
    url = host.q("SELECT value FROM host_state WHERE key='web_url'")[0]["value"]
    return url, (host.data / "web-token").read_text().strip()


def call(url: str, path: str, body: object = None, token: str | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="POST" if data else "GET",
                                 headers={**({"Authorization": f"Bearer {token}"} if token else {}),
                                          "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=35) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"{}")
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}
    except (urllib.error.URLError, ConnectionError):  # not listening (yet)
        return 0, {}


def test_address_is_loopback_and_token_is_private(host):
    url, token = address(host)
    assert url.startswith("http://127.0.0.1:")
    assert oct((host.data / "web-token").stat().st_mode & 0o777) == "0o600"
    assert f"{url}#token={token}" in host.output()  # on the terminal only (H4)
    for log in (host.base / "logs").glob("*.log"):
        assert token not in log.read_text(), log
    assert call(url, "/api/events?wait=0")[0] == 401
    assert call(url, "/api/events?wait=0", token="wrong" * 8)[0] == 401
    assert call(url, "/api/events?wait=0", token=token, headers={"Host": "evil.example"})[0] == 421
    assert call(url, "/api/events?wait=0", token=token)[0] == 200


def test_malformed_requests_are_refused_and_crash_nothing(host):
    url, token = address(host)
    for body in (b"{not json", b"[1]", {"text": 5}, {"text": ""}, {"text": "x", "chat": "../x"},
                 {"text": "x", "id": "a b"}, {"question_id": 1, "index": "0"},
                 {"question_id": "nope", "index": 0}, {"text": "x" * 100_001}):
        path = "/api/answer" if isinstance(body, dict) and "question_id" in body else "/api/send"
        code, resp = call(url, path, body, token)
        assert code in (400, 404), (body, code)
        assert isinstance(resp.get("error", resp.get("raw")), str)
    assert call(url, "/api/events?after=x", token=token)[0] == 400
    assert worker(host, "channel:web")["restarts"] == 0


def test_chats_and_agents_need_the_token_and_the_host(host):
    url, token = address(host)
    for path, body in (("/api/chats", None), ("/api/agents", None),
                       ("/api/chats", {"name": "guarded", "agent": main_agent(host)})):
        assert call(url, path, body)[0] == 401
        assert call(url, path, body, token="wrong" * 8)[0] == 401
        assert call(url, path, body, token=token, headers={"Host": "evil.example"})[0] == 421
    assert web_chat(host, "guarded") is None


def test_new_chat_is_wired_to_the_agent_picked(host):
    url, token = address(host)
    main = main_agent(host)
    code, agents = call(url, "/api/agents", token=token)
    assert code == 200
    assert {"id": main, "folder": "main"}.items() <= next(
        a for a in agents["agents"] if a["folder"] == "main").items()
    assert all(set(a) == {"id", "name", "folder"} for a in agents["agents"])

    code, made = call(url, "/api/chats", {"name": "api-main", "agent": main}, token)
    assert code == 201, made
    assert made["ok"] and made["chat"]["name"] == "api-main"
    assert [a["id"] for a in made["chat"]["agents"]] == [main]
    assert wired_agents(host, "api-main") == [main]
    mg = web_chat(host, "api-main")["id"]
    assert [r["local_name"] for r in host.q(
        "SELECT local_name FROM agent_destinations WHERE target_id=?", (mg,))] == ["web-api-main"]

    # without an agent: wired like the terminal chat, as today
    code, made = call(url, "/api/chats", {"name": "api-default"}, token)
    assert code == 201, made
    assert wired_agents(host, "api-default") == wired_agents(host, "cli:local") != []

    # the list: every web chat with its agents' names; `local` even before its first use
    code, listed = call(url, "/api/chats", token=token)
    assert code == 200
    chats = {c["name"]: c for c in listed["chats"]}
    assert {"local", "api-main", "api-default"} <= set(chats)
    assert [a["id"] for a in chats["api-main"]["agents"]] == [main]
    assert all(a["name"] for c in chats.values() for a in c["agents"])
    before = chats["api-main"]["last_activity"]
    assert isinstance(before, float)

    # the chat works; its reply comes through the one poll that follows every chat
    assert call(url, "/api/send", {"chat": "api-main", "text": "hi there", "id": "api-1"},
                token)[0] == 200
    reply = wait_for(lambda: [e for e in call(url, "/api/events?wait=0", token=token)[1]["events"]
                              if e["type"] == "reply" and e.get("in_reply_to") == "api-1"], 60,
                     what="reply in api-main")[0]
    assert reply["chat"] == "api-main" and reply["text"] == "echo: hi there"
    code, only = call(url, "/api/events?wait=0&chat=api-main", token=token)
    assert code == 200 and only["boot"] and {e["chat"] for e in only["events"]} == {"api-main"}
    code, listed = call(url, "/api/chats", token=token)
    after = {c["name"]: c for c in listed["chats"]}["api-main"]["last_activity"]
    assert after > before
    assert host.q("SELECT s.agent_group_id FROM sessions s JOIN messaging_groups m ON"
                  " m.id=s.messaging_group_id WHERE m.id=?", (mg,))[0]["agent_group_id"] == main


def test_new_chat_refusals_leave_nothing_behind(host):
    url, token = address(host)
    main = main_agent(host)

    def state() -> tuple:
        return (host.q("SELECT platform_id FROM messaging_groups ORDER BY platform_id"),
                host.q("SELECT id FROM messaging_group_agents ORDER BY id"),
                host.q("SELECT * FROM agent_destinations ORDER BY agent_group_id, local_name"))

    assert call(url, "/api/chats", {"name": "taken", "agent": main}, token)[0] == 201
    before = state()

    for name in ("", "bad name", "../x", "-x", "x" * 65, "é", 5, None, ["x"]):
        code, resp = call(url, "/api/chats", {"name": name, "agent": main}, token)
        assert code == 400, (name, code)
        assert "1-64 letters, digits" in resp["error"]
    for body in (b"{not json", b"[1]", {"agent": main}, {"name": "fine", "agent": 5},
                 {"name": "fine", "agent": ""}):
        code, resp = call(url, "/api/chats", body, token)
        assert code == 400 and isinstance(resp.get("error", resp.get("raw")), str), body

    code, resp = call(url, "/api/chats", {"name": "ghost", "agent": "ag-nope"}, token)
    assert code == 404
    assert "unknown agent group 'ag-nope'" in resp["error"] and "\n" not in resp["error"]

    for body in ({"name": "taken", "agent": main}, {"name": "taken"}, {"name": "local"}):
        code, resp = call(url, "/api/chats", body, token)
        assert code == 409 and resp["error"] == f"a chat named {body['name']!r} exists already"

    assert state() == before
    assert wired_agents(host, "taken") == [main]
    assert worker(host, "channel:web")["restarts"] == 0


def test_a_wiring_that_fails_undoes_the_chat(tmp_path):
    """create_web_chat on a real DB: a wiring to an agent group that is not there fails
    (foreign key), and the chat it had made is removed with it."""
    import sqlite3

    from nanoclaw.channels.web import create_web_chat
    from nanoclaw.db.store import Store

    store = Store.open(tmp_path)
    try:
        ag = store.create_agent_group("A", "a", "anthropic", "m", "A")
        with pytest.raises(sqlite3.IntegrityError):
            create_web_chat(store, "half", [ag, "ag-missing"])
        assert store.messaging_group("web", "half") is None
        assert db_rows(store, "SELECT * FROM messaging_group_agents") == []
        assert db_rows(store, "SELECT * FROM agent_destinations") == []
        create_web_chat(store, "whole", [ag])
        assert [c["agents"] for c in store.channel_chats("web")] == [
            [{"id": ag, "name": "A", "folder": "a"}]]
    finally:
        store.close()


@pytest.mark.skipif(not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM),
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_chat_in_a_real_browser(host):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)

    url, token = address(host)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{url}#token={token}")
            expect(page.locator("#status")).to_contain_text("connected")
            assert "token" not in page.url  # the fragment is dropped once read
            page.fill("#text", "hello from the browser")
            page.press("#text", "Enter")
            local = chat_log(page, "local")
            expect(local.locator(".msg.me").last).to_have_text("hello from the browser")
            expect(local.locator(".msg.agent").last).to_have_text("echo: hello from the browser")

            # a question card: shown with its buttons; a click becomes an action event
            card = {"type": "ask_question", "questionId": "q-web-1", "title": "Deploy?",
                    "question": "Ship it now?", "options": [
                        {"label": "Yes", "selectedLabel": "Shipping", "value": "yes"},
                        {"label": "Later", "selectedLabel": "Postponed", "value": "later"}]}
            enqueue(host, "card:q-web-1", "web", "local", card, kind="chat-sdk")
            box = page.locator(".card[data-question='q-web-1']")
            expect(box).to_contain_text("Ship it now?")
            box.get_by_role("button", name="Later").click()
            expect(box.locator(".chosen")).to_have_text("✓ Postponed")
            ev = wait_for(lambda: [e for e in inbound_events(host, "web", "action")
                                   if e["payload"]["question_id"] == "q-web-1"], 30)[0]
            assert ev["payload"]["option"] == "later"
            assert ev["payload"]["user_id"].startswith("cli:")  # the local owner

            # a reload shows the conversation so far
            page.reload()
            expect(chat_log(page, "local").locator(".msg.agent").first).to_have_text(
                "echo: hello from the browser")
            page.screenshot(path=str(host.base / "web-chat.png"))
        finally:
            browser.close()
    assert worker(host, "channel:web")["restarts"] == 0


@pytest.mark.skipif(not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM),
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_two_chats_with_two_agents_in_a_real_browser(host):
    """A second chat bound to a second agent group, made in the page: each message is
    answered in its own chat by its own agent, a reply in the chat that is not open marks
    it unread, and a reload returns to the open chat."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)

    url, token = address(host)
    made = host.cli("groups", "add", "Helper", "--folder", "helper")
    assert made.returncode == 0, made.stderr
    helper, main = made.stdout.strip(), main_agent(host)
    unread = re.compile(r"\bunread\b")

    def item(chat: str):
        return page.locator(f"button.chat[data-chat='{chat}']")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}#token={token}")
            expect(page.locator("#status")).to_contain_text("connected")
            expect(item("local")).to_be_visible()
            assert page.url.endswith("#chat=local")

            # "New chat": a bad name gets the server's one line and makes nothing
            page.click("#new-chat")
            expect(page.locator(f"#new-agent option[value='{helper}']")).to_have_text(
                "Helper (helper)")
            page.fill("#new-name", "no good")
            page.select_option("#new-agent", helper)
            page.click("#new-create")
            expect(page.locator("#new-error")).to_contain_text("1-64 letters, digits")
            assert web_chat(host, "no good") is None
            page.fill("#new-name", "work")
            page.click("#new-create")
            expect(page.locator("#new-chat-dialog")).to_be_hidden()
            expect(page.locator("#chat-title")).to_have_text("work")
            expect(page.locator("#chat-agents")).to_have_text("with Helper")
            expect(item("work").locator(".agents")).to_have_text("Helper")
            assert page.url.endswith("#chat=work")
            assert wired_agents(host, "work") == [helper]

            # one message in each chat, each answered in its own chat
            page.fill("#text", "hello work")
            page.press("#text", "Enter")
            expect(chat_log(page, "work").locator(".msg.agent")).to_have_text(["echo: hello work"])
            item("local").click()
            expect(chat_log(page, "local")).to_be_visible()
            expect(chat_log(page, "work")).to_be_hidden()
            page.fill("#text", "hello local")
            page.press("#text", "Enter")
            expect(chat_log(page, "local").locator(".msg.agent").last).to_have_text(
                "echo: hello local")
            expect(chat_log(page, "local")).not_to_contain_text("hello work")
            expect(chat_log(page, "work")).not_to_contain_text("hello local")
            served = {(r["platform_id"], r["agent_group_id"]) for r in host.q(
                "SELECT m.platform_id, s.agent_group_id FROM sessions s JOIN messaging_groups m"
                " ON m.id=s.messaging_group_id WHERE m.channel_type='web'")}
            assert {("work", helper), ("local", main)} <= served
            assert ("work", main) not in served

            # a reply arrives in work while local is open: work is marked unread
            expect(item("work")).not_to_have_class(unread)
            code, _ = call(url, "/api/send", {"chat": "work", "text": "while away",
                                              "id": "away-1"}, token)
            assert code == 200
            expect(item("work")).to_have_class(unread)
            expect(item("work").locator(".badge")).to_be_visible()
            expect(item("local")).not_to_have_class(unread)
            expect(chat_log(page, "work").locator(".msg.agent").last).to_have_text(
                "echo: while away")
            expect(page).to_have_title("(1) NanoClaw")

            # opening it shows the reply and clears the marker
            item("work").click()
            expect(chat_log(page, "work")).to_be_visible()
            expect(item("work")).not_to_have_class(unread)
            expect(page).to_have_title("NanoClaw")

            # a reload returns to the open chat with its own history and no token in sight
            page.reload()
            expect(page.locator("#status")).to_contain_text("connected")
            expect(page.locator("#chat-title")).to_have_text("work")
            expect(chat_log(page, "work")).to_be_visible()
            expect(chat_log(page, "local")).to_be_hidden()
            expect(chat_log(page, "work").locator(".msg.agent")).to_have_text(
                ["echo: hello work", "echo: while away"])
            expect(chat_log(page, "work").locator(".msg.me")).to_have_text(
                ["hello work", "while away"])
            expect(page.locator("button.chat.unread")).to_have_count(0)
            assert "token" not in page.url and page.url.endswith("#chat=work")
            page.screenshot(path=str(host.base / "web-chats.png"))
            assert errors == []
        finally:
            browser.close()
    assert worker(host, "channel:web")["restarts"] == 0


def test_kill9_of_the_web_worker_keeps_the_conversation(host):
    """Last: the restarted worker rebuilds each chat's history from the DB, keeps its
    port and token, and takes messages again."""
    url, token = address(host)
    code, first = call(url, "/api/send", {"text": "before the kill", "id": "k9-before"}, token)
    assert code == 200
    wait_for(lambda: any(e["type"] == "reply" and e.get("in_reply_to") == "k9-before"
                         for e in call(url, "/api/events?wait=0", token=token)[1]["events"]),
             60, what="reply before the kill")
    old = host.worker_pid("channel:web")
    os.kill(old, 9)
    wait_for(lambda: host.worker_pid("channel:web") not in (None, old), 30, what="restart")
    assert address(host) == (url, token)
    events = wait_for(lambda: call(url, "/api/events?wait=0", token=token)[1].get("events"), 30,
                      what="history after restart")
    assert any(e["type"] == "message" and e["text"] == "before the kill" for e in events)
    assert any(e["type"] == "reply" and e["text"] == "echo: before the kill" for e in events)
    code, _ = call(url, "/api/send", {"text": "after the kill", "id": "k9-after"}, token)
    assert code == 200
    wait_for(lambda: any(e["type"] == "reply" and e["text"] == "echo: after the kill"
                         for e in call(url, "/api/events?wait=0", token=token)[1]["events"]),
             60, what="reply after the kill")


def test_the_page_shows_whatsapps_login_code_while_a_login_waits(host):
    """`nanoclaw channels login whatsapp` writes its current QR code beside the keys;
    the page's /api/whatsapp turns a fresh one into an image to scan, and nothing once
    the code is stale or the device is linked."""
    import time as _time

    from nanoclaw.channels import whatsapp_client as wac
    from nanoclaw.config import Settings

    url, token = address(host)
    assert call(url, "/api/whatsapp", token=token)[1] == {"state": "none"}
    assert call(url, "/api/whatsapp", token="wrong" * 8)[0] == 401
    d = wac.store_dir(Settings(data_dir=host.data))
    wac.write_status(d, "qr", qr="2@abc,def,ghi")
    code, wa = call(url, "/api/whatsapp", token=token)
    assert code == 200 and wa["state"] == "qr"
    assert wa["qr"].startswith("data:image/svg+xml")
    wac.write_json(d / "status.json", {"state": "qr", "qr": "2@old", "at": _time.time() - 600})
    assert "qr" not in call(url, "/api/whatsapp", token=token)[1]  # expired long ago
    wac.write_status(d, "linked", me="15550000000@s.whatsapp.net")
    assert call(url, "/api/whatsapp", token=token)[1] == {"state": "linked"}


def test_a_reply_given_twice_is_shown_once(tmp_path, monkeypatch):
    """An attempt whose result was not stored (a timeout) sends the same reply again: the
    page's event stream carries it once (and the page drops an id it has shown, app.js)."""
    import asyncio

    from nanoclaw import config
    from nanoclaw.agents.groups import ensure_defaults
    from nanoclaw.channels.base import OutboundMessage
    from nanoclaw.channels.runner import ChannelRunner
    from nanoclaw.channels.web import WebChannel
    from nanoclaw.db.store import Store

    for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data", "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                 "NANOCLAW_GROUPS_DIR": tmp_path / "groups"}.items():
        monkeypatch.setenv(k, str(v))
    s = config.load()
    store = Store.open(s.data_dir)
    ensure_defaults(store, s)

    async def go() -> list[dict]:
        ch = WebChannel(s, ChannelRunner(store, s, "web"))
        await ch.setup()
        try:
            for text in ("first", "first", "second"):
                msg = OutboundMessage("web:r-1" if text == "first" else "web:r-2", "chat",
                                      {"text": text})
                assert await ch.deliver("local", None, msg) == msg.idem_key
            status, body = await asyncio.to_thread(
                call, ch.url, "/api/events?wait=0", None, ch.token)
            assert status == 200
            return body["events"]
        finally:
            await ch.teardown()
    events = [e for e in asyncio.run(go()) if e["type"] == "reply"]
    assert [(e["id"], e["text"]) for e in events] == [("web:r-1", "first"), ("web:r-2", "second")]
