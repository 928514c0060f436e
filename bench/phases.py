"""The phases of a bench run against one host, in run order (`PHASES`).

Why a module of its own: each phase is `async def phase(rig, args) -> dict` and returns
the top-level keys it adds to the results (bench/results.json); `run` calls them in
order and merges what they return. What crosses phases (the chats, the host) lives on
the rig. The phases:

- fake_round_trip: the fake's own round trip (raw HTTP POST /v1/messages, keep-alive
  and fresh connection): what the fake costs,
- start: host start to ready (process start -> socket answering a frame), its workers
  and their PSS,
- cold: cold turns (a fresh chat's first message: includes starting its agent, or
  handing the session to the warm pool's spare; fresh chats `--cold-gap` s apart),
- warm: warm turns p50/p95/p99 (one chat, one warm-up, then `--n` back-to-back;
  send -> reply frame) and model calls per turn,
- stages: those warm turns stage by stage (channel, router, agent claim, model, reply
  row, delivery, channel), from the rows the host wrote for them (`bench.breakdown`),
- spaced: warm turns after a `--gap` pause (every poller in the path has backed off to
  its slow interval, as with a human typing),
- throughput: `--chats` new chats start at once (their first replies: the
  concurrent-start figure), then each sends `--messages` back-to-back; CPU per
  process while they run,
- idle: CPU over `--idle-seconds` with every agent up and idle, host (all workers) and
  agents separately, in percent of one core, from /proc/<pid>/stat,
- memory: PSS (/proc/<pid>/smaps_rollup) of the host and its workers, of each live
  agent (its whole subtree; mean, p50, max, and agents per GB = 1024 / mean), and of
  the spares (the warm pool's, or a zygote),
- client: what the client saw (stray or mismatched replies, error frames).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import time
from typing import Any

from bench import BenchError, breakdown, procfs
from bench.rig import Rig


def pct(values: list[float], p: float) -> float | None:
    """Percentile with linear interpolation between closest ranks."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(ms: list[float]) -> dict[str, Any]:
    if not ms:
        return {"count": 0}
    return {"count": len(ms), "min": min(ms), "p50": pct(ms, 50), "p95": pct(ms, 95),
            "p99": pct(ms, 99), "max": max(ms), "mean": sum(ms) / len(ms)}


def say(msg: str) -> None:
    print(f"  .. {msg}", flush=True)


