"""From the raw results to the figures, their targets, the printed table and the file.

Why a module of its own: `figures` and `LABELS` are the bench's contract with earlier
results (the same keys in results.json, run after run, so they compare); `TARGETS` are
the floors (from the issue) and aims (DESIGN §9) each figure is judged against.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

# figure -> (floor from the issue, aim from DESIGN §9, "le" = lower is better / "ge")
TARGETS: dict[str, tuple[float | None, float | None, str]] = {
    "start_to_ready_ms": (None, 1000, "le"),
    "cold_turn_ms_p50": (None, 200, "le"),
    "warm_turn_ms_p50": (100, 40, "le"),
    "warm_turn_ms_p99": (None, 100, "le"),
    "throughput_msg_s": (None, 200, "ge"),
    "host_idle_cpu_pct": (2.0, 0.5, "le"),
    "host_pss_mb": (200, 115, "le"),
    "agent_pss_mb_mean": (None, 60, "le"),
    "cold_turn_ms_p50_bwrap": (300, 200, "le"),
    "cold_turn_ms_p50_docker": (1500, 800, "le"),
}


def figures(r: dict[str, Any]) -> dict[str, float | None]:
    g = lambda *path: get(r, *path)  # noqa: E731
    return {
        "fake_rtt_ms_p50": g("fake_round_trip", "keepalive_ms", "p50"),
        "fake_rtt_fresh_ms_p50": g("fake_round_trip", "fresh_connection_ms", "p50"),
        "start_to_ready_ms": g("start", "answering_ms"),
        "cold_turn_ms_p50": g("cold_turn_ms", "p50"),
        "cold_turn_ms_max": g("cold_turn_ms", "max"),
        "warm_turn_ms_p50": g("warm_turn_ms", "p50"),
        "warm_turn_ms_p95": g("warm_turn_ms", "p95"),
        "warm_turn_ms_p99": g("warm_turn_ms", "p99"),
        "warm_ack_ms_p50": g("warm_ack_ms", "p50"),
        "spaced_turn_ms_p50": g("spaced_turn_ms", "p50"),
        "spaced_turn_ms_max": g("spaced_turn_ms", "max"),
        "throughput_msg_s": g("throughput", "msg_s"),
        "load_turn_ms_p50": g("throughput", "turn_ms_under_load", "p50"),
        "load_turn_ms_p99": g("throughput", "turn_ms_under_load", "p99"),
        "concurrent_cold_start_ms": g("concurrent_cold_start", "wall_ms"),
        "host_idle_cpu_pct": g("idle", "host", "cpu_pct"),
        "agents_idle_cpu_pct": g("idle", "agents", "cpu_pct"),
        "host_pss_mb_at_start": g("memory_at_start", "pss_mb"),
        "host_pss_mb": g("memory", "pss_mb"),
        "agent_pss_mb_mean": g("agent_memory", "pss_mb_mean_per_agent"),
        "agent_pss_mb_total": g("agent_memory", "pss_mb"),
        "warm_pool_pss_mb": g("warm_pool_memory", "pss_mb"),
        "cold_turn_ms_p50_bwrap": g("sandboxes", "bwrap", "cold_turn_ms", "p50"),
        "spawn_overhead_ms_bwrap": g("sandboxes", "bwrap", "spawn_overhead_ms"),
        "cold_turn_ms_p50_bwrap_nopool": g("sandboxes", "bwrap-nopool", "cold_turn_ms", "p50"),
        "cold_turn_ms_p50_docker": g("sandboxes", "docker", "cold_turn_ms", "p50"),
        "spawn_overhead_ms_docker": g("sandboxes", "docker", "spawn_overhead_ms"),
        "warm_turn_ms_p50_openai": g("providers", "openai", "warm_turn_ms", "p50"),
        "warm_turn_ms_p99_openai": g("providers", "openai", "warm_turn_ms", "p99"),
    }


def get(d: Any, *path: str) -> Any:
    """d[path[0]][path[1]]..., None where a key is missing."""
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


LABELS = {
    "fake_rtt_ms_p50": "fake model round trip p50 (keep-alive)",
    "fake_rtt_fresh_ms_p50": "fake model round trip p50 (new conn)",
    "start_to_ready_ms": "host start -> ready (ms)",
    "cold_turn_ms_p50": "cold turn p50 (ms)",
    "cold_turn_ms_max": "cold turn max (ms)",
    "warm_turn_ms_p50": "warm turn p50 (ms)",
    "warm_turn_ms_p95": "warm turn p95 (ms)",
    "warm_turn_ms_p99": "warm turn p99 (ms)",
    "warm_ack_ms_p50": "warm ack p50 (ms, message stored)",
    "spaced_turn_ms_p50": "warm turn after a pause p50 (ms)",
    "spaced_turn_ms_max": "warm turn after a pause max (ms)",
    "throughput_msg_s": "throughput (msg/s)",
    "load_turn_ms_p50": "turn under load p50 (ms)",
    "load_turn_ms_p99": "turn under load p99 (ms)",
    "concurrent_cold_start_ms": "concurrent cold starts, wall (ms)",
    "host_idle_cpu_pct": "host idle CPU (% of a core)",
    "agents_idle_cpu_pct": "agents idle CPU (% of a core, all)",
    "host_pss_mb_at_start": "host PSS at start (MB)",
    "host_pss_mb": "host PSS after load (MB)",
    "agent_pss_mb_mean": "agent PSS, mean per agent (MB)",
    "agent_pss_mb_total": "agent PSS, all agents (MB)",
    "warm_pool_pss_mb": "warm pool PSS, the spare (MB)",
    "cold_turn_ms_p50_bwrap": "bwrap: cold turn p50 (ms)",
    "spawn_overhead_ms_bwrap": "bwrap: per-spawn overhead (ms)",
    "cold_turn_ms_p50_bwrap_nopool": "bwrap, no warm pool: cold turn p50 (ms)",
    "cold_turn_ms_p50_docker": "docker: cold turn p50 (ms)",
    "spawn_overhead_ms_docker": "docker: per-spawn overhead (ms)",
    "warm_turn_ms_p50_openai": "openai provider: warm turn p50 (ms)",
    "warm_turn_ms_p99_openai": "openai provider: warm turn p99 (ms)",
}


def verdicts(figs: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    out = {}
    for key, (floor, aim, sense) in TARGETS.items():
        v = figs.get(key)
        ok = (lambda t: v <= t) if sense == "le" else (lambda t: v >= t)  # noqa: E731
        if v is None:
            verdict = "n/a"
        elif aim is not None and ok(aim):
            verdict = "meets aim"
        elif floor is not None and ok(floor):
            verdict = "meets floor"
        else:
            verdict = "MISSES"
        out[key] = {"value": v, "floor": floor, "aim": aim, "better": sense,
                    "verdict": verdict}
    return out


def table(figs: dict[str, float | None], checks: dict[str, dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"

    rows = [("figure", "value", "target", "")]
    for key, label in LABELS.items():
        chk = checks.get(key)
        if chk:
            op = "<=" if chk["better"] == "le" else ">="
            parts = []
            if chk["floor"] is not None:
                parts.append(f"floor {op}{chk['floor']:g}")
            if chk["aim"] is not None:
                parts.append(f"aim {op}{chk['aim']:g}")
            target, verdict = ", ".join(parts), chk["verdict"]
        else:
            target, verdict = "", ""
        rows.append((label, fmt(figs.get(key)), target, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]),
                                r[2].ljust(widths[2]), r[3]]).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def details(results: dict[str, Any], errors: list[str]) -> list[str]:
    """The lines printed under the table: where the CPU and memory went, the host's stop,
    its error log, the client's oddities."""
    lines = []
    idle = results.get("idle", {})
    if idle.get("host", {}).get("per_process_cpu_pct"):
        top = ", ".join(f"{k} {v:.2f}%" for k, v in idle["host"]["per_process_cpu_pct"].items())
        lines.append(f"\nidle CPU by host process: {top}")
    lc = get(results, "throughput", "cpu")
    if lc:
        lines.append(
            f"CPU during throughput (cores of {os.cpu_count()}): host {lc['host_cores']:.2f}, "
            f"agents {lc['agents_cores']:.2f}, fake {lc['fake_cores']:.2f}, bench client "
            f"{lc['bench_client_cores']:.2f}; host by process: " + ", ".join(
                f"{k} {v:.2f}" for k, v in lc["host_per_process_cores"].items()))
    mem = results.get("memory", {}).get("per_process_pss_mb")
    if mem:
        lines.append("PSS by host process (MB): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in mem.items()))
    sd = results.get("shutdown") or {}
    if sd:
        lines.append(
            f"host stop: exit {sd.get('exit_code')} in {sd.get('stop_ms')} ms"
            + (f"; {len(sd['leftover_processes_killed'])} of its processes were still "
               f"running after it exited (killed): {sd['leftover_processes_killed'][:3]}"
               if sd.get("leftover_processes_killed") else ""))
    serious = [ln for ln in errors if "| ERROR" in ln or "| CRITICAL" in ln]
    if serious:
        lines.append(f"host error log: {len(serious)} ERROR line(s), e.g. {serious[0][:200]}")
    cl = results.get("client", {})
    if cl.get("stray_replies") or cl.get("mismatched_replies"):
        lines.append(f"client: {cl.get('stray_replies')} stray, "
                     f"{cl.get('mismatched_replies')} mismatched replies")
    return lines


def publish(results: dict[str, Any], errors: list[str], out: Path) -> bool:
    """Add the figures and their verdicts to `results`, print them, write `out` (JSON).
    False if `out` could not be written."""
    figs = figures(results)
    checks = verdicts(figs)
    results["figures"] = figs
    results["targets"] = checks
    print()
    print(table(figs, checks))
    for line in details(results, errors):
        print(line)
    if "error" in results:
        print(f"\nbench FAILED: {results['error']}", file=sys.stderr)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {out}")
    except OSError as e:
        print(f"could not write {out}: {e}", file=sys.stderr)
        return False
    return True
