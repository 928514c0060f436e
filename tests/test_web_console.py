"""The web console beside the chats (issue 16, item 6), end to end: a real host, the page
in real headless Chromium (Debian's `chromium` through Playwright, as test_web_chat.py),
and the console API's guards. The status view lists every worker and shows a killed one
restarting; the usage chart shows a group's tokens; an approval answered on the page
releases the agent (through the router, as a click on its card); the error log's tail is
shown as text; replies render Markdown inertly; files go both ways; a reload keeps the
chat. Each view is saved as a screenshot under tests/artifacts/ for a person to look at."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest
from conftest import Host, wait_for
from test_web_chat import ARGS, CHROMIUM, address, call, chat_log

from fakes.hosts import enqueue, inbound_events, worker
from nanoclaw.util import local_user_id

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BUDGET = 60_000
OWNER = local_user_id()
needs_chromium = pytest.mark.skipif(
    not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def model():
    from nanoclaw.devtools.fake_model import FakeModel

    m = FakeModel(port=0, delay_ms=0)
    m.start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory, model):
    h = Host(tmp_path_factory.mktemp("console"), model.url,
             extra_env={"NANOCLAW_DAILY_TOKEN_BUDGET": str(BUDGET)})
    h.start()
    wait_for(lambda: h.q("SELECT value FROM host_state WHERE key='web_url'"), 30,
             what="web chat address")
    yield h
    h.cleanup()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, host, view: str | None = None):
    from playwright.sync_api import expect

    url, token = address(host)
    page = browser.new_page(accept_downloads=True)
    page.set_default_timeout(60_000)
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(f"{url}#token={token}" + (f"&view={view}" if view else ""))
    expect(page.locator("#status")).to_contain_text("connected")
    return page


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web-console-{name}.png"), full_page=True)


def session_notes(host, folder: str = "main") -> list[str]:
    """The host's notes to the agent (messages_in from channel 'agent') of a group."""
    ag = host.q("SELECT id FROM agent_groups WHERE folder=?", (folder,))[0]["id"]
    out = []
    for s in host.q("SELECT id FROM sessions WHERE agent_group_id=?", (ag,)):
        path = host.data / "sessions" / ag / s["id"] / "db" / "inbound.db"
        conn = sqlite3.connect(str(path), timeout=10)
        try:
            out += [json.loads(r[0]).get("text", "") for r in conn.execute(
                "SELECT content FROM messages_in WHERE channel_type='agent'")]
        finally:
            conn.close()
    return out


def forged_clicks(host) -> list[dict]:
    """Action events naming a card the bad requests below name: none may be stored."""
    return host.q("SELECT * FROM inbound_events WHERE kind='action' AND"
                  " json_extract(payload, '$.question_id') IN"
                  " ('appr-x', 'appr-nope', 'appr-../x', 'q-agents-card')")


# ---- the API: guards and bad input ---------------------------------------------------------
CONSOLE = (("/api/status", None), ("/api/usage", None), ("/api/approvals", None),
           ("/api/errors", None), ("/api/file?path=a/b/c", None),
           ("/api/approvals/answer", {"id": "appr-x", "option": "approve"}),
           ("/api/upstreams/check", {"name": "anthropic"}))


def test_every_console_endpoint_needs_the_token_and_the_host(host):
    url, token = address(host)
    for path, body in CONSOLE:
        assert call(url, path, body)[0] == 401, path
        assert call(url, path, body, token="wrong" * 8)[0] == 401, path
        assert call(url, path, body, token=token, headers={"Host": "evil.example"})[0] == 421
    assert forged_clicks(host) == []


