"""`nanoclaw`: the one command. Each verb is a small function; errors are one line on
stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from nanoclaw import config
from nanoclaw.cli.common import CliError, load_settings, open_store
from nanoclaw.config import Settings, SettingsError

# the verbs' shared error and openers live in `cli_common` (no cycle with the verbs);
# the private names stay for this module's callers
_settings, _store = load_settings, open_store


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


# ---- verbs ------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """Start the host. First of all the umask: everything it and its workers create
    (DB, logs, sockets, sessions) is the host user's alone unless made readable on
    purpose (H4); the re-exec in scrub_environment keeps it."""
    os.umask(0o077)
    from nanoclaw.host.orchestrator import run_host, scrub_environment

    scrub_environment(sys.argv[1:])
    return run_host(_settings())


def cmd_status(args: argparse.Namespace) -> int:
    s = _settings()
    pid = host_pid(s)
    print(f"host: {'running (pid ' + str(pid) + ')' if pid else 'not running'}")
    print(f"data: {s.data_dir}")
    if not s.db_path.exists():
        print("database: not created yet (start the host once)")
        return 0 if pid else 3
    store = _store(s)
    _print_workers(store.workers())
    n = store.q1("SELECT COUNT(*) AS n, SUM(container_status='running') AS r FROM sessions"
                 " WHERE status='active'")
    print(f"sessions: {n['n']} active, {n['r'] or 0} with a running agent")
    pending = store.q1("SELECT COUNT(*) AS n FROM channel_outbox WHERE status='pending'")
    print(f"sends pending: {pending['n']}")
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
    s = _settings()
    store = _store(s)
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


def _connect(settings: Settings) -> socket.socket:
    path = str(settings.cli_socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise CliError(f"no host is running (no socket at {path}); start it with: make run")
    except ConnectionRefusedError:
        raise CliError(f"no host is answering on {path}; start it with: make run")
    except PermissionError:
        raise CliError(f"not allowed to use {path} (it belongs to the host's user)")
    return sock


class Lines:
    """Read JSON frames from a socket with a deadline."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def next(self, deadline: float | None) -> dict | None:
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.time()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                raise ConnectionError("the host closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def cmd_send(args: argparse.Namespace) -> int:
    """Send, then wait for the reply. Delivery to the host is at least once: on a lost
    connection or a missing ack the same id is sent again, which the host ignores if it
    already stored it; replies are matched by that id."""
    from nanoclaw.util import new_id

    s = _settings()
    mid = new_id("cli")
    frame = (json.dumps({"type": "message", "text": args.text, "chat": args.chat, "id": mid})
             + "\n").encode()
    end = time.time() + max(args.wait, 10.0)
    acked, tries = False, 0
    while True:
        tries += 1
        try:
            try:
                sock = _connect(s)
            except CliError:
                if tries == 1:
                    raise  # no host at all: say so at once
                raise ConnectionError("host not answering yet") from None
            sock.sendall(frame)
            lines = Lines(sock)
            while True:
                f = lines.next(min(end, time.time() + 3.0) if not acked else end)
                if f is None:
                    if acked:
                        raise CliError(f"no reply within {args.wait:g}s (the message is stored;"
                                       " see `nanoclaw status` and logs/nanoclaw.error.log)")
                    break  # no ack yet: send again
                if f.get("type") == "error":
                    raise CliError(f"refused: {f.get('error')}", 2)
                if f.get("type") == "ack" and f.get("id") == mid:
                    acked = True
                    if args.wait <= 0:
                        print(f"sent ({mid})")
                        return 0
                elif f.get("type") == "reply" and f.get("in_reply_to") == mid:
                    print(f.get("text", ""))
                    return 0
        except OSError:
            pass  # connection lost: reconnect and send the same id again
        if time.time() >= end:
            raise CliError("the host did not acknowledge the message")
        time.sleep(0.2)


def cmd_chat(args: argparse.Namespace) -> int:
    import threading

    s = _settings()
    sock = _connect(s)
    sock.sendall((json.dumps({"type": "subscribe", "chat": args.chat}) + "\n").encode())
    seen: set[str] = set()
    lines = Lines(sock)

    def reader() -> None:
        try:
            while True:
                f = lines.next(None)
                if f is None:
                    continue
                if f.get("type") == "reply" and f.get("id") not in seen:
                    seen.add(f["id"])
                    print(f"\r{f.get('text', '')}\n> ", end="", flush=True)
                elif f.get("type") == "error":
                    print(f"\rerror: {f.get('error')}\n> ", end="", flush=True)
        except (CliError, OSError, ValueError):
            print("\r(the host closed the connection)")
            os._exit(1)

    threading.Thread(target=reader, daemon=True).start()
    print(f"chatting on '{args.chat}' (Ctrl-D to quit)")
    try:
        while True:
            text = input("> ")
            if text.strip():
                sock.sendall((json.dumps({"type": "message", "text": text, "chat": args.chat})
                              + "\n").encode())
    except (EOFError, KeyboardInterrupt):
        print()
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    s = _settings()
    path = s.logs_dir / ("nanoclaw.error.log" if args.errors else "nanoclaw.log")
    if not path.exists():
        raise CliError(f"no log yet at {path}")
    with open(path, "rb") as f:
        lines = f.readlines()[-args.lines:]
        sys.stdout.write(b"".join(lines).decode(errors="replace"))
        if not args.follow:
            return 0
        try:
            while True:
                chunk = f.readline()
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.3)
        except KeyboardInterrupt:
            return 0


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


