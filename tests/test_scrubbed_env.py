"""The developer's shell does not reach the tests: a platform token, an API key or a
NANOCLAW_* setting exported where pytest runs is neither seen in-process nor passed to a
test host, so no test host starts a worker that talks to a real platform."""

from __future__ import annotations

import os

from conftest import KEEP, clean_env

from nanoclaw import config


def test_an_exported_platform_token_starts_no_worker_in_a_test_host(host_factory, monkeypatch):
    leaked = {"TELEGRAM_BOT_TOKEN": "123:leaked-from-the-shell",
              "DISCORD_BOT_TOKEN": "leaked", "SLACK_BOT_TOKEN": "xoxb-leaked",
              "SLACK_APP_TOKEN": "xapp-leaked", "NANOCLAW_WEB_ENABLED": "false",
              "CLAUDE_CODE_OAUTH_TOKEN": "leaked", "OPENAI_API_KEY": "leaked"}
    for k, v in leaked.items():  # as if exported in the shell that runs pytest
        monkeypatch.setenv(k, v)
    h = host_factory().start()
    names = {w["name"] for w in h.workers()}
    assert "channel:cli" in names and "channel:web" in names  # the host's own defaults
    assert not {"channel:telegram", "channel:discord", "channel:slack"} & names
    assert not set(leaked) & set(h.env)
    pid = h.worker_pid("channel:cli")
    seen = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert not [e for e in seen if e.split(b"=", 1)[0].decode() in leaked]


def test_in_process_settings_see_only_what_the_test_sets(monkeypatch, tmp_path):
    assert not [k for k in os.environ if k.startswith(("TELEGRAM_", "SLACK_", "DISCORD_"))]
    monkeypatch.setenv("NANOCLAW_DATA_DIR", str(tmp_path))
    s = config.load()
    assert s.data_dir == tmp_path and not s.telegram_bot_token


def test_clean_env_keeps_the_test_knobs_and_the_basics(monkeypatch):
    monkeypatch.setenv("NANOCLAW_REQUIRE_SANDBOXES", "1")
    monkeypatch.setenv("NANOCLAW_POLL_MIN", "9")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-real")
    env = clean_env(NANOCLAW_RUNTIME="process")
    assert env["NANOCLAW_REQUIRE_SANDBOXES"] == "1" and env["NANOCLAW_RUNTIME"] == "process"
    assert "NANOCLAW_POLL_MIN" not in env and "ANTHROPIC_API_KEY" not in env
    assert env.get("PATH") == os.environ.get("PATH") and "NANOCLAW_REQUIRE_SANDBOXES" in KEEP