@pytest.mark.parametrize("path, body, code", [
    ("/api/usage?days=0", None, 400), ("/api/usage?days=x", None, 400),
    ("/api/usage?days=91", None, 400), ("/api/errors?lines=0", None, 400),
    ("/api/errors?lines=many", None, 400), ("/api/errors?lines=1001", None, 400),
    ("/api/file?path=../../etc/passwd", None, 400), ("/api/file?path=a/b", None, 400),
    ("/api/file?path=sess-x/m-1/nope.txt", None, 404),
    ("/api/approvals/answer", b"{not json", 400), ("/api/approvals/answer", b"[1]", 400),
    ("/api/approvals/answer", {"id": 5, "option": "approve"}, 400),
    ("/api/approvals/answer", {"id": "q-agents-card", "option": "yes"}, 400),
    ("/api/approvals/answer", {"id": "appr-../x", "option": "approve"}, 400),
    ("/api/approvals/answer", {"id": "appr-nope", "option": "approve"}, 404),
    ("/api/approvals/answer", {"id": "appr-nope", "option": 1}, 400),
    ("/api/upstreams/check", {"name": "nope"}, 404), ("/api/upstreams/check", b"[]", 400),
    ("/api/send", {"text": "x", "files": "notes.txt"}, 400),
    ("/api/send", {"text": "x", "files": [{"name": "a/b", "data": "eA=="}]}, 400),
    ("/api/send", {"text": "x", "files": [{"name": "a.txt", "data": "not base64!"}]}, 400),
    ("/api/send", {"text": "", "files": []}, 400),
    ("/api/send", {"text": "x", "files": [{"name": f"{i}.txt", "data": "eA=="}
                                          for i in range(11)]}, 400),
])
def test_bad_input_gets_one_clear_error_and_crashes_nothing(host, path, body, code):
    url, token = address(host)
    got, resp = call(url, path, body, token)
    assert got == code, (path, body, got, resp)
    error = resp.get("error", resp.get("raw"))
    assert isinstance(error, str) and error and "\n" not in error.strip()
    assert worker(host, "channel:web")["restarts"] == 0
    assert forged_clicks(host) == []


def test_the_status_api_lists_workers_sessions_and_upstreams(host):
    url, token = address(host)
    code, st = call(url, "/api/status", token=token)
    assert code == 200
    assert {w["name"] for w in st["workers"]} == {w["name"] for w in host.workers()}
    assert all(w["state"] and isinstance(w["restarts"], int) for w in st["workers"])
    assert "anthropic" in {u["name"] for u in st["upstreams"]}
    up = next(u for u in st["upstreams"] if u["name"] == "anthropic")
    assert up["local"] and "main" in up["used_by"]  # the fake model on 127.0.0.1
    assert st["broker"]["url"].startswith("http://127.0.0.1:")
    assert SECRET_NOT_IN(json.dumps(st))
    code, checked = call(url, "/api/upstreams/check", {"name": "anthropic"}, token)
    assert code == 200 and isinstance(checked["ok"], bool)
    assert checked["status"] is None or isinstance(checked["status"], int)


def SECRET_NOT_IN(text: str) -> bool:
    from conftest import SECRET

    return SECRET not in text


def test_the_console_names_the_brokers_check_as_the_broker_does():
    from nanoclaw.broker import proxy
    from nanoclaw.channels import web_console

    assert (web_console.CHECK_PATH, web_console.CHECK_HEADER, web_console.CHECK_STATE) == (
        proxy.CHECK_PATH, proxy.CHECK_HEADER, proxy.CHECK_STATE)


def test_markdown_is_rendered_without_any_html_of_its_own():
    from nanoclaw.channels.web_console import markdown_html

    out = markdown_html("**bold** <script>alert(1)</script> <img src=x onerror=alert(2)>\n\n"
                        "[click](javascript:alert(3)) ![pic](http://evil.example/t.png)"
                        " [ok](https://example.org)")
    assert "<strong>bold</strong>" in out
    assert "<script" not in out and "<img" not in out and 'href="javascript' not in out
    assert "&lt;script&gt;" in out and "&lt;img src=x onerror=alert(2)&gt;" in out
    assert '<a href="https://example.org">ok</a>' in out