def _fake_rtt(url: str, n: int) -> dict[str, Any]:
    """Raw POST /v1/messages (streaming, like the agent) to the fake."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "claude-fake-1", "max_tokens": 256, "stream": True,
                       "messages": [{"role": "user", "content": "ping"}]}).encode()
    headers = {"Content-Type": "application/json", "x-api-key": "bench-key",
               "anthropic-version": "2023-06-01"}

    def once(conn: http.client.HTTPConnection) -> float:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/messages", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        dt = (time.perf_counter() - t0) * 1000
        if resp.status != 200 or b"message_stop" not in data:
            raise BenchError(f"fake answered {resp.status}: {data[:200]!r}")
        return dt

    keep = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        once(keep)  # warm-up
        keepalive = [once(keep) for _ in range(n)]
    finally:
        keep.close()
    fresh = []
    for _ in range(max(5, n // 2)):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            fresh.append(once(conn))
        finally:
            conn.close()
    return {"keepalive_ms": summary(keepalive), "fresh_connection_ms": summary(fresh)}


async def cold_turns(rig: Rig, n: int, gap: float, prefix: str) -> dict[str, Any]:
    """n fresh chats, one after another, `gap` seconds apart (the time a warm pool has to
    refill, as between real people starting conversations)."""
    cold = []
    for i in range(n):
        if i:
            await asyncio.sleep(gap)
        c = await rig.chat(f"{prefix}{i}")
        cold.append((await c.send(f"{prefix} hello {i}"))[1])
    out = summary(cold)
    out["values"] = [round(x, 1) for x in cold]
    out["gap_s"] = gap
    return out


async def fake_round_trip(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    say("fake model round trip")
    return {"fake_round_trip": await asyncio.to_thread(_fake_rtt, rig.fake_url, 50)}


async def start(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    say("starting host")
    rig.start_host()
    out: dict[str, Any] = {"start": await rig.wait_ready()}
    await asyncio.sleep(1.0)
    host, _ = rig.tree()
    out["host_workers"] = sorted(host.values())
    out["memory_at_start"] = procfs.memory(host)
    return out


async def cold(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    say(f"cold turns ({args.cold} fresh chats, {args.cold_gap:g} s apart)")
    return {"cold_turn_ms": await cold_turns(rig, args.cold, args.cold_gap, "cold")}


async def warm(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    say(f"warm turns (1 warm-up + {args.n})")
    c = await rig.chat("warm")
    await c.send("warm-up")
    await asyncio.to_thread(rig.fake_call, "POST", "/_fake/reset")
    acks, turns, sends = [], [], []
    for i in range(args.n):
        a, r = await c.send(f"warm {i}")
        acks.append(a)
        turns.append(r)
        sends.append(c.last)
    requests = await asyncio.to_thread(rig.fake_call, "GET", "/_fake/requests")
    rig.notes["warm_sends"], rig.notes["warm_requests"] = sends, requests
    out = {"warm_turn_ms": summary(turns), "warm_ack_ms": summary(acks),
           "model_calls_per_warm_turn": round(len(requests) / max(1, args.n), 2)}
    out["warm_turn_ms"]["values"] = [round(x, 2) for x in turns]
    return out


async def stages(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    """The warm turns of `warm`, stage by stage (`bench.breakdown`), from the rows the
    host wrote for them, read read-only now that they are over."""
    say("warm turn by stage (reading the host's rows)")
    try:
        bd = await asyncio.to_thread(
            breakdown.breakdown, rig.data, rig.tmp / "logs", rig.notes.get("warm_sends", []),
            rig.notes.get("warm_requests", []))
    except Exception as e:  # noqa: BLE001 - a breakdown that fails must not fail the bench
        bd = {"turns": 0, "error": f"{type(e).__name__}: {e}"}
    return {"warm_turn_stages": bd}


async def spaced(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    """The chat of `warm`, `--gap` s between messages."""
    say(f"spaced warm turns ({args.spaced} turns, {args.gap:g} s apart: polls backed off)")
    c = rig.chats["warm"]
    turns = []
    for i in range(args.spaced):
        await asyncio.sleep(args.gap)
        turns.append((await c.send(f"spaced {i}"))[1])
    out = summary(turns)
    out["values"] = [round(x, 1) for x in turns]
    out["gap_s"] = args.gap
    return {"spaced_turn_ms": out}


async def throughput(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    say(f"throughput ({args.chats} chats x {args.messages} messages, warm-up first)")
    tp = [await rig.chat(f"tp{i}") for i in range(args.chats)]
    t0 = time.perf_counter()
    first = await asyncio.gather(*(x.send("tp warm-up") for x in tp))
    out: dict[str, Any] = {"concurrent_cold_start": {
        "chats": len(tp), "wall_ms": round((time.perf_counter() - t0) * 1000, 1),
        "turn_ms": summary([r for _, r in first])}}

    async def drive(x: Any) -> list[float]:
        return [(await x.send(f"tp {x.name} {j}"))[1] for j in range(args.messages)]

    await asyncio.to_thread(rig.fake_call, "POST", "/_fake/reset")
    host, agents = rig.tree()
    fake_pid = rig.fake.pid if rig.fake else -1
    cpu0 = procfs.cpu_ticks([*host, *agents, fake_pid, os.getpid()])
    t0 = time.perf_counter()
    per_chat = await asyncio.gather(*(drive(x) for x in tp))
    wall = time.perf_counter() - t0
    cpu1 = procfs.cpu_ticks([*host, *agents, fake_pid, os.getpid()])

    def cores(pids: Any) -> float:
        d = sum(cpu1[p] - cpu0[p] for p in pids if p in cpu0 and p in cpu1)
        return round(d / procfs.CLK_TCK / wall, 3)

    load_cpu = {"host_cores": cores(host), "agents_cores": cores(agents),
                "fake_cores": cores([fake_pid]), "bench_client_cores": cores([os.getpid()]),
                "host_per_process_cores": {f"{host[p]} ({p})": cores([p]) for p in host}}
    lat = [v for lst in per_chat for v in lst]
    out["throughput"] = {"chats": len(tp), "messages_per_chat": args.messages,
                         "replies": len(lat), "wall_s": round(wall, 3),
                         "msg_s": round(len(lat) / wall, 1),
                         "turn_ms_under_load": summary(lat), "cpu": load_cpu}
    await asyncio.to_thread(rig.fake_call, "POST", "/_fake/reset")
    return out


async def idle(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    _, agents = rig.tree()
    say(f"idle {args.idle_seconds:g} s with {len(rig.chats)} sessions "
        f"({len(agents)} agent processes), after {args.settle:g} s to settle")
    await asyncio.sleep(args.settle)
    out = await procfs.sample_cpu(rig.tree, args.idle_seconds)
    out["sessions"] = len(rig.chats)
    out["model_calls_while_idle"] = len(
        await asyncio.to_thread(rig.fake_call, "GET", "/_fake/requests"))
    return {"idle": out}


async def memory(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    host, agents = rig.tree()
    out: dict[str, Any] = {"memory": procfs.memory(host)}
    amem = procfs.memory(agents)
    per_agent: dict[str, float] = {}
    for label, mb in amem["per_process_pss_mb"].items():
        root = label.split("/")[0].split(" ")[0]  # "agent:<pid>[/comm] (<pid>)"
        per_agent[root] = round(per_agent.get(root, 0.0) + mb, 2)
    amem["agents"] = len(per_agent)
    amem["pss_mb_mean_per_agent"] = round(amem["pss_mb"] / max(1, len(per_agent)), 2)
    amem["per_agent_pss_mb"] = dict(sorted(per_agent.items(), key=lambda kv: -kv[1]))
    if per_agent:
        amem["pss_mb_p50_per_agent"] = round(pct(list(per_agent.values()), 50) or 0, 2)
        amem["pss_mb_max_per_agent"] = max(per_agent.values())
        amem["agents_per_gb"] = round(1024 / max(amem["pss_mb_mean_per_agent"], 0.01), 1)
    out["agent_memory"] = amem
    out["warm_pool_memory"] = procfs.memory(rig.spares)
    return out


async def client(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    chats = list(rig.chats.values())
    return {"client": {"stray_replies": sum(x.stray for x in chats),
                       "mismatched_replies": sum(x.mismatched for x in chats),
                       "error_frames": [e for x in chats for e in x.errors]}}


PHASES = [fake_round_trip, start, cold, warm, stages, spaced, throughput, idle, memory, client]
