"""Logs that stay small: several processes writing the same log through `log.setup`
rotate it once between them (no line lost or doubled, no file much past the limit, no
more copies than kept), and `logs/containers/` loses its old and its excess logs, never
one an agent may still be writing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import clean_env

from nanoclaw import logfiles

WRITER = """
import sys
from pathlib import Path
from nanoclaw import log
from nanoclaw.log import logger
log.setup(sys.argv[1], Path(sys.argv[2]), "INFO", stderr=False,
          rotate_mb=float(sys.argv[3]), keep=int(sys.argv[4]))
for i in range(int(sys.argv[5])):
    logger.info("line {} {} {}", sys.argv[1], i, "x" * 60)
    if i % 50 == 0:
        logger.warning("warning {} {}", sys.argv[1], i)
"""


def _write(logs, procs: int, lines: int, rotate_mb: float, keep: int) -> None:
    ps = [subprocess.Popen([sys.executable, "-c", WRITER, f"w{n}", str(logs), str(rotate_mb),
                            str(keep), str(lines)], env=clean_env()) for n in range(procs)]
    for p in ps:
        assert p.wait(60) == 0


def test_processes_share_one_rotation_and_lose_no_line(tmp_path):
    logs = tmp_path / "logs"
    limit = 16 * 1024
    _write(logs, procs=4, lines=400, rotate_mb=limit / 2**20, keep=100)
    files = sorted(logs.glob("nanoclaw.log*"))
    assert len(files) > 5  # ~200 KB through a 16 KB file: it rotated, and kept each copy
    seen: dict[str, int] = {}
    for f in files:
        # past the limit by at most the line each writer had in flight when it rotated
        assert f.stat().st_size <= limit + 4 * 200, (f, f.stat().st_size)
        for line in f.read_text().splitlines():
            key = line.split(" | ", 3)[3]
            seen[key] = seen.get(key, 0) + 1
    infos = [k for k in seen if k.startswith("line ")]
    assert len(infos) == 4 * 400  # every line, in some file
    assert set(seen.values()) == {1}  # none twice
    names = {f.name for f in files}
    assert {f"nanoclaw.log.{i}" for i in range(1, len(files))} <= names  # .1, .2, … in order


def test_rotation_keeps_only_so_many_copies(tmp_path):
    logs = tmp_path / "logs"
    _write(logs, procs=2, lines=600, rotate_mb=8 * 1024 / 2**20, keep=2)
    names = sorted(f.name for f in logs.glob("nanoclaw.log*"))
    assert names == ["nanoclaw.log", "nanoclaw.log.1", "nanoclaw.log.2"]
    assert (logs / "nanoclaw.error.log").exists()


def test_container_logs_go_when_old_or_too_many(tmp_path):
    root = tmp_path / "logs" / "containers"
    now = time.time()

    def make(session: str, spawn: str, age_days: float, size: int):
        p = root / session / f"{spawn}.log"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * size)
        os.utime(p, (now - age_days * 86400, now - age_days * 86400))
        return p

    ancient = make("s1", "1", 30, 10)
    old_big = make("s2", "1", 5, 600_000)
    newer = make("s2", "2", 1, 300_000)
    live = make("s3", "1", 0, 900_000)  # written just now: never removed
    removed = logfiles.prune_containers(root, 14 * 86400, 1_300_000, now)
    assert set(removed) == {ancient, old_big}
    assert not ancient.parent.exists()  # its empty session folder went too
    assert newer.exists() and live.exists()


def test_tidy_rotates_a_log_past_its_size(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "nanoclaw.log").write_bytes(b"y" * 2048)
    (logs / "nanoclaw.error.log").write_bytes(b"z" * 10)
    done = logfiles.tidy(logs, rotate_mb=1024 / 2**20, keep=3, container_days=14,
                         containers_mb=100)
    assert done == [f"rotated {logs / 'nanoclaw.log'}"]
    assert (logs / "nanoclaw.log.1").read_bytes() == b"y" * 2048
    assert not (logs / "nanoclaw.log").exists()
    assert (logs / "nanoclaw.error.log").exists()


def test_logs_follow_goes_on_in_the_rotated_log(tmp_path):
    from conftest import wait_for

    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "nanoclaw.log"
    log.write_text("before\n")
    out = tmp_path / "follow.out"
    p = subprocess.Popen([sys.executable, "-m", "nanoclaw", "logs", "-f"], cwd=tmp_path,
                         env=clean_env(NANOCLAW_LOGS_DIR=str(logs)), stdout=open(out, "wb"))
    try:
        wait_for(lambda: "before" in out.read_text(), 30, what="the first line")
        with open(log, "a") as f:
            f.write("last of the old file\n")
        logfiles.rotate(log, keep=2)
        log.write_text("first of the new file\n")
        wait_for(lambda: "first of the new file" in out.read_text(), 30, what="the new file")
        assert out.read_text().splitlines() == ["before", "last of the old file",
                                                "first of the new file"]
    finally:
        p.terminate()
        p.wait(10)


def test_the_sweep_worker_applies_the_retention(host_factory):
    from conftest import wait_for

    h = host_factory("tidy", NANOCLAW_CONTAINER_LOG_DAYS="1")
    old = h.base / "logs" / "containers" / "sess-old" / "1.log"
    old.parent.mkdir(parents=True)
    old.write_text("an agent long gone\n")
    week_ago = time.time() - 7 * 86400
    os.utime(old, (week_ago, week_ago))
    h.start()
    wait_for(lambda: not old.exists(), 30, what="the old container log removed")
    assert "removed 1 old container log(s)" in (h.base / "logs" / "nanoclaw.log").read_text()