# ---- in the browser ------------------------------------------------------------------------
@needs_chromium
def test_status_view_lists_every_worker_and_shows_a_killed_one_restarting(host, browser):
    from playwright.sync_api import expect

    wait_for(lambda: all(w["state"] == "RUNNING" for w in host.workers()), 30,
             what="every worker running")
    page = open_page(browser, host)
    page.click("#views button[data-view='status']")
    assert "view=status" in page.url and "token" not in page.url
    names = sorted(w["name"] for w in host.workers())
    rows = page.locator("#workers tbody tr")
    expect(rows).to_have_count(len(names))
    for w in host.workers():
        row = page.locator(f"#workers tr[data-worker='{w['name']}']")
        expect(row.locator("td.state")).to_have_text(w["state"])
        expect(row.locator("td.pid")).to_have_text(str(w["pid"]))
    expect(page.locator("#upstreams tr[data-upstream='anthropic'] td.used-by")).to_contain_text(
        "main")
    shot(page, "status")

    # kill -9 of a worker: the view shows it restarted, how it died and its new pid
    old = host.worker_pid("sweep")
    before = worker(host, "sweep")["restarts"]
    os.kill(old, signal.SIGKILL)
    row = page.locator("#workers tr[data-worker='sweep']")
    expect(row.locator("td.restarts")).to_have_text(str(before + 1))
    expect(row.locator("td.last-exit")).to_have_text("killed by SIGKILL")
    new = wait_for(lambda: host.worker_pid("sweep") not in (None, old) and
                   worker(host, "sweep")["state"] == "RUNNING" and host.worker_pid("sweep"),
                   30, what="sweep restarted")
    expect(row.locator("td.pid")).to_have_text(str(new))
    expect(row.locator("td.state")).to_have_text("RUNNING")
    shot(page, "status-restarted")

    # a reload stays on the view
    page.reload()
    expect(page.locator("#view-status")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    assert page.errors == []
    page.close()


@needs_chromium
def test_chat_markdown_files_typing_and_history(host, browser, model):
    from playwright.sync_api import expect

    page = open_page(browser, host)
    local = chat_log(page, "local")

    # the typing indicator while the agent works (a slow answer), gone with the reply
    model.inject(delay_ms=4000)
    page.fill("#text", "take your time")
    page.press("#text", "Enter")
    expect(page.locator("#typing")).to_be_visible()
    expect(local.locator(".msg.agent").last).to_have_text("echo: take your time")
    expect(page.locator("#typing")).to_be_hidden()

    # Markdown renders; HTML in it stays text, and nothing runs
    attack = ("**bold** and `code` <script>window.pwned=1</script>"
              " <img src=x onerror=\"window.pwned=2\"> [x](javascript:window.pwned=3)")
    page.fill("#text", attack)
    page.press("#text", "Enter")
    reply = local.locator(".msg.agent").last
    expect(reply.locator("strong")).to_have_text("bold")
    expect(reply.locator("code")).to_have_text("code")
    expect(reply).to_contain_text("<script>window.pwned=1</script>")
    expect(reply).to_contain_text('<img src=x onerror="window.pwned=2">')
    assert reply.locator("script, img, [onerror]").count() == 0
    assert reply.locator("a[href^='javascript']").count() == 0
    assert page.evaluate("typeof window.pwned") == "undefined"
    # the owner's own text is never markup either
    expect(local.locator(".msg.me").last).to_have_text(attack)
    assert local.locator(".msg.me script, .msg.me img").count() == 0

    # a file sent with a message reaches the agent's inbox
    page.set_input_files("#files", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                           "buffer": b"remember the milk\n"}])
    expect(page.locator("#attached")).to_contain_text("notes.txt")
    page.fill("#text", "see the file")
    page.press("#text", "Enter")
    expect(local.locator(".msg.me").last).to_contain_text("📎 notes.txt")
    expect(local.locator(".msg.agent").last).to_contain_text("notes.txt")
    ev = [e for e in inbound_events(host, "web", "chat") if e["payload"]["text"] == "see the file"]
    assert [a["name"] for a in ev[0]["payload"]["attachments"]] == ["notes.txt"]
    saved = wait_for(lambda: list((host.data / "sessions").rglob("inbox/*/notes.txt")), 30,
                     what="the file in the agent's inbox")
    assert saved[0].read_bytes() == b"remember the milk\n"

    # files from the agent download: inline, and staged by delivery in data/outfiles/
    staged = host.data / "outfiles" / "sess-console" / "msg-1"
    staged.mkdir(parents=True)
    (staged / "report.txt").write_bytes(b"the report\n")
    enqueue(host, "web:console-files", "web", "local", {"text": "two files", "files": [
        {"name": "inline.txt", "data": base64.b64encode(b"inline bytes").decode()},
        {"name": "report.txt", "path": str(staged / "report.txt")}]})
    files = local.locator(".msg.agent").last.locator("a.file")
    expect(files).to_have_text(["📎 inline.txt", "📎 report.txt"])
    for i, (name, data) in enumerate((("inline.txt", b"inline bytes"),
                                      ("report.txt", b"the report\n"))):
        with page.expect_download() as dl:
            files.nth(i).click()
        assert dl.value.suggested_filename == name
        assert Path(dl.value.path()).read_bytes() == data
    shot(page, "chat")

    # a reload: the conversation comes back from the host, rendered the same way
    page.evaluate("localStorage.removeItem('nanoclaw-seen')")
    page.reload()
    expect(page.locator("#status")).to_contain_text("connected")
    local = chat_log(page, "local")
    expect(local.locator(".msg.me")).to_contain_text(["take your time", attack, "see the file"])
    expect(local.locator(".msg.agent strong")).to_have_text(["bold"])
    expect(local.locator(".msg.me").last).to_contain_text("📎 notes.txt")
    expect(local.locator(".msg.agent").last.locator("a.file")).to_have_count(2)
    assert local.locator(".msg.agent script, .msg.agent img").count() == 0
    assert page.evaluate("typeof window.pwned") == "undefined"
    shot(page, "chat-reloaded")
    assert page.errors == []
    page.close()


