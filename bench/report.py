"""From the raw results to the figures, their targets, the printed tables and the file.

Why a module of its own: `figures` and `LABELS` are the bench's contract with earlier
results (the same keys in results.json, run after run, so they compare); `TARGETS` are
DESIGN §9's targets each figure is judged against; `compare` sets a run beside the one
before it (the previous results.json, or `--compare PATH`), so that a regression shows
in the run that causes it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from bench import breakdown

# figure -> (target from DESIGN §9, "le" = lower is better / "ge")
TARGETS: dict[str, tuple[float, str]] = {
    "warm_turn_ms_p50": (10, "le"),
    "warm_turn_ms_p99": (25, "le"),
    "concurrent_first_reply_ms_p50": (1000, "le"),
    "concurrent_first_reply_ms_max": (2000, "le"),
    "throughput_msg_s": (200, "ge"),
    "agent_pss_mb_mean": (20, "le"),
    "host_pss_mb": (100, "le"),
    "start_to_ready_ms": (500, "le"),
    "cold_turn_ms_p50_bwrap": (50, "le"),
    "cold_turn_ms_p50_docker": (300, "le"),
    "host_idle_cpu_pct": (0.2, "le"),
}
# figures where higher is better (every other figure: lower is better), and figures
# that are counts, neither better nor worse (never marked as a regression)
HIGHER_IS_BETTER = {"throughput_msg_s", "agents_per_gb"}
NEUTRAL = {"agents_live"}
REGRESSION_PCT = 10.0  # a change beyond this, in the bad direction, is marked


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
        "concurrent_first_reply_ms_p50": g("concurrent_cold_start", "turn_ms", "p50"),
        "concurrent_first_reply_ms_max": g("concurrent_cold_start", "turn_ms", "max"),
        "concurrent_cold_start_ms": g("concurrent_cold_start", "wall_ms"),
        "host_idle_cpu_pct": g("idle", "host", "cpu_pct"),
        "agents_idle_cpu_pct": g("idle", "agents", "cpu_pct"),
        "host_pss_mb_at_start": g("memory_at_start", "pss_mb"),
        "host_pss_mb": g("memory", "pss_mb"),
        "agents_live": g("agent_memory", "agents"),
        "agent_pss_mb_mean": g("agent_memory", "pss_mb_mean_per_agent"),
        "agent_pss_mb_max": g("agent_memory", "pss_mb_max_per_agent"),
        "agents_per_gb": g("agent_memory", "agents_per_gb"),
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
    "concurrent_first_reply_ms_p50": "new chats at once: first reply p50 (ms)",
    "concurrent_first_reply_ms_max": "new chats at once: first reply max (ms)",
    "concurrent_cold_start_ms": "new chats at once: all replied, wall (ms)",
    "host_idle_cpu_pct": "host idle CPU (% of a core)",
    "agents_idle_cpu_pct": "agents idle CPU (% of a core, all)",
    "host_pss_mb_at_start": "host PSS at start (MB)",
    "host_pss_mb": "host PSS after load (MB)",
    "agents_live": "live agents when memory was measured",
    "agent_pss_mb_mean": "agent PSS, mean per live agent (MB)",
    "agent_pss_mb_max": "agent PSS, the largest agent (MB)",
    "agents_per_gb": "agents per GB (1024 / mean agent PSS)",
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
    for key, (target, sense) in TARGETS.items():
        v = figs.get(key)
        if v is None:
            verdict = "n/a"
        elif (v <= target) if sense == "le" else (v >= target):
            verdict = "meets"
        else:
            verdict = "MISSES"
        out[key] = {"value": v, "target": target, "better": sense, "verdict": verdict}
    return out


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def _grid(rows: list[tuple[str, ...]], right: set[int]) -> str:
    """Rows as aligned columns (`right`: the right-aligned ones), a rule under the head."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                               for i, c in enumerate(r)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(figs: dict[str, float | None], checks: dict[str, dict[str, Any]]) -> str:
    rows = [("figure", "value", "target", "")]
    for key, label in LABELS.items():
        chk = checks.get(key)
        if chk:
            op = "<=" if chk["better"] == "le" else ">="
            target, verdict = f"{op} {chk['target']:g}", chk["verdict"]
        else:
            target, verdict = "", ""
        rows.append((label, fmt(figs.get(key)), target, verdict))
    return _grid(rows, {1})


