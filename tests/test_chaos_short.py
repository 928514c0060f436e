"""The short chaos soak (`python -m bench.chaos --short`): 150 messages over 8 chats
against the fake model, process runtime, while a seeded killer sends kill -9 every
~1.5 s to a worker, an agent or the whole host tree (restarted as systemd would).
Nothing may be lost, answered twice or answered with an error notice."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, clean_env


def test_short_chaos_soak_loses_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    r = subprocess.run([sys.executable, "-m", "bench.chaos", "--short", "--out", str(out)],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=280)
    report = r.stdout[-3000:] + r.stderr[-3000:]
    assert out.exists(), report
    res = json.loads(out.read_text())
    assert "error" not in res, res.get("traceback") or res["error"]
    assert res["messages"] == 150, report
    assert res["lost"] == 0, res["examples"]["lost"]
    assert res["answered_twice"] == 0, res["examples"]["answered_twice"]
    assert res["error_answers"] == 0, res["examples"]["error_answers"]
    assert res["unexpected_answers"] == 0, res["examples"]["unexpected_answers"]
    assert res["stray_error_notices"] == 0, res["examples"]["stray_replies"]
    assert res["host_outbox"]["messages_with_two_or_more"] == 0, res["host_outbox"]
    # the killer did its job: every kind of target was hit at least once
    assert all(res["kills"]["by_kind"][k] >= 1 for k in ("worker", "agent", "host")), \
        res["kills"]
    assert res["host_restarts"]["count"] == res["kills"]["by_kind"]["host"]
    assert r.returncode == 0, report
