"""Measure the host: `python -m bench.run [--quick] [--n N] [--idle-seconds S] ...`.

Starts the fake model (`python -m nanoclaw.devtools.fake_model`, its own process, zero
delay) and a real host (`nanoclaw run`, `NANOCLAW_RUNTIME=process`, provider `anthropic`,
everything in a temp dir), runs every phase of `bench.phases.PHASES` against it, then the
sandbox runtimes (`bench.sandboxes`) and the other providers (`bench.providers`: `openai`
against the fake OpenAI-compatible server), and reports on stdout as a table and in
`bench/results.json`. Why this module: the options and the order of things; what each
phase measures is in `bench/phases.py`. The host and the fake are always stopped
(SIGTERM, then SIGKILL), also on errors and Ctrl-C; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import platform
import signal
import traceback
from pathlib import Path
from typing import Any

from bench.phases import PHASES
from bench.procfs import CLK_TCK
from bench.providers import run_providers
from bench.report import publish
from bench.rig import Rig, stop
from bench.sandboxes import run_sandboxes

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="short smoke run (n=10, 3 cold, 5 chats x 5, idle 3 s)")
    p.add_argument("--n", type=int, default=None, help="warm turns after warm-up (50)")
    p.add_argument("--cold", type=int, default=None, help="fresh chats for cold turns (5)")
    p.add_argument("--spaced", type=int, default=None,
                   help="warm turns sent after a pause, when polls have backed off (10)")
    p.add_argument("--gap", type=float, default=None, help="the pause before each (3 s)")
    p.add_argument("--chats", type=int, default=None, help="throughput chats (20)")
    p.add_argument("--messages", type=int, default=None, help="messages per throughput chat (20)")
    p.add_argument("--idle-seconds", type=float, default=None, help="idle CPU window (30)")
    p.add_argument("--settle", type=float, default=None,
                   help="pause before the idle window, so polls back off (3)")
    p.add_argument("--cold-gap", type=float, default=1.0,
                   help="seconds between fresh chats in the cold turns (1)")
    p.add_argument("--sandboxes", default="auto",
                   help="cold turns in sandbox runtimes too: auto (those that run here),"
                        " none, or a list like bwrap,docker")
    p.add_argument("--providers", default="openai",
                   help="warm turns with other providers too, each against its own"
                        " zero-delay fake, beside anthropic's: openai, or none")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument("--compare", type=Path, default=None, metavar="PATH",
                   help="results to compare with (default: the previous --out file,"
                        " read before it is overwritten)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, dbs)")
    a = p.parse_args(argv)
    defaults = (dict(n=10, cold=3, spaced=3, gap=2.5, chats=5, messages=5, idle_seconds=3.0,
                     settle=1.0) if a.quick
                else dict(n=50, cold=5, spaced=10, gap=3.0, chats=20, messages=20,
                          idle_seconds=30.0, settle=3.0))
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if (a.n < 1 or a.cold < 0 or a.spaced < 0 or a.gap < 0 or a.chats < 1 or a.messages < 1
            or a.idle_seconds <= 0):
        p.error("counts must be positive")
    return a


async def run_phases(rig: Rig, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Every phase in order, each adding its keys to `results` as it finishes."""
    try:
        for phase in PHASES:
            results.update(await phase(rig, args))
    finally:
        await rig.close_chats()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    results: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "clk_tck": CLK_TCK},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "setup": {"runtime": "process", "provider": "anthropic", "fake_delay_ms": 0,
                  "client": "one persistent cli.sock connection per chat"},
    }
    rig = Rig(keep=args.keep)
    status = 0
    print(f"nanoclaw bench ({'quick' if args.quick else 'full'}), work dir {rig.tmp}", flush=True)
    try:
        rig.start_fake()
        asyncio.run(run_phases(rig, args, results))
    except KeyboardInterrupt:
        results["error"] = "interrupted"
        status = 130
    except Exception as e:  # noqa: BLE001 - report whatever broke, after cleaning up
        results["error"] = f"{type(e).__name__}: {e}"
        results["traceback"] = traceback.format_exc()
        status = 1
    finally:
        errors = rig.error_log_lines()
        try:
            results["shutdown"] = rig.close()
        except KeyboardInterrupt:
            stop(rig.host, 2)
            stop(rig.fake, 2)
            status = 130
    results["host_error_log"] = errors[-20:]
    results["host_error_log_lines"] = len(errors)
    if status == 0 and args.sandboxes != "none":
        results["sandboxes"] = run_sandboxes(args)
    if status == 0 and args.providers != "none":
        results["providers"] = run_providers(args)
    if not publish(results, errors, args.out, args.compare):
        status = status or 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