def load_previous(path: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the results in `path`, None) or (None, why there are none)."""
    if path is None:
        return None, "no file to compare against"
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"no previous results at {path}"
    except (OSError, ValueError) as e:
        return None, f"could not read {path}: {e}"
    if not isinstance(old, dict):
        return None, f"{path} holds no bench results"
    return old, None


def noise(results: dict[str, Any] | None) -> dict[str, float]:
    """Figure -> the smallest change the run could see (idle CPU: one clock tick over
    the idle window); a smaller change is never marked as a regression."""
    out = {}
    res = get(results or {}, "idle", "tick_resolution_pct")
    if isinstance(res, (int, float)):
        out = {"host_idle_cpu_pct": float(res), "agents_idle_cpu_pct": float(res)}
    return out


def compare(old: dict[str, Any] | None, figs: dict[str, float | None],
            against: str | None, why_none: str | None = None,
            floors: dict[str, float] | None = None) -> dict[str, Any]:
    """Each figure before (`old`'s figures) and now, the change in percent, and whether it
    is a regression: worse by more than REGRESSION_PCT in the figure's bad direction (and
    by more than its `floors` entry, the measurement's resolution, where it has one)."""
    floors = floors or {}
    out: dict[str, Any] = {"against": against, "threshold_pct": REGRESSION_PCT}
    if old is None:
        out["note"] = why_none or "no previous results"
        out["rows"] = []
        return out
    before = old.get("figures")
    if not isinstance(before, dict):
        before = figures(old)  # an older file without its figures: derive them
    out["before_timestamp"] = old.get("timestamp")
    out["before_quick"] = get(old, "params", "quick")
    rows = []
    keys = list(LABELS) + [k for k in figs if k not in LABELS]
    keys += [k for k in before if k not in keys]  # figures this run no longer has
    for key in keys:
        b, n = before.get(key), figs.get(key)
        if not isinstance(b, (int, float)) or isinstance(b, bool):
            b = None
        if b is None and n is None:
            continue
        change = None
        if b is not None and n is not None and b != 0:
            change = round((n - b) / abs(b) * 100, 1)
        worse = None
        if change is not None and key not in NEUTRAL:
            worse = -change if key in HIGHER_IS_BETTER else change
        regression = bool(worse is not None and worse > REGRESSION_PCT
                          and abs(n - b) > floors.get(key, 0.0))
        rows.append({"figure": key, "before": b, "now": n, "change_pct": change,
                     "regression": regression})
    out["rows"] = rows
    out["regressions"] = [r["figure"] for r in rows if r["regression"]]
    return out


def compare_lines(cmp: dict[str, Any], quick: bool | None = None) -> list[str]:
    if not cmp.get("rows"):
        return [f"\ncomparison: {cmp.get('note') or 'nothing to compare'}"]
    head = f"\ncompared with {cmp.get('against')} ({cmp.get('before_timestamp') or 'no date'})"
    if quick is not None and cmp.get("before_quick") is not None and cmp["before_quick"] != quick:
        head += (" -- note: that was a " + ("quick" if cmp["before_quick"] else "full")
                 + " run, this one is " + ("quick" if quick else "full"))
    rows = [("figure", "before", "now", "change", "")]
    for r in cmp["rows"]:
        ch = "-" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%"
        rows.append((LABELS.get(r["figure"], r["figure"]), fmt(r["before"]), fmt(r["now"]), ch,
                     f"<< worse by >{REGRESSION_PCT:g}%" if r["regression"] else ""))
    tail = (f"{len(cmp['regressions'])} figure(s) worse by more than {REGRESSION_PCT:g}%"
            if cmp.get("regressions") else f"no figure worse by more than {REGRESSION_PCT:g}%")
    return [head + ":", _grid(rows, {1, 2, 3}), tail]


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
    am = results.get("agent_memory") or {}
    if am.get("per_agent_pss_mb"):
        per = list(am["per_agent_pss_mb"].values())
        lines.append(
            f"PSS per agent with {am.get('agents')} live (MB): mean "
            f"{am.get('pss_mb_mean_per_agent')}, p50 {am.get('pss_mb_p50_per_agent')}, max "
            f"{am.get('pss_mb_max_per_agent')}, min {min(per)}; {am.get('agents_per_gb')} "
            f"agents per GB; spares {get(results, 'warm_pool_memory', 'pss_mb')} MB")
    cc = results.get("concurrent_cold_start") or {}
    if get(cc, "turn_ms", "count"):
        lines.append(
            f"{cc.get('chats')} new chats at once: first replies p50 "
            f"{fmt(get(cc, 'turn_ms', 'p50'))} ms, max {fmt(get(cc, 'turn_ms', 'max'))} ms, "
            f"all in {fmt(cc.get('wall_ms'))} ms")
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


def publish(results: dict[str, Any], errors: list[str], out: Path,
            against: Path | None = None) -> bool:
    """Add the figures, their verdicts and the comparison with the results in `against`
    (default: `out`, read before it is overwritten) to `results`, print them, write `out`
    (JSON). False if `out` could not be written."""
    against = against or out
    old, why = load_previous(against)
    figs = figures(results)
    checks = verdicts(figs)
    results["figures"] = figs
    results["targets"] = checks
    floors = noise(results)
    for k, v in noise(old).items():
        floors[k] = max(v, floors.get(k, 0.0))
    results["compare"] = compare(old, figs, str(against), why, floors)
    print()
    print(table(figs, checks))
    if "warm_turn_stages" in results:
        for line in breakdown.lines(results["warm_turn_stages"]):
            print(line)
    for line in compare_lines(results["compare"], get(results, "params", "quick")):
        print(line)
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
