"""Warm turns with the other tool-loop providers (`--providers`), beside `anthropic`'s.

Why a module of its own: each provider gets its own rig (host and zero-delay fake,
started after the main host has stopped), so its figure is its own: `openai` talks to
`python -m nanoclaw.devtools.fake_openai` through the broker's `openai` upstream, the
same path a real OpenAI-compatible server (Ollama, vLLM, OpenAI) would take.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench.phases import say, summary
from bench.rig import Rig

PROVIDERS = {
    # provider -> (fake module, host environment beyond the fake's URL)
    "openai": ("fake_openai", {"NANOCLAW_PROVIDER": "openai", "NANOCLAW_MODEL": "gpt-fake-1",
                               "OPENAI_API_KEY": "bench-key"}),
}


async def provider_bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One warm-up turn, then `--n` warm turns in one chat; model calls per turn."""
    module, env = PROVIDERS[name]
    rig = Rig(keep=args.keep, env=env, run_id=f"{name}{int(time.time())}")
    out: dict[str, Any] = {"provider": name, "fake": module}
    try:
        url = rig.start_fake(module)
        rig.env["OPENAI_BASE_URL"] = url
        rig.start_host()
        await rig.wait_ready()
        c = await rig.chat("warm")
        await c.send("warm-up")
        await asyncio.to_thread(rig.fake_call, "POST", "/_fake/reset")
        turns = [(await c.send(f"warm {i}"))[1] for i in range(args.n)]
        calls = len(await asyncio.to_thread(rig.fake_call, "GET", "/_fake/requests"))
        out["warm_turn_ms"] = summary(turns)
        out["model_calls_per_warm_turn"] = round(calls / max(1, args.n), 2)
    except Exception as e:  # noqa: BLE001 - reported, the main figures still stand
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        await rig.close_chats()
        out["shutdown"] = rig.close()
    return out


def run_providers(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in [n.strip() for n in args.providers.split(",") if n.strip()]:
        if name not in PROVIDERS:
            out[name] = {"error": f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})"}
            continue
        say(f"{name} provider: warm turns (1 warm-up + {args.n})")
        out[name] = asyncio.run(provider_bench(name, args))
        if "error" in out[name]:
            say(f"{name}: FAILED {out[name]['error']}")
    return out
