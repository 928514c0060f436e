"""Pre-task scripts (reference §11): a task may carry a bash script that decides whether
the agent is woken at all. It runs in the group folder with a 30 s timeout and 1 MiB of
output; its last stdout line must be JSON `{"wakeAgent": bool, "data"?: …}`. False, a
failure or unreadable output means the task completes without a model call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

TIMEOUT_S = 30
MAX_OUTPUT = 1024 * 1024


@dataclass(frozen=True)
class ScriptResult:
    wake: bool
    data: Any = None
    error: str | None = None


def run_script(script: str, cwd: str, should_stop: Callable[[], bool] = lambda: False,
               timeout_s: float = TIMEOUT_S) -> ScriptResult:
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
        while True:
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                if should_stop() or time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return ScriptResult(False, error=f"timed out after {timeout_s:g} s"
                                        if not should_stop() else "stopped")
        out.seek(0)
        stdout = out.read(MAX_OUTPUT + 1)
        err.seek(0)
        stderr = err.read(2000).decode("utf-8", "replace").strip()
    if len(stdout) > MAX_OUTPUT:
        return ScriptResult(False, error="output over 1 MiB")
    if proc.returncode != 0:
        return ScriptResult(False, error=f"exit code {proc.returncode}: {stderr[:500]}")
    lines = [ln for ln in stdout.decode("utf-8", "replace").splitlines() if ln.strip()]
    try:
        verdict = json.loads(lines[-1]) if lines else None
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("wakeAgent"), bool):
        return ScriptResult(False, error='the last output line is not {"wakeAgent": …} JSON')
    return ScriptResult(verdict["wakeAgent"], verdict.get("data"))
