"""An agent killed mid-write leaves a hot journal in outbound.db. In a sandbox the
journal is a bind-mounted file, which SQLite's usual rollback (it unlinks the journal)
cannot remove, so every later start of the runner failed with "disk I/O error" and the
session's pending message waited for ever (found by `make chaos --runtime bwrap`). The
runner now rolls back a copy and writes it back in place. Here the bind mount is real:
a private mount namespace binds the journal onto itself, as bwrap and docker do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from test_outbound_recovery import cut_write_short

CHECK = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from agent_runner import db
    conn = db._connect(sys.argv[1], readonly=False)
    print(sorted(r[0] for r in conn.execute("SELECT id FROM messages_out")))
""")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="a bind mount in a private mount namespace needs root and unshare")
def test_the_runner_recovers_a_write_cut_short_under_a_bind_mounted_journal(tmp_path):
    paths = cut_write_short(tmp_path / "s")
    journal = paths.outbound + "-journal"
    script = (f'mount --bind "{journal}" "{journal}" && '
              f'"{sys.executable}" -c \'{CHECK}\' "{paths.outbound}" "{ROOT / "container"}"')
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['kept']"  # rolled back: the half-written rows are gone
    assert os.path.getsize(journal) == 0  # no longer hot
