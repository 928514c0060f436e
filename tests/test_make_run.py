"""The README's first command: `make run` sets up and starts the host on embedded
defaults, and `nanoclaw send hello --wait 30` prints the model's answer."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, agent_pids, wait_for


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_then_send(tmp_path, fake_model):
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, "VENV": str(venv), "ANTHROPIC_BASE_URL": fake_model.url,
           "ANTHROPIC_API_KEY": "sk-test", "NANOCLAW_DATA_DIR": str(tmp_path / "data"),
           "NANOCLAW_LOGS_DIR": str(tmp_path / "logs"),
           "NANOCLAW_GROUPS_DIR": str(tmp_path / "groups")}
    for k in ("NANOCLAW_RUNTIME", "NANOCLAW_PROVIDER"):  # embedded defaults only
        env.pop(k, None)
    out = open(tmp_path / "make.out", "wb")
    proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "data" / "cli.sock").exists(), 120, what="host socket")
        r = subprocess.run([str(venv / "bin" / "nanoclaw"), "send", "hello", "--wait", "30"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr + (tmp_path / "make.out").read_text()
        assert r.stdout.strip() == "echo: hello"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    assert not agent_pids(tmp_path / "data")
