"""The first five minutes (issue 16), as a new user meets them: `make run` with no key
says so on its first screen, `nanoclaw send` fails with an exit code and one line that
name the cause, `make demo` answers on a fresh clone, and a notice ("retrying…") or an
`Error:` row is never taken for a reply."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, agent_pids, clean_env, wait_for

from nanoclaw import config
from nanoclaw.cli import credentials
from nanoclaw.cli.chat import EXIT_ERROR_REPLY, EXIT_NO_HOST, EXIT_NO_REPLY

VENV = Path(sys.executable).parent.parent
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dirs(tmp_path: Path) -> dict[str, str]:
    return {"VENV": str(VENV), "NANOCLAW_DATA_DIR": str(tmp_path / "data"),
            "NANOCLAW_LOGS_DIR": str(tmp_path / "logs"),
            "NANOCLAW_GROUPS_DIR": str(tmp_path / "groups")}


def _nanoclaw(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV / "bin" / "nanoclaw"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_which_credential_is_missing(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env here
    s = config.load()
    assert "ANTHROPIC_API_KEY" in credentials.missing(s, {})
    assert credentials.missing(s, {"ANTHROPIC_AUTH_TOKEN": "x"}) is None
    assert credentials.missing(s.model_copy(update={"anthropic_api_key": "k"}), {}) is None
    local = s.model_copy(update={"anthropic_base_url": "http://127.0.0.1:8765"})
    assert credentials.missing(local, {}) is None  # a model on this machine may need none
    oa = s.model_copy(update={"provider": "openai"})
    assert "OPENAI_API_KEY" in credentials.missing(oa, {"ANTHROPIC_API_KEY": "k"})
    assert credentials.missing(oa, {"OPENAI_API_KEY": "k"}) is None


def test_a_key_check_that_reaches_nothing_cannot_tell(fake_model):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ok, why = credentials.check_key("anthropic", f"http://127.0.0.1:{port}", "sk-x")
    assert ok is None and "cannot reach" in why
    assert credentials.check_key("anthropic", fake_model.url, "sk-x")[0] is True
    fake_model.inject(status=401, message="invalid x-api-key")
    ok, why = credentials.check_key("anthropic", fake_model.url, "sk-x")
    assert ok is False and why.startswith("refused by") and "invalid x-api-key" in why


@needs_make
def test_make_run_without_a_credential_says_so(tmp_path, fake_model):
    """No key anywhere. The model's address is this machine's, but not a loopback name
    the host would trust to need no key (0.0.0.0 reaches 127.0.0.1 here): so it is
    treated as a remote API, and the fake answers the keyless calls 401 as the real one
    does. Nothing leaves the machine."""
    env = clean_env(**_dirs(tmp_path), ANTHROPIC_BASE_URL=f"http://0.0.0.0:{fake_model.port}")
    out = tmp_path / "make.out"
    proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=open(out, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "data" / "cli.sock").exists(), 120, what="host socket")
        screen = out.read_text().splitlines()
        first_log = next(i for i, line in enumerate(screen) if " | INFO " in line)
        top = "\n".join(screen[:first_log])
        assert "NO MODEL CREDENTIAL" in top and "ANTHROPIC_API_KEY" in top, top
        assert ".env" in top and "make demo" in top, top

        r = _nanoclaw(env, "send", "hello", "--wait", "20")
        assert r.returncode in (EXIT_NO_REPLY, EXIT_ERROR_REPLY), (r.returncode, r.stderr)
        assert r.stdout == ""
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and err.startswith("nanoclaw: "), err
        assert "no ANTHROPIC_API_KEY" in err and "make demo" in err, err

        d = _nanoclaw(env, "doctor")
        assert d.returncode == 1
        assert "BAD  no ANTHROPIC_API_KEY" in d.stdout and "nanoclaw setup" in d.stdout, d.stdout
    finally:
        _stop(proc)
    assert not agent_pids(tmp_path / "data")


@needs_make
def test_make_demo_answers_on_a_fresh_clone(tmp_path):
    """A fresh clone: no key, no .env, no fake model running; one command."""
    env = clean_env(**_dirs(tmp_path))
    out = tmp_path / "demo.out"
    proc = subprocess.Popen(["make", "demo"], cwd=ROOT, env=env, stdout=open(out, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "DEMO: web chat at http://127.0.0.1:" in out.read_text(), 120,
                 what="the demo's web chat address")
        text = out.read_text()
        assert "CANNED" in text and "NO MODEL CREDENTIAL" not in text, text
        r = _nanoclaw(env, "send", "hello", "--wait", "60")
        assert r.returncode == 0, r.stderr + out.read_text()[-3000:]
        assert r.stdout.strip() == "echo: hello"
    finally:
        _stop(proc)  # `make` itself dies of the signal; the host stops cleanly
    wait_for(lambda: "host stopped" in out.read_text(), 30, what="the host stopping")
    assert not agent_pids(tmp_path / "data")


def test_send_exit_codes(host_factory, fake_model):
    h = host_factory("codes")
    h.base.mkdir(parents=True)
    r = h.cli("send", "anyone?", "--wait", "1")
    assert r.returncode == EXIT_NO_HOST and "no host is running" in r.stderr
    h.start()
    assert h.cli("send", "warm up", "--wait", "60").stdout.strip() == "echo: warm up"

    # overloaded once (the agent says "retrying…"), then the retry takes longer than
    # --wait: the notice is not a reply
    fake_model.inject(status=529)
    fake_model.inject(delay_ms=30_000)
    r = h.cli("send", "are you there", "--chat", "busy", "--wait", "10")
    assert r.returncode == EXIT_NO_REPLY, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "retrying" in r.stderr and "no reply within 10s" in r.stderr, r.stderr
    fake_model.clear()

    # every attempt refused: the agent's `Error:` row is an error, not a reply
    fake_model.inject(status=401, count=1000, message="invalid x-api-key")
    r = h.cli("send", "and now", "--chat", "refused", "--wait", "60")
    assert r.returncode == EXIT_ERROR_REPLY, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "ANTHROPIC_API_KEY" in r.stderr and "nanoclaw doctor" in r.stderr, r.stderr
    fake_model.clear()


def test_each_model_failure_names_its_own_cause(host_factory, fake_model):
    """An unreachable model API, a refused key and an overloaded model each reach the
    user in their own words (the first two with the fix), never all as "busy"."""
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    h = host_factory("unreachable", ANTHROPIC_BASE_URL=f"http://127.0.0.1:{closed}").start()
    r = h.cli("send", "hello?", "--wait", "90")
    assert r.returncode == EXIT_ERROR_REPLY, (r.returncode, r.stdout, r.stderr)
    assert "cannot reach the model API" in r.stderr and "doctor" in r.stderr, r.stderr
    assert "busy" not in r.stderr
    h.cleanup()

    h = host_factory("refused-and-busy").start()
    fake_model.inject(status=401, count=1000, message="invalid x-api-key")
    r = h.cli("send", "key?", "--wait", "60")
    assert r.returncode == EXIT_ERROR_REPLY and "refused the host's key" in r.stderr, r.stderr
    fake_model.clear()
    fake_model.inject(status=529, count=1000, retry_after=0.01)
    r = h.cli("send", "busy?", "--chat", "busy", "--wait", "60")
    assert r.returncode == EXIT_ERROR_REPLY and "overloaded" in r.stderr, r.stderr
    assert "refused" not in r.stderr and "cannot reach" not in r.stderr
    fake_model.clear()
