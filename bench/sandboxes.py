"""Cold turns per sandbox runtime (`--sandboxes`), each on a host and a fake of its own.

Why a module of its own: unlike the phases in `phases.py`, which share one host, each
runtime here gets its own rig (started after the main host has stopped), so the
per-spawn overhead of bwrap or docker is measured alone: cold p50 - warm p50. bwrap is
measured with and without its warm pool.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench.phases import cold_turns, say, summary
from bench.rig import Rig


def sandbox_runtimes() -> dict[str, str]:
    """Sandbox runtime name -> why it is skipped ("" when it can run here)."""
    from nanoclaw.config import Settings
    from nanoclaw.log import logger
    from nanoclaw.runtime import RUNTIMES, WHY_NOT

    logger.disable("nanoclaw")  # the probes' debug lines are not the bench's output
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    out = {}
    for name in ("bwrap", "docker"):
        try:
            ok = RUNTIMES[name].available(settings)
        except Exception:  # noqa: BLE001
            ok = False
        out[name] = "" if ok else WHY_NOT[name].format(image=settings.image)
    return out


async def sandbox_bench(runtime: str, args: argparse.Namespace, pool: int) -> dict[str, Any]:
    """Cold turns in one sandbox runtime (own host, own fake), then warm turns in the last
    chat: per-spawn overhead is the cold p50 minus the warm p50."""
    rig = Rig(keep=args.keep, runtime=runtime, env={"NANOCLAW_WARM_POOL": str(pool)},
              run_id=f"{runtime}{int(time.time())}")
    out: dict[str, Any] = {"runtime": runtime, "warm_pool": pool}
    try:
        rig.start_fake()
        rig.start_host()
        await rig.wait_ready()
        await asyncio.sleep(2.0)  # the pool fills; nothing else is running
        out["cold_turn_ms"] = await cold_turns(rig, args.cold, args.cold_gap, "cold")
        last = list(rig.chats.values())[-1]
        warm = [(await last.send(f"warm {i}"))[1] for i in range(10)]
        out["warm_turn_ms"] = summary(warm)
        c50, w50 = out["cold_turn_ms"]["p50"], out["warm_turn_ms"]["p50"]
        out["spawn_overhead_ms"] = round(c50 - w50, 1) if c50 and w50 else None
    except Exception as e:  # noqa: BLE001 - reported, the main figures still stand
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        await rig.close_chats()
        out["shutdown"] = rig.close()
    return out


def run_sandboxes(args: argparse.Namespace) -> dict[str, Any]:
    """The cold-turn section for each sandbox runtime (bwrap also without its pool)."""
    can = sandbox_runtimes()
    wanted = list(can) if args.sandboxes == "auto" else [
        n.strip() for n in args.sandboxes.split(",") if n.strip()]
    out: dict[str, Any] = {}
    for name in wanted:
        if name not in can:
            out[name] = {"error": f"unknown runtime {name!r}"}
            continue
        if can[name]:
            say(f"{name}: skipped ({can[name]})")
            out[name] = {"skipped": can[name]}
            continue
        runs = [(name, 1)] + ([(f"{name}-nopool", 0)] if name == "bwrap" else [])
        for label, pool in runs:
            say(f"{label}: cold turns ({args.cold} fresh chats, {args.cold_gap:g} s apart),"
                " then 10 warm")
            out[label] = asyncio.run(sandbox_bench(name, args, pool))
            if "error" in out[label]:
                say(f"{label}: FAILED {out[label]['error']}")
    return out
