"""A full disk: the host's `data/` on a small tmpfs of its own that fills up. The host
keeps running (no worker crash-loops, the orchestrator stays), new input is refused with
one clear line naming the cause and the fix, nothing already stored is lost, and when
space returns it carries on by itself: what was stored is answered, new input taken."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import wait_for

from fakes.hosts import log

SIZE_MB = 24


@pytest.fixture
def small_data(tmp_path):
    data = tmp_path / "full" / "data"
    data.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m,mode=0755", "tmpfs",
                        str(data)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for data/ (needs root): {r.stderr.strip()}")
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def _fill(data) -> None:
    """Take every free byte of data/ (a file of its own, removed to free the space)."""
    fd = os.open(data / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_a_full_disk_refuses_new_input_clearly_and_resumes_when_space_returns(
        host_factory, small_data, fake_model):
    h = host_factory("full", NANOCLAW_RETRY_BASE="0.5")
    assert h.data == small_data
    h.start()
    c = h.client()
    assert c.wait_reply(c.send("before"))["text"] == "echo: before"
    workers = {w["name"]: w["pid"] for w in h.workers()}
    fake_model.inject(delay_ms=3000)  # the agent is thinking when the disk fills up
    during = c.send("during")
    wait_for(lambda: fake_model.requests and "during" in json.dumps(fake_model.requests[-1]),
             30, what="the model asked")
    _fill(small_data)
    time.sleep(4)  # its answer comes while nothing can be written
    r = h.cli("send", "while full", "--wait", "5")
    assert r.returncode != 0
    err = (r.stderr + r.stdout).strip()
    assert len(err.splitlines()) == 1 and "disk is full" in err and "free" in err, err
    assert h.proc.poll() is None  # the host keeps running
    os.unlink(small_data / "filler")  # space returns
    assert c.wait_reply(during, 90)["text"] == "echo: during"  # stored before: not lost
    mid = c.send("after")
    assert c.wait_reply(mid, 60)["text"] == "echo: after"
    rows = h.q("SELECT message_id FROM inbound_events WHERE channel_type='cli'")
    assert len(rows) == 3  # before, during, after: the refused one never half-stored
    assert len(c.replies_to(during)) == 1
    restarted = [n for n, pid in workers.items()
                 if {w["name"]: w["pid"] for w in h.workers()}.get(n) != pid]
    assert restarted == [], restarted  # nothing crash-looped while it was full
    assert "disk is full" in log(h), log(h)[-4000:]
