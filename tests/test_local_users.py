"""Another local user gets nothing of the host's (security review H4): a real host runs
as root in a world-traversable directory, and `nobody` (neither root nor the agent uid)
tries to read the central DB, a session's inbound.db and the log, to list `data/`, and
to use the web API without the token. A control file beside `data/` that nobody CAN
read shows that the refusals come from our permissions, not from the test's setup.
The web token is printed on the terminal, never written under `logs/`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import Host, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to start a second local user (nobody)")

NOBODY = 65534


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *argv], capture_output=True, text=True,
                          timeout=30, cwd="/")


@pytest.fixture
def public_base():
    """A scratch directory every user can traverse (tmp_path's parents are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="nanoclaw-local-users-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def old_install_host(public_base, fake_model):
    """A host started over `data/` and `logs/` left world-readable by an older version,
    with the permissive umask such a shell would have."""
    for d in ("data", "logs"):
        (public_base / d).mkdir(mode=0o755)
        (public_base / d).chmod(0o755)
    old = public_base / "logs" / "nanoclaw.log"
    old.write_text("an old line\n")
    old.chmod(0o644)
    umask = os.umask(0o022)
    h = Host(public_base, fake_model.url)
    try:
        h.start()
    finally:
        os.umask(umask)
    yield h
    h.cleanup()


def test_another_local_user_reads_nothing_and_the_token_stays_off_the_logs(old_install_host):
    h = old_install_host
    base, data, logs = h.base, h.data, h.base / "logs"
    control = base / "control.txt"
    control.write_text("readable by all\n")
    control.chmod(0o644)

    c = h.client()
    c.send("hello from the owner")
    inbound = wait_for(lambda: next(iter((data / "sessions").rglob("inbound.db")), None)
                       if (data / "sessions").exists() else None, 30, what="a session inbound.db")
    url = wait_for(lambda: h.q("SELECT value FROM host_state WHERE key='web_url'"), 30,
                   what="web chat address")[0]["value"]
    token = (data / "web-token").read_text().strip()
    wait_for(lambda: token in h.output(), 30, what="the web address on the terminal")

    # the test can fail: nobody reads what is not ours to protect
    r = as_nobody("cat", str(control))
    assert r.returncode == 0 and r.stdout == "readable by all\n", r.stderr

    assert oct(data.stat().st_mode & 0o777) == oct(logs.stat().st_mode & 0o777) == "0o700"
    for new in (data / "nanoclaw.db", logs / "nanoclaw.error.log"):  # made by this run
        assert new.stat().st_mode & 0o077 == 0, new  # the umask, not only the dirs
    for path in (data / "nanoclaw.db", inbound, data / "web-token", logs / "nanoclaw.log",
                 logs / "nanoclaw.error.log"):
        assert path.exists(), path
        r = as_nobody("cat", str(path))
        assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r)
    r = as_nobody("ls", str(data))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r

    # the web API without the token: refused; with it (the owner) it answers
    probe = ("import sys, urllib.request, urllib.error\n"
             "req = urllib.request.Request(sys.argv[1] + 'api/send', method='POST',"
             " data=b'{\"text\": \"hi\"}', headers={'Content-Type': 'application/json'})\n"
             "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
             "except urllib.error.HTTPError as e:\n    print(e.code)\n")
    r = as_nobody("/usr/bin/python3", "-c", probe, url)
    assert r.stdout.strip() == "401", r
    import urllib.request

    req = urllib.request.Request(url + "api/chats", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200

    # the token: on the terminal only
    for f in logs.rglob("*"):
        if f.is_file():
            assert token not in f.read_text(errors="replace"), f
    assert "web chat listening on" in (logs / "nanoclaw.log").read_text()
