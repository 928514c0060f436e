"""The host verbs of `nanoclaw`: run, status, workers, logs, service, image. Each is a
small function; errors are one line (`CliError`)."""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

from nanoclaw import config
from nanoclaw.cli import credentials
from nanoclaw.cli.common import CliError, load_settings, open_store
from nanoclaw.config import Settings
from nanoclaw.util import RUNNER_DIR


def host_pid(settings: Settings) -> int | None:
    """The running host's pid, judged by its lock on the data directory."""
    lock = settings.data_dir / "host.lock"
    if not lock.exists():
        return None
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def cmd_run(args: argparse.Namespace) -> int:
    """Start the host. First of all the umask: everything it and its workers create
    (DB, logs, sockets, sessions) is the host user's alone unless made readable on
    purpose (H4); the re-exec in scrub_environment keeps it."""
    os.umask(0o077)
    from nanoclaw.host import orchestrator

    orchestrator.scrub_environment(sys.argv[1:])
    settings = load_settings()
    # after the re-exec the secrets are no longer in our environment, but passed on
    problem = credentials.missing(settings, {**os.environ, **orchestrator._SECRETS})
    if problem:  # the first thing on the screen, before the workers' lines
        print(credentials.banner(problem), file=sys.stderr, flush=True)
    return orchestrator.run_host(settings)


def cmd_status(args: argparse.Namespace) -> int:
    s = load_settings()
    pid = host_pid(s)
    print(f"host: {'running (pid ' + str(pid) + ')' if pid else 'not running'}")
    print(f"data: {s.data_dir}")
    if not s.db_path.exists():
        print("database: not created yet (start the host once)")
        return 0 if pid else 3
    store = open_store(s)
    _print_workers(store.workers())
    active, running = store.session_counts()
    print(f"sessions: {active} active, {running} with a running agent")
    print(f"sends pending: {store.count_sends('pending')}")
    web = store.get_state("web_url")
    if web and pid:
        print(f"web chat: {web} (token in {s.data_dir / 'web-token'})")
    return 0 if pid else 3


def _print_workers(rows: list[dict]) -> None:
    if not rows:
        print("workers: none recorded")
        return
    print(f"{'WORKER':<18} {'STATE':<9} {'PID':>7} {'RESTARTS':>8}  {'NEXT START':<24} LAST EXIT")
    for w in rows:
        print(f"{w['name']:<18} {w['state']:<9} {w['pid'] or '-':>7} {w['restarts']:>8}  "
              f"{w['next_start_at'] or '-':<24} {w['last_exit'] or '-'}")


def cmd_workers(args: argparse.Namespace) -> int:
    s = load_settings()
    store = open_store(s)
    rows = store.workers()
    if not args.action:
        _print_workers(rows)
        return 0
    names = {w["name"] for w in rows}
    if args.name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise CliError(f"unknown worker {args.name!r} (known: {known})", 2)
    if not host_pid(s):
        raise CliError("no host is running (start it with: make run)")
    store.request_worker(args.name, args.action)
    print(f"{args.action} of {args.name} requested")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    s = load_settings()
    if getattr(args, "tidy", False):
        from nanoclaw import logfiles

        done = logfiles.tidy_settings(s)
        print("\n".join(done) if done else f"nothing to tidy in {s.logs_dir}")
        return 0
    path = s.logs_dir / ("nanoclaw.error.log" if args.errors else "nanoclaw.log")
    if not path.exists():
        raise CliError(f"no log yet at {path}")
    f = open(path, "rb")
    lines = f.readlines()[-args.lines:]
    sys.stdout.write(b"".join(lines).decode(errors="replace"))
    if not args.follow:
        f.close()
        return 0
    try:
        while True:
            chunk = f.readline()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            elif _rotated(path, f):  # the log was rotated: go on in the new file
                f.close()
                f = open(path, "rb")
            else:
                time.sleep(0.3)
    except KeyboardInterrupt:
        return 0
    finally:
        f.close()


def _rotated(path: Path, f) -> bool:
    try:
        return os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False  # not created again yet


def cmd_service(args: argparse.Namespace) -> int:
    unit_dir = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd" / "user"
    unit = unit_dir / "nanoclaw.service"
    if args.action == "uninstall":
        unit.unlink(missing_ok=True)
        print(f"removed {unit}; run: systemctl --user daemon-reload")
        return 0
    root = Path.cwd()
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit.write_text(
        "[Unit]\nDescription=NanoClaw assistant host\nAfter=network-online.target\n\n"
        "[Service]\nType=simple\n"
        f"WorkingDirectory={root}\nExecStart={sys.executable} -m nanoclaw run\n"
        "Restart=always\nRestartSec=5\nKillMode=mixed\nTimeoutStopSec=15\n\n"
        "[Install]\nWantedBy=default.target\n")
    print(f"wrote {unit}")
    if shutil.which("systemctl"):
        print("enable it with: systemctl --user daemon-reload && systemctl --user enable --now"
              " nanoclaw")
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    """Build the agent image with container/build.sh; its progress goes to the terminal."""
    import subprocess

    s = load_settings()
    script = RUNNER_DIR / "build.sh"
    if not script.exists():
        raise CliError(f"no build script at {script}")
    cmd = [str(script), *(["--force"] if args.force else [])]
    code = subprocess.call(cmd, env=config.scrubbed_env({
        "NANOCLAW_IMAGE": s.image, "NANOCLAW_CJK_FONTS": "1" if s.cjk_fonts else "0"}))
    if code:
        raise CliError(f"the image build failed (exit {code}); the reason is printed above")
    return 0
