"""`nanoclaw setup` against the fake model and the fake platforms (real clients of ours,
real HTTP on 127.0.0.1): a working `.env` with mode 0600, every key and token checked
with one cheap call, a bad one refused in one line naming it with nothing written, a
second run that changes only what it is told to; and `nanoclaw doctor` checking the same
tokens, the credential, the webhook door, disk and logs."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Host, clean_env
from fakes.fake_discord import FakeDiscord
from fakes.fake_slack import FakeSlack
from fakes.fake_telegram import FakeTelegram

from nanoclaw import config
from nanoclaw.cli import doctor_checks


@pytest.fixture
def platforms():
    fakes = [FakeTelegram().start(), FakeDiscord().start(), FakeSlack().start()]
    yield fakes
    for f in fakes:
        f.stop()


def _run(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = clean_env(NANOCLAW_DATA_DIR=str(cwd / "data"), NANOCLAW_LOGS_DIR=str(cwd / "logs"),
                    NANOCLAW_GROUPS_DIR=str(cwd / "groups"), NANOCLAW_RUNTIME="process")
    return subprocess.run([sys.executable, "-m", "nanoclaw", *args], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def _flags(fake_model, platforms, **tokens: str) -> list[str]:
    tg, dc, sl = platforms
    values = {"anthropic-api-key": "sk-ant-from-setup", "anthropic-base-url": fake_model.url,
              "telegram-bot-token": tg.token, "telegram-api-base": tg.url,
              "discord-bot-token": dc.token, "discord-api-base": dc.api_base,
              "slack-bot-token": sl.bot_token, "slack-app-token": sl.app_token,
              "slack-api-base": sl.api_base, **tokens}
    return ["setup", "--non-interactive",
            *(x for k, v in values.items() for x in (f"--{k}", v))]


def test_setup_writes_a_working_env(tmp_path, fake_model, platforms):
    tg, dc, sl = platforms
    base = tmp_path / "h"
    base.mkdir()
    r = _run(base, *_flags(fake_model, platforms))
    assert r.returncode == 0, r.stdout + r.stderr
    env_file = base / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    text = env_file.read_text()
    assert "ANTHROPIC_API_KEY=sk-ant-from-setup" in text
    assert f"TELEGRAM_BOT_TOKEN={tg.token}" in text and f"SLACK_APP_TOKEN={sl.app_token}" in text
    # each checked with one cheap call, with the value given
    models = [q for q in fake_model.requests if q["path"] == "/v1/models"]
    assert [q["headers"].get("x-api-key") for q in models] == ["sk-ant-from-setup"]
    assert tg.calls_of("getMe") and dc.calls_of("GET /users/@me")
    assert sl.calls_of("auth.test") and sl.calls_of("apps.connections.open")
    assert "runtime" in r.stdout and "next: make run" in r.stdout

    # the .env works: a host started there with no key in its environment answers
    h = Host(base, fake_model.url, {"NANOCLAW_TELEGRAM_POLL_TIMEOUT": "1"})
    for k in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        h.env.pop(k)
    try:
        h.start()
        reply = h.cli("send", "hello", "--wait", "60")
        assert reply.returncode == 0, reply.stderr + h.output()
        assert reply.stdout.strip() == "echo: hello"
        sent = [q["headers"].get("x-api-key") for q in fake_model.requests
                if q["path"] == "/v1/messages"]
        assert sent and set(sent) == {"sk-ant-from-setup"}  # the broker used .env's key
    finally:
        h.cleanup()


def test_setup_refuses_a_bad_token_in_one_line(tmp_path, fake_model, platforms):
    (tmp_path / ".env").write_text("# mine\nNANOCLAW_ASSISTANT_NAME=Bob\n")
    before = (tmp_path / ".env").read_text()
    r = _run(tmp_path, *_flags(fake_model, platforms, **{"telegram-bot-token": "123:WRONG"}))
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nanoclaw: TELEGRAM_BOT_TOKEN was"
                                                         " refused by Telegram"), err
    assert (tmp_path / ".env").read_text() == before  # nothing written

    r = _run(tmp_path, *_flags(fake_model, platforms, **{"discord-bot-token": "nope"}))
    assert r.returncode == 2 and r.stderr.startswith("nanoclaw: DISCORD_BOT_TOKEN was refused")
    r = _run(tmp_path, *_flags(fake_model, platforms, **{"slack-bot-token": "xoxb-nope"}))
    assert r.returncode == 2 and r.stderr.startswith("nanoclaw: SLACK_BOT_TOKEN was refused"
                                                     " by Slack (invalid_auth)"), r.stderr

    fake_model.inject(status=401, message="invalid x-api-key")
    r = _run(tmp_path, *_flags(fake_model, platforms))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("nanoclaw: ANTHROPIC_API_KEY was refused by"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / ".env").read_text() == before

    r = _run(tmp_path, "setup", "--non-interactive")  # no key anywhere
    assert r.returncode == 2 and "ANTHROPIC_API_KEY" in r.stderr and "make demo" in r.stderr


def test_rerunning_setup_changes_only_what_you_change(tmp_path, fake_model, platforms):
    tg, dc, sl = platforms
    env_file = tmp_path / ".env"
    env_file.write_text(f"# my settings\nNANOCLAW_ASSISTANT_NAME=Bob\nANTHROPIC_API_KEY=sk-old\n"
                        f"ANTHROPIC_BASE_URL={fake_model.url}\n\nexport TZ=Europe/Paris\n")
    env_file.chmod(0o644)
    r = _run(tmp_path, "setup", "--non-interactive", "--telegram-bot-token", tg.token,
             "--telegram-api-base", tg.url)
    assert r.returncode == 0, r.stderr
    lines = env_file.read_text().splitlines()
    assert lines == ["# my settings", "NANOCLAW_ASSISTANT_NAME=Bob", "ANTHROPIC_API_KEY=sk-old",
                     f"ANTHROPIC_BASE_URL={fake_model.url}", "", "export TZ=Europe/Paris",
                     f"TELEGRAM_BOT_TOKEN={tg.token}", f"TELEGRAM_API_BASE={tg.url}"]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "TELEGRAM_BOT_TOKEN set" in r.stdout and "ANTHROPIC_API_KEY set" not in r.stdout

    # interactive, answers piped: Enter keeps, '-' removes, a refused token is asked again
    answers = "\n".join(["", "sk-new", "", "", "123:WRONG", "-", dc.token]) + "\n"
    r = _run(tmp_path, "setup", "--discord-api-base", dc.api_base, stdin=answers)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TELEGRAM_BOT_TOKEN was refused by Telegram" in r.stdout
    text = env_file.read_text()
    assert "ANTHROPIC_API_KEY=sk-new" in text and "sk-old" not in text
    assert "TELEGRAM_BOT_TOKEN" not in text and f"DISCORD_BOT_TOKEN={dc.token}" in text
    assert text.startswith("# my settings\nNANOCLAW_ASSISTANT_NAME=Bob\n")


def test_doctor_checks_credential_tokens_disk_and_logs(tmp_path, fake_model, platforms):
    tg, dc, sl = platforms
    r = _run(tmp_path, *_flags(fake_model, platforms))
    assert r.returncode == 0, r.stderr
    (tmp_path / "logs").mkdir()
    d = _run(tmp_path, "doctor")
    out = d.stdout
    assert f"ok   ANTHROPIC_API_KEY is accepted by {fake_model.url}" in out, out
    assert "ok   channel telegram: TELEGRAM_BOT_TOKEN is good (Telegram bot @andy_test_bot)" in out
    assert "ok   channel discord: DISCORD_BOT_TOKEN is good" in out
    assert "ok   channel slack: SLACK_BOT_TOKEN is good" in out
    assert "MiB free on the disk of data/" in out and "logs/ holds" in out

    # a token revoked since, and a key refused: each BAD with its fix
    with open(tmp_path / ".env", "a") as f:
        f.write("DISCORD_BOT_TOKEN=revoked\n")
    fake_model.inject(status=401, message="invalid x-api-key")
    d = _run(tmp_path, "doctor")
    assert d.returncode == 1
    assert "BAD  channel discord: DISCORD_BOT_TOKEN was refused by Discord (HTTP 401" in d.stdout
    assert "Fix: nanoclaw setup --discord-bot-token NEW_TOKEN" in d.stdout
    assert "BAD  ANTHROPIC_API_KEY was refused by" in d.stdout, d.stdout
    assert "Fix: nanoclaw setup (enter a valid key)" in d.stdout

    # logs/ past what rotation allows: BAD, and the fix
    (tmp_path / "logs" / "nanoclaw.log").write_bytes(b"x" * (3 << 20))
    with open(tmp_path / ".env", "a") as f:
        f.write("NANOCLAW_LOG_ROTATE_MB=0.1\nNANOCLAW_LOG_KEEP=1\nNANOCLAW_CONTAINER_LOGS_MB=1\n")
    d = _run(tmp_path, "doctor")
    assert "BAD  logs/ holds 3.0 MiB" in d.stdout and "Fix: nanoclaw logs --tidy" in d.stdout
    t = _run(tmp_path, "logs", "--tidy")
    assert t.returncode == 0 and "rotated" in t.stdout
    assert (tmp_path / "logs" / "nanoclaw.log.1").exists()


def test_doctor_checks_the_webhook_door(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    s = config.load()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        [(ok, line)] = doctor_checks.webhook_door(s, f"http://127.0.0.1:{port}", True)
        assert ok and "answers" in line
    [(ok, line)] = doctor_checks.webhook_door(s, f"http://127.0.0.1:{port}", True)
    assert ok is False and "Fix: nanoclaw workers restart webhooks" in line
    [(ok, line)] = doctor_checks.webhook_door(s, f"http://127.0.0.1:{port}", False)
    assert ok is None and "not running" in line
    assert doctor_checks.webhook_door(s, None, True) == []


def test_the_readme_names_setup_and_demo():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme.split("## ", 1)[0]
    assert "nanoclaw setup" in readme


def test_setup_checks_github_and_linear_tokens(tmp_path, fake_model):
    from fakes.fake_github import FakeGitHub
    from fakes.fake_linear import FakeLinear

    gh, ln = FakeGitHub().start(), FakeLinear().start()
    try:
        common = ["setup", "--non-interactive", "--anthropic-api-key", "sk-x",
                  "--anthropic-base-url", fake_model.url, "--github-api-base", gh.url,
                  "--linear-api-url", f"{ln.url}/graphql"]
        r = _run(tmp_path, *common, "--github-token", gh.token, "--linear-api-key", ln.key)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "ok: GITHUB_TOKEN is good (GitHub account nano-bot)" in r.stdout
        assert "ok: LINEAR_API_KEY is good (Linear user Andy Bot)" in r.stdout
        r = _run(tmp_path, *common, "--github-token", "ghp-wrong")
        assert r.returncode == 2 and r.stderr.startswith("nanoclaw: GITHUB_TOKEN was refused")
        r = _run(tmp_path, *common, "--linear-api-key", "lin_wrong")
        assert r.returncode == 2 and r.stderr.startswith("nanoclaw: LINEAR_API_KEY was refused")
    finally:
        gh.stop()
        ln.stop()