def runtime_report(settings: Settings) -> list[tuple[bool | None, str]]:
    """Which runtime agents get here and why not the others; whether the warm pool is in
    effect. (ok, line) pairs; ok None is a plain note."""
    from nanoclaw.log import logger
    from nanoclaw.runtime import AUTO_ORDER, RUNTIMES, WHY_NOT, mountns

    logger.disable("nanoclaw.runtime")  # the probes' debug lines are not for this screen
    try:
        usable = {n: bool(RUNTIMES[n].available(settings)) for n in AUTO_ORDER}
    finally:
        logger.enable("nanoclaw.runtime")
    auto = next((n for n in AUTO_ORDER if usable[n]), "process")
    out: list[tuple[bool | None, str]] = []
    for n, ok in usable.items():
        if not ok:
            out.append((None, f"runtime {n} is not usable: " + WHY_NOT[n].format(
                image=settings.image)))
    chosen = settings.runtime if settings.runtime != "auto" else auto
    if settings.runtime == "auto":
        out.append((auto != "process", f"runtime auto picks {auto} here" + (
            ": agents run WITHOUT isolation (development only)" if auto == "process" else "")))
    elif settings.runtime != "process" and not usable[settings.runtime]:
        out.append((False, f"runtime {settings.runtime} (NANOCLAW_RUNTIME) cannot run here;"
                    f" auto would pick {auto}"))
        return out
    else:
        out.append((True, f"runtime {chosen} (NANOCLAW_RUNTIME; auto would pick {auto})" + (
            ": agents run WITHOUT isolation" if chosen == "process" else "")))
    if chosen == "docker":
        out.append(image_freshness(settings))
    n = settings.warm_pool
    if n <= 0:
        out.append((None, "warm pool off (NANOCLAW_WARM_POOL=0): every agent starts cold"))
    elif chosen == "docker":
        out.append((None, "warm pool not used by docker (a container's mounts are fixed when"
                    " it is created)"))
    elif chosen == "bwrap" and not mountns.can_mount():
        out.append((None, "warm pool off: bwrap hands a session to a waiting sandbox only"
                    " when the host runs as root; every agent starts cold"))
    else:
        out.append((True, f"warm pool on: {n} {chosen} agent(s) started ahead"
                    " (NANOCLAW_WARM_POOL)"))
    return out


def image_freshness(settings: Settings) -> tuple[bool | None, str]:
    """Whether the agent image was built from the recipe in container/ as it is now."""
    from nanoclaw.lifecycle.containers import RUNNER_DIR
    from nanoclaw.runtime import docker as docker_rt
    from nanoclaw.runtime import sandbox

    want = sandbox.image_hash(RUNNER_DIR)
    try:
        labels = docker_rt.client(timeout=5).images.get(settings.image).labels or {}
    except Exception as e:  # noqa: BLE001 - the report says what it could not see
        return None, f"image {settings.image}: cannot inspect it ({e})"
    have = labels.get("nanoclaw.image-hash")
    if have == want:
        return True, f"image {settings.image} is up to date ({want})"
    return None, (f"image {settings.image} was built from another recipe ({have or 'unknown'},"
                  f" container/ is now {want}): run make image")


