"""The browser agents get, and the fonts it renders with.

- The agent image carries Debian's Chromium and the pinned agent-browser, which opens a
  page and takes a screenshot as the sandbox user on a read-only root with no network
  (the page served inside the container itself, on its own loopback).
- `NANOCLAW_CJK_FONTS=1` (`make image CJK_FONTS=1`) builds the image with CJK fonts and
  labels it so; .ci/run builds that variant as `nanoclaw-agent:cjk` (this test needs the
  Debian mirror only at build time, which the test itself must not reach).
- `nanoclaw doctor` suggests the fonts when the timezone or recent messages are CJK and
  the agents' browser has none, and says the image is short of them when the setting is
  on but the image was built without.
- The pinned agent-browser download is refused unless it matches its integrity pin.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import IMAGE, ROOT, _absent

from nanoclaw.cli import doctor_checks
from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.runtime import agent_browser

CJK_IMAGE = os.environ.get("NANOCLAW_CJK_IMAGE", "nanoclaw-agent:cjk")
PAGE = "<html><body><h1>Hello from the page</h1><a href='/next'>next</a></body></html>"


def _run(client, image: str, script: str) -> str:
    out = client.containers.run(image, ["sh", "-c", script], network_mode="none",
                                read_only=True, user="1000:1000", remove=True,
                                tmpfs={"/workspace": "uid=1000", "/tmp": ""},
                                working_dir="/workspace", entrypoint=[], stderr=True)
    return out.decode()


def test_the_image_browses_and_takes_a_screenshot(docker_client, agent_image):
    out = _run(docker_client, agent_image, (
        f"printf %s \"{PAGE}\" > index.html"
        " && (python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &)"
        " && sleep 0.5 && agent-browser --version && agent-browser open http://127.0.0.1:8000/"
        " && agent-browser snapshot && agent-browser screenshot shot.png"
        " && od -A n -t x1 -N 8 shot.png && agent-browser close"
        " && fc-list :lang=zh family | wc -l"))
    assert f"agent-browser {agent_browser.VERSION}" in out, out
    assert 'heading "Hello from the page"' in out and 'link "next"' in out, out
    assert "89 50 4e 47 0d 0a 1a 0a" in out, out  # a PNG was written
    assert out.strip().splitlines()[-1].strip() == "0", "no CJK fonts in the plain image"
    labels = docker_client.images.get(agent_image).labels
    assert labels["nanoclaw.cjk-fonts"] == "0"
    env = dict(e.split("=", 1) for e in docker_client.images.get(agent_image).attrs["Config"]["Env"])
    for k, v in agent_browser.environment().items():  # as the runtimes set it
        assert env[k] == v, k


def test_the_cjk_variant_has_the_fonts(docker_client, agent_image):
    try:
        image = docker_client.images.get(CJK_IMAGE)
    except Exception:  # noqa: BLE001 - docker's NotFound
        _absent(f"no {CJK_IMAGE} image: .ci/run builds it (NANOCLAW_IMAGE={CJK_IMAGE}"
                " make image CJK_FONTS=1)")
    assert image.labels["nanoclaw.cjk-fonts"] == "1"
    assert image.labels["nanoclaw.image-hash"] == \
        docker_client.images.get(agent_image).labels["nanoclaw.image-hash"]
    out = _run(docker_client, CJK_IMAGE, "fc-list :lang=ja family; fc-list :lang=ko family")
    assert "Noto Sans CJK" in out or "Noto Serif CJK" in out, out


# --- nanoclaw doctor ------------------------------------------------------------------------
def test_cjk_is_wanted_for_a_cjk_timezone_or_cjk_messages():
    assert doctor_checks.cjk_wanted("Asia/Tokyo", []) == "the timezone is Asia/Tokyo"
    assert doctor_checks.cjk_wanted("Europe/Berlin", ["hallo", "wie geht's"]) is None
    why = doctor_checks.cjk_wanted("UTC", ["明天下午三点提醒我", "hi", "안녕하세요", "ok"])
    assert why == "2 of the last 4 messages are in Chinese, Japanese or Korean"
    assert doctor_checks.cjk_wanted("UTC", ["東京"] + ["hello"] * 9) is None  # one in ten


def test_doctor_suggests_the_fonts_and_says_when_the_image_lacks_them(tmp_path):
    store = Store.open(tmp_path / "data")
    for i, text in enumerate(["こんにちは", "明日の天気は？", "thanks"]):
        store.conn.execute("INSERT INTO inbound_events (channel_type, platform_id, message_id,"
                           " kind, payload, received_at) VALUES ('cli', 'local', ?, 'chat', ?,"
                           " '2026-01-01T00:00:00.000Z')", (f"m{i}", json.dumps({"text": text})))
    store.conn.execute("INSERT INTO inbound_events (channel_type, platform_id, message_id,"
                       " kind, payload, received_at) VALUES ('cli', 'local', 'bad', 'chat',"
                       " 'not json', '2026-01-01T00:00:00.000Z')")
    texts = store.recent_texts()
    assert sorted(texts) == sorted(["こんにちは", "明日の天気は？", "thanks"])
    s = Settings(data_dir=tmp_path / "data")
    [(ok, line)] = doctor_checks.cjk_fonts(s, texts, "0", "docker")
    assert ok is None and line.startswith("CJK fonts suggested (2 of the last 3 messages")
    assert line.endswith("Fix: add NANOCLAW_CJK_FONTS=1 to .env, then make image")
    assert doctor_checks.cjk_fonts(s, texts, "1", "docker") == []
    assert doctor_checks.cjk_fonts(s, ["hello"], "0", "docker") == []
    on = Settings(data_dir=tmp_path / "data", cjk_fonts=True)
    [(ok, line)] = doctor_checks.cjk_fonts(on, [], "0", "docker")
    assert ok is False and line.endswith("Fix: make image")
    store.close()


# --- the pinned download ----------------------------------------------------------------------
def _tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_the_agent_browser_download_is_checked_against_its_pin(tmp_path, monkeypatch):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    good = _tgz({agent_browser.MEMBER: b"#!/bin/sh\necho agent-browser\n"})
    served = {"body": _tgz({agent_browser.MEMBER: b"tampered"})}

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(served["body"])))
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("NANOCLAW_NPM_REGISTRY", f"http://127.0.0.1:{srv.server_port}")
        pin = "sha512-" + base64.b64encode(hashlib.sha512(good).digest()).decode()
        monkeypatch.setattr(agent_browser, "INTEGRITY", pin)
        with pytest.raises(RuntimeError, match="does not match its pinned integrity"):
            agent_browser.install(tmp_path / "c")
        assert agent_browser.binary(tmp_path / "c") is None
        served["body"] = good
        path = agent_browser.install(tmp_path / "c")
        assert path == agent_browser.binary(tmp_path / "c") and os.access(path, os.X_OK)
    finally:
        srv.shutdown()


def test_the_pin_is_part_of_the_image_recipe(monkeypatch):
    """Another agent-browser pin is another image (doctor says: make image), in both
    recipes: the host's `image_hash` and build.sh's (which must stay the same)."""
    from nanoclaw.runtime import sandbox

    before = sandbox.image_hash(ROOT / "container")
    monkeypatch.setattr(agent_browser, "VERSION", "0.0.1")
    assert sandbox.image_hash(ROOT / "container") != before
    recipe = (ROOT / "container" / "build.sh").read_text()
    assert "printf 'agent-browser\\0%s\\0' \"$ab_pin\"" in recipe


# --- the whole way: a chat, an agent in docker, the browser through the door ----------------
class _Page(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        _Page.hits.append(self.path)
        body = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("runtime", ["docker", "bwrap"])
def test_an_agent_browses_through_the_door_and_sends_the_screenshot(tmp_path, fake_model,
                                                                    runtime, request):
    """A Telegram user asks; the agent (docker's image, or bwrap with the host's Chromium
    and cached agent-browser; network none) runs agent-browser, which reaches the test
    page only through the egress door (its one way out), and the PNG it made reaches the
    chat as a file. The door logged the destination for the group."""
    image = request.getfixturevalue("agent_image") if runtime == "docker" else IMAGE
    if runtime == "bwrap":
        request.getfixturevalue("bwrap_works")
        if agent_browser.binary() is None:
            _absent("no cached agent-browser (container/build.sh installs it)")
    from http.server import ThreadingHTTPServer
    from threading import Thread

    from conftest import Host, wait_for
    from fakes.fake_telegram import FakeTelegram
    from fakes.hosts import wire_chat

    page = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    Thread(target=page.serve_forever, daemon=True).start()
    port = page.server_address[1]
    tg = FakeTelegram().start()
    h = Host(tmp_path / "h", fake_model.url, {
        "TELEGRAM_BOT_TOKEN": tg.token, "TELEGRAM_API_BASE": tg.url,
        "NANOCLAW_TELEGRAM_POLL_TIMEOUT": "1", "NANOCLAW_WEB_ENABLED": "false",
        "NANOCLAW_RUNTIME": runtime, "NANOCLAW_IMAGE": image,
        "NANOCLAW_PROVIDER": "anthropic", "NANOCLAW_WARM_POOL": "0",
        "NANOCLAW_EGRESS_PORTS": f"80,443,{port}",
        "NANOCLAW_EGRESS_TEST_ALLOW": f"127.0.0.1:{port}"})
    try:
        h.start()
        chat = tg.chat(1)
        wire_chat(h, tg.channel, tg.platform_id(chat))
        # (no & < > in it: the agent sees the message XML-escaped, the fake model acts
        # on what it sees)
        browse = (f"set -e; agent-browser open http://127.0.0.1:{port}/; agent-browser"
                  " snapshot; agent-browser screenshot shot.png; agent-browser close")
        tg.user_says(chat, f"[[tool:bash {json.dumps({'command': browse})}]]")
        first = wait_for(lambda: tg.bot_sent(chat), 120, what="the browsing turn's answer")
        assert 'heading \\"Hello from the page\\"' in json.dumps([s.text for s in first]), first
        tg.user_says(chat, f"[[tool:send_file {json.dumps({'path': 'shot.png'})}]]")
        sent = wait_for(lambda: [s for s in tg.bot_sent(chat) if s.files], 60,
                        what="the screenshot in the chat")
        (name, data), = sent[0].files
        assert name == "shot.png" and data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert _Page.hits, "the page was never fetched"
        rows = h.q("SELECT host, port, allowed FROM egress_log")
        assert {"host": "127.0.0.1", "port": port, "allowed": 1} in rows, rows
    finally:
        h.cleanup()
        tg.stop()
        page.shutdown()