@needs_chromium
def test_usage_chart_shows_a_groups_tokens_with_the_budget(host, browser):
    from playwright.sync_api import expect

    url, token = address(host)
    for i in range(3):  # one at a time: messages sent together are one turn
        assert call(url, "/api/send", {"text": f"usage {i}", "id": f"usage-{i}"}, token)[0] == 200
        wait_for(lambda: [e for e in call(url, "/api/events?wait=0&chat=local", token=token)[1]
                          ["events"] if e["type"] == "reply" and e.get("in_reply_to") ==
                          f"usage-{i}"], 60, what=f"reply {i}")

    def counted() -> int:
        return host.q("SELECT SUM(input_tokens + output_tokens + cache_creation_input_tokens"
                      " + cache_read_input_tokens) AS n FROM token_usage u JOIN agent_groups g"
                      " ON g.id=u.agent_group_id WHERE g.folder='main'")[0]["n"] or 0

    def shown() -> dict:
        code, usage = call(url, "/api/usage?days=7", token=token)
        assert code == 200 and len(usage["days"]) == 7
        return usage

    usage = wait_for(lambda: (lambda u: counted() and sum(next(
        g for g in u["groups"] if g["folder"] == "main")["tokens"]) == counted() and u)(
        shown()), 30, what="the usage counted and shown")
    main = next(g for g in usage["groups"] if g["folder"] == "main")
    assert main["budget"] == BUDGET and sum(main["requests"]) >= 3

    page = open_page(browser, host, view="usage")
    chart = page.locator("svg.chart[data-group='main']")
    expect(chart).to_be_visible()
    today = chart.locator(f"rect.bar[data-day='{usage['days'][-1]}']")
    expect(today).to_have_attribute("data-tokens", str(main["tokens"][-1]))
    assert int(today.get_attribute("data-tokens")) > 0
    expect(chart.locator("line.budget")).to_have_count(1)
    expect(chart.locator("text.budget-label")).to_contain_text(f"{BUDGET:,}")
    expect(page.locator(".usage[data-group='main'] .usage-total")).to_have_attribute(
        "data-today", str(main["tokens"][-1]))
    shot(page, "usage")
    assert page.errors == []
    page.close()


