"""CPU and memory of the host's processes, read from /proc, for the bench.

Why a module of its own: the bench splits the host's tree into the host (itself and its
workers), the agents and the warm pool's spare, and samples CPU ticks and PSS for each;
none of that belongs to the host. The descendants of a spare come from
`nanoclaw.runtime.procfs.children`, which the runtimes use for the same thing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from typing import Any, Callable

from nanoclaw.runtime.procfs import children as descendants
from nanoclaw.runtime.warm import is_waiting

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

Procs = dict[int, str]  # pid -> label


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (index 0 = state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_tree(host_pid: int, spares: Procs | None = None) -> tuple[Procs, Procs]:
    """(host processes, agent processes) under `host_pid`, as pid -> label.

    Agents are the subtrees rooted at the children of the `containers` worker; everything
    else under the host (the host itself and its workers) counts as the host. The warm
    pool's spares (no session yet) are neither; they go to `spares` when given."""
    children: dict[int, list[int]] = defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children[int(st[1])].append(int(name))
    host: Procs = {}
    agents: Procs = {}

    def walk(pid: int, agent_root: int | None) -> None:
        comm = _comm(pid)
        if agent_root is None:
            host[pid] = "host" if pid == host_pid else comm.removeprefix("nc-")
        else:
            agents[pid] = f"agent:{agent_root}" + ("" if pid == agent_root else f"/{comm}")
        for child in children.get(pid, ()):
            if agent_root is None and comm == "nc-containers":
                if is_waiting(child):  # the warm pool's spare: no session yet
                    if spares is not None:
                        spares[child] = "spare"
                        spares.update({c: "spare" for c in descendants(child)})
                    continue
                walk(child, child)
            else:
                walk(child, agent_root)

    if _stat(host_pid) is not None:
        walk(host_pid, None)
    return host, agents


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            out[pid] = int(st[11]) + int(st[12])  # utime + stime, all threads
    return out


def pss_kb(pid: int) -> int | None:
    for path in (f"/proc/{pid}/smaps_rollup", f"/proc/{pid}/smaps"):
        try:
            with open(path) as f:
                total = 0
                found = False
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        found = True
                if found:
                    return total
        except OSError:
            continue
    return None


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return None


def memory(procs: Procs) -> dict[str, Any]:
    per: dict[str, float] = {}
    total_pss = total_rss = 0
    for pid, label in procs.items():
        p, r = pss_kb(pid), rss_kb(pid)
        if p is None:
            continue
        total_pss += p
        total_rss += r or 0
        per[f"{label} ({pid})"] = round(p / 1024, 2)
    return {"pss_mb": round(total_pss / 1024, 2), "rss_mb": round(total_rss / 1024, 2),
            "processes": len(per), "per_process_pss_mb": per}


async def sample_cpu(tree: Callable[[], tuple[Procs, Procs]], seconds: float) -> dict[str, Any]:
    """CPU of the host and of the agents over `seconds`; `tree()` lists them (Rig.tree)."""
    host, agents = tree()
    labels = {**host, **agents}
    t0 = time.perf_counter()
    before = cpu_ticks(list(labels))
    await asyncio.sleep(seconds)
    after = cpu_ticks(list(labels))
    wall = time.perf_counter() - t0
    host_after, agents_after = tree()

    def part(procs: Procs) -> dict[str, Any]:
        per = {}
        total = 0
        for pid in procs:
            if pid in before and pid in after:
                d = after[pid] - before[pid]
                total += d
                per[f"{procs[pid]} ({pid})"] = round(d / CLK_TCK / wall * 100, 3)
        return {"cpu_pct": round(total / CLK_TCK / wall * 100, 3), "processes": len(per),
                "per_process_cpu_pct": dict(sorted(per.items(), key=lambda kv: -kv[1]))}

    return {"seconds": round(wall, 2), "tick_resolution_pct": round(100 / CLK_TCK / wall, 3),
            "host": part(host), "agents": part(agents),
            "processes_changed": sorted(set(host) ^ set(host_after))
            + sorted(set(agents) ^ set(agents_after))}
