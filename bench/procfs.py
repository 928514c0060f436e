"""CPU and memory of the host's processes, read from /proc, for the bench.

Why a module of its own: the bench splits the host's tree into the host (itself and its
workers), the agents and the spares (the warm pool's, or a zygote that forks agents),
and samples CPU ticks and PSS for each; none of that belongs to the host. The split
itself (`classify`) is pure, over a process table, so it is tested without processes;
what makes a process a waiting runner is `nanoclaw.runtime.warm.waits`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from nanoclaw.runtime.warm import waits

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


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def process_table() -> dict[int, list[int]]:
    """ppid -> child pids, for every process in /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children[int(st[1])].append(int(name))
    return children


def classify(host_pid: int, children: Mapping[int, list[int]], comm: Callable[[int], str],
             waiting: Callable[[int], bool], cwd: Callable[[int], str | None],
             ) -> tuple[Procs, Procs, Procs]:
    """(host, agents, spares) under `host_pid`, as pid -> label, from a process table
    (`children`: ppid -> pids) and what each process is (`comm`, `waiting` = `waits`,
    `cwd`). Pure, so tests hand it a made-up table.

    Under the `containers` worker (comm `nc-containers`) each child is one of:
    - an agent: no waiting runner in its subtree; the whole subtree is that agent;
    - a warm-pool spare: a waiting runner (the child or below it, e.g. under bwrap)
      without handed-over children; the whole subtree is the spare;
    - a zygote: a waiting runner whose children were forked for sessions. The zygote
      (and whatever leads to it, and its children still in `/`) counts as a spare, and
      each child that works elsewhere (handed over: its cwd is the agent's folder) is
      an agent root, its subtree that agent.
    Everything else under the host (the host itself and its workers) is the host."""
    host: Procs = {}
    agents: Procs = {}
    spares: Procs = {}

    def subtree(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, ()))
        return out

    def agent(root: int) -> None:
        for p in subtree(root):
            agents[p] = f"agent:{root}" + ("" if p == root else f"/{comm(p)}")

    def under_containers(top: int) -> None:
        runner = next((p for p in subtree(top) if waiting(p)), None)
        if runner is None:
            agent(top)
            return
        todo = [top]
        while todo:
            p = todo.pop()
            spares[p] = "spare"
            for c in children.get(p, ()):
                if p == runner and cwd(c) not in ("/", None):
                    agent(c)  # forked from the zygote and handed a session
                else:
                    todo.append(c)

    def walk(pid: int) -> None:
        name = comm(pid)
        host[pid] = "host" if pid == host_pid else name.removeprefix("nc-")
        for child in children.get(pid, ()):
            if name == "nc-containers":
                under_containers(child)
            else:
                walk(child)

    walk(host_pid)
    return host, agents, spares


def process_tree(host_pid: int, spares: Procs | None = None) -> tuple[Procs, Procs]:
    """(host processes, agent processes) under `host_pid`, as pid -> label (`classify`
    on the live /proc). The warm pool's spares and a zygote (no session) are neither;
    they go to `spares` when given."""
    if _stat(host_pid) is None:
        return {}, {}
    host, agents, spare = classify(host_pid, process_table(), _comm, waits, _cwd)
    if spares is not None:
        spares.update(spare)
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