@needs_chromium
def test_an_approval_answered_on_the_page_releases_the_agent(host, browser):
    """The agent asks for a change only an admin may make (`ncl groups update`): the
    approval waits in the console, whatever chat the card went to; Approve there is an
    inbound action event from the owner, the router decides it, and the agent is told."""
    from playwright.sync_api import expect

    url, token = address(host)
    page = open_page(browser, host)
    page.fill("#text", '[[tool:ncl {"args": ["groups", "update", "--name", "Ada"]}]]')
    page.press("#text", "Enter")
    expect(chat_log(page, "local").locator(".msg.agent").last).to_contain_text(
        "approval-pending")
    (appr,) = host.q("SELECT * FROM pending_approvals WHERE status='pending'")

    expect(page.locator("#approvals-count")).to_have_text("1")
    page.click("#views button[data-view='approvals']")
    card = page.locator(f".approval[data-approval='{appr['approval_id']}']")
    expect(card.locator(".question pre")).to_contain_text("groups update")
    assert card.locator(".question script, .question img").count() == 0
    expect(card.get_by_role("button", name="Approve")).to_be_enabled()
    shot(page, "approvals")
    card.get_by_role("button", name="Approve").click()

    wait_for(lambda: host.q("SELECT name FROM agent_groups WHERE folder='main'")[0]["name"]
             == "Ada", 30, what="the approved rename")
    decided = host.q("SELECT * FROM pending_approvals WHERE approval_id=?",
                     (appr["approval_id"],))[0]
    assert decided["status"] == "approved" and decided["decided_by"] == OWNER
    (click,) = [e for e in inbound_events(host, "web", "action")
                if e["payload"]["question_id"] == appr["approval_id"]]
    assert click["payload"] == {"question_id": appr["approval_id"], "option": "approve",
                                "user_id": OWNER}
    wait_for(lambda: host.q("SELECT status FROM inbound_events WHERE id=?", (click["id"],))[0]
             ["status"] == "routed", 30, what="the click routed")
    wait_for(lambda: any("was approved and ran" in n for n in session_notes(host)), 30,
             what="the agent told")
    expect(page.locator(f".approval[data-approval='{appr['approval_id']}']")).to_have_count(0)
    expect(page.locator("#approvals-none")).to_be_visible()
    expect(page.locator("#approvals-count")).to_be_hidden()
    # the same card mirrored into the chat is settled there too
    expect(chat_log(page, "local").locator(
        f".card[data-question='{appr['approval_id']}'] .chosen")).to_have_text("✓ Approved")
    shot(page, "approvals-answered")
    # a second answer to the decided approval: refused, nothing queued
    assert call(url, "/api/approvals/answer", {"id": appr["approval_id"], "option": "reject"},
                token)[0] == 404
    assert page.errors == []
    page.close()


@needs_chromium
def test_errors_view_shows_the_error_logs_tail_as_text(host, browser):
    from playwright.sync_api import expect

    url, token = address(host)
    log = host.base / "logs" / "nanoclaw.error.log"
    hostile = "2026-12-06 05:00:00.000 | ERROR | test | <img src=x onerror=window.pwned=1> boom"
    with open(log, "a") as f:
        f.write(hostile + "\n")
    code, errors = call(url, "/api/errors?lines=5", token=token)
    assert code == 200 and errors["lines"][-1] == hostile and len(errors["lines"]) <= 5
    page = open_page(browser, host)
    page.click("#views button[data-view='errors']")
    expect(page.locator("#errors .line").last).to_have_text(hostile)
    expect(page.locator("#errors .line.error").last).to_have_text(hostile)
    assert page.locator("#errors img").count() == 0
    assert page.evaluate("typeof window.pwned") == "undefined"
    shot(page, "errors")
    assert token not in page.locator("#errors").inner_text()
    assert page.errors == []
    page.close()
    for f in (host.base / "logs").glob("*.log"):
        assert token not in f.read_text(), f  # the web token is never written to logs/


@needs_chromium
def test_status_view_shows_each_session_with_its_agents_state(host, browser):
    """After the conversations above: the local web chat's session, its agent group and
    the state of its agent as the sessions table has it."""
    from playwright.sync_api import expect

    (s,) = host.q("SELECT s.id, s.container_status, g.name, g.folder FROM sessions s"
                  " JOIN agent_groups g ON g.id=s.agent_group_id JOIN messaging_groups m"
                  " ON m.id=s.messaging_group_id WHERE m.channel_type='web' AND"
                  " m.platform_id='local'")
    page = open_page(browser, host, view="status")
    row = page.locator(f"#sessions tr[data-session='{s['id']}']")
    expect(row.locator("td.chat")).to_have_text("web:local")
    expect(row.locator("td.agent")).to_have_text(f"{s['name']} ({s['folder']})")
    wait_for(lambda: row.locator("td.state").inner_text() == host.q(
        "SELECT container_status FROM sessions WHERE id=?", (s["id"],))[0]["container_status"],
        30, what="the agent's state as the sessions table has it")
    expect(page.locator("#sessions tbody tr")).to_have_count(
        len(host.q("SELECT id FROM sessions WHERE status='active'")))
    shot(page, "status-sessions")
    assert page.errors == []
    page.close()
