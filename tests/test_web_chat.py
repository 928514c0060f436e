"""The local web chat, end to end: a real host, the page in real headless Chromium
(Debian's `chromium`, driven by Playwright; no browser is ever downloaded), plus the
API's guards (token, Host header, malformed bodies)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

import pytest

from conftest import Host, wait_for
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
    assert f"{url}#token={token}" in (host.base / "logs" / "nanoclaw.log").read_text()
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
            expect(page.locator(".msg.me").last).to_have_text("hello from the browser")
            expect(page.locator(".msg.agent").last).to_have_text("echo: hello from the browser")

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
            expect(page.locator(".msg.agent").first).to_have_text("echo: hello from the browser")
            page.screenshot(path=str(host.base / "web-chat.png"))
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