def cmd_doctor(args: argparse.Namespace) -> int:
    problems = 0

    def say(ok: bool, text: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok ' if ok else 'BAD'}  {text}")

    try:
        s = config.load()
        say(True, "settings are valid")
    except SettingsError as e:
        say(False, str(e))
        return 1
    problem = s.agent_uid_problem()
    say(problem is None, problem or (f"agent uid {s.agent_uid} belongs to no local account"
                                     if os.geteuid() == 0 else
                                     "sandboxes run as this user (the host is not root)"))
    for ok, line in runtime_report(s):
        if ok is None:
            print(f"{'-':<3}  {line}")
        else:
            say(ok, line)
    pid = host_pid(s)
    say(bool(pid), f"host {'running, pid ' + str(pid) if pid else 'is not running (make run)'}")
    if s.db_path.exists():
        try:
            store = _store(s)
            say(True, f"database {s.db_path} opens and passes its check")
            bad = [w for w in store.workers() if w["state"] in ("BACKOFF", "FATAL")]
            for w in bad:
                say(False, f"worker {w['name']} is {w['state']} (last exit: {w['last_exit']});"
                    " see logs/nanoclaw.error.log")
            failed = store.q1("SELECT COUNT(*) AS n FROM channel_outbox WHERE status='failed'")
            say(failed["n"] == 0, f"{failed['n']} send(s) failed for good")
        except CliError as e:
            say(False, str(e))
    else:
        say(False, f"no database yet at {s.db_path} (start the host once)")
    say(s.cli_socket.exists() or not pid, f"terminal socket {s.cli_socket}")
    return 1 if problems else 0


def cmd_image(args: argparse.Namespace) -> int:
    """Build the agent image with container/build.sh; its progress goes to the terminal."""
    import subprocess

    s = _settings()
    script = Path(__file__).resolve().parent.parent / "container" / "build.sh"
    if not script.exists():
        raise CliError(f"no build script at {script}")
    cmd = [str(script), *(["--force"] if args.force else [])]
    code = subprocess.call(cmd, env=config.scrubbed_env({"NANOCLAW_IMAGE": s.image}))
    if code:
        raise CliError(f"the image build failed (exit {code}); the reason is printed above")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoclaw", description="A personal Claude assistant host.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    sub.add_parser("run", help="start the host (all workers) in the foreground").set_defaults(
        fn=cmd_run)
    sub.add_parser("status", help="is the host running; workers and sessions").set_defaults(
        fn=cmd_status)
    w = sub.add_parser("workers", help="list workers, or restart|stop|start NAME")
    w.add_argument("action", nargs="?", choices=["restart", "stop", "start"])
    w.add_argument("name", nargs="?")
    w.set_defaults(fn=cmd_workers)
    snd = sub.add_parser("send", help="send TEXT to the agent; print its reply with --wait")
    snd.add_argument("text")
    snd.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                     help="how long to wait for the reply (0: do not wait); default 60")
    snd.add_argument("--chat", default="local", help="terminal conversation name")
    snd.set_defaults(fn=cmd_send)
    c = sub.add_parser("chat", help="talk to the agent interactively")
    c.add_argument("--chat", default="local", help="terminal conversation name")
    c.set_defaults(fn=cmd_chat)
    lg = sub.add_parser("logs", help="show the host log")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("--errors", action="store_true", help="the warnings-and-errors log")
    lg.set_defaults(fn=cmd_logs)
    sub.add_parser("doctor", help="check the installation, the runtime and the warm pool; say"
                   " what is wrong").set_defaults(
        fn=cmd_doctor)
    # agent_cli: the approval handler of an agent's `ncl` command, for `approvals approve`
    # (and for the workers `run` forks from this process)
    from nanoclaw.cli import admin
    from nanoclaw.cli import agent as agent_cli  # noqa: F401
    from nanoclaw.cli import limits as admin_limits

    admin.add_parsers(sub)
    admin_limits.add_parsers(sub)
    im = sub.add_parser("image", help="build the agent image (container/build.sh)")
    im.add_argument("action", choices=["build"])
    im.add_argument("--force", action="store_true", help="rebuild even when up to date")
    im.set_defaults(fn=cmd_image)
    sv = sub.add_parser("service", help="install|uninstall a systemd user unit")
    sv.add_argument("action", choices=["install", "uninstall"])
    sv.set_defaults(fn=cmd_service)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "workers" and args.action and not args.name:
        parser.error(f"workers {args.action} needs a worker NAME")
    try:
        return args.fn(args)
    except CliError as e:
        print(f"nanoclaw: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
