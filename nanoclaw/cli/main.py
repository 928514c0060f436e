"""`nanoclaw`: the one command. Each verb is a small function; errors are one line on
stderr and a non-zero exit, never a traceback.

The host verbs are in `host.py`, `chat.py` and `doctor.py`; the admin operations are
the registry in `ops.py`, declared in the `ops_*.py` topic modules (`admin.py` loads
them all), and the parser below is built from it."""

from __future__ import annotations

import argparse
import sys

from nanoclaw.cli import admin, agent, channels, chat, doctor, host, setup
from nanoclaw.cli.common import CliError

# importing `agent` installs the approval handler of an agent's `ncl` command, which
# `approvals approve` runs (and which the workers `run` forks from this process inherit)
NCL_APPROVAL = agent.APPROVAL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoclaw", description="A personal Claude assistant host.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    sub.add_parser("run", help="start the host (all workers) in the foreground").set_defaults(
        fn=host.cmd_run)
    sub.add_parser("status", help="is the host running; workers and sessions").set_defaults(
        fn=host.cmd_status)
    w = sub.add_parser("workers", help="list workers, or restart|stop|start NAME")
    w.add_argument("action", nargs="?", choices=["restart", "stop", "start"])
    w.add_argument("name", nargs="?")
    w.set_defaults(fn=host.cmd_workers)
    snd = sub.add_parser("send", help="send TEXT to the agent; print its reply with --wait")
    snd.add_argument("text")
    snd.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                     help="how long to wait for the reply (0: do not wait); default 60")
    snd.add_argument("--chat", default="local", help="terminal conversation name")
    snd.set_defaults(fn=chat.cmd_send)
    c = sub.add_parser("chat", help="talk to the agent interactively")
    c.add_argument("--chat", default="local", help="terminal conversation name")
    c.set_defaults(fn=chat.cmd_chat)
    lg = sub.add_parser("logs", help="show the host log")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("--errors", action="store_true", help="the warnings-and-errors log")
    lg.add_argument("--tidy", action="store_true", help="rotate the logs past their size and"
                    " prune old container logs now (as the sweep worker does hourly)")
    lg.set_defaults(fn=host.cmd_logs)
    sub.add_parser("doctor", help="check the installation, the runtime and the warm pool; say"
                   " what is wrong").set_defaults(fn=doctor.cmd_doctor)
    setup.add_parser(sub)
    channels.add_parser(sub)
    admin.add_parsers(sub)
    im = sub.add_parser("image", help="build the agent image (container/build.sh)")
    im.add_argument("action", choices=["build"])
    im.add_argument("--force", action="store_true", help="rebuild even when up to date")
    im.set_defaults(fn=host.cmd_image)
    sv = sub.add_parser("service", help="install|uninstall a systemd user unit")
    sv.add_argument("action", choices=["install", "uninstall"])
    sv.set_defaults(fn=host.cmd_service)
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
