"""Measure the host: `python -m bench.run [--quick] [--n N] [--idle-seconds S] ...`.

Starts the fake model (its own process, zero delay) and a real host (`nanoclaw run`,
`NANOCLAW_RUNTIME=process`, provider `anthropic`, everything in a temp dir), then drives
messages through the terminal channel (`data/cli.sock`, one persistent connection per
chat) and reports, on stdout as a table and in `bench/results.json`:

- the fake's own round trip (raw HTTP POST /v1/messages, keep-alive and fresh connection),
- host start to ready (process start -> socket answering a frame),
- cold turns (a fresh chat's first message: includes starting its agent, or handing the
  session to the warm pool's spare; fresh chats `--cold-gap` s apart, 1 s by default),
- warm turns p50/p95/p99 (one chat, one warm-up, then N back-to-back; send -> reply frame),
- warm turns after a pause (the same chat, a few seconds between messages, so every
  poller in the path has backed off to its slow interval, as with a human typing),
- throughput (K chats, all warmed up, each sending M messages back-to-back),
- idle CPU over S seconds with every agent up and idle: the host (all workers) and the
  agent processes separately, in percent of one core, from /proc/<pid>/stat,
- memory: PSS (/proc/<pid>/smaps_rollup) summed over the host and its workers, per
  agent process, and of the warm pool's spare,
- then, per sandbox runtime that can run here (`--sandboxes`): a host of its own with
  that runtime, cold turns and 10 warm turns; per-spawn overhead = cold p50 - warm p50.
  bwrap is measured with and without its warm pool.

The host and the fake are always stopped (SIGTERM, then SIGKILL), also on errors and
Ctrl-C; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as _dt
import http.client
import json
import math
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nanoclaw.runtime.warm import is_waiting  # noqa: E402
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"
REPLY_TIMEOUT = 30.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

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


class BenchError(RuntimeError):
    pass


# --- statistics -------------------------------------------------------------------------

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


# --- /proc ------------------------------------------------------------------------------

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


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_tree(host_pid: int, spares: dict[int, str] | None = None
                 ) -> tuple[dict[int, str], dict[int, str]]:
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
    host: dict[int, str] = {}
    agents: dict[int, str] = {}

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
                        spares.update({c: "spare" for c in _descendants(child, children)})
                    continue
                walk(child, child)
            else:
                walk(child, agent_root)

    if _stat(host_pid) is not None:
        walk(host_pid, None)
    return host, agents


def _descendants(pid: int, children: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


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


def memory(procs: dict[int, str]) -> dict[str, Any]:
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


# --- processes we start ---------------------------------------------------------------------

def _die_with_parent() -> None:
    """Child pre-exec: get SIGTERM if the bench dies without cleaning up (kill -9)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen | None, timeout: float = STOP_TIMEOUT) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        return None


class Rig:
    """The fake model and the host, in a temp dir; `close()` always stops both."""

    def __init__(self, keep: bool, runtime: str = "process", env: dict[str, str] | None = None):
        self.keep, self.runtime, self.env = keep, runtime, env or {}
        self.tmp = Path(tempfile.mkdtemp(prefix="nanoclaw-bench-"))
        self.data = self.tmp / "data"
        self.sock = self.data / "cli.sock"
        self.fake: subprocess.Popen | None = None
        self.fake_url = ""
        self.host: subprocess.Popen | None = None
        self.host_started = 0.0
        self.host_log = None
        self.seen: dict[int, str] = {}
        self.spares: dict[int, str] = {}  # the warm pool's, at the last tree()  # every host/agent pid observed, for the last resort

    def start_fake(self) -> str:
        self.fake = subprocess.Popen(
            [sys.executable, "-m", "bench.run", "--serve-fake"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent, start_new_session=True)
        assert self.fake.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.fake.poll() is not None:
                raise BenchError(f"fake model did not start: {buf.decode(errors='replace')!r}")
            ready, _, _ = select.select([self.fake.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.fake.stdout.fileno(), 4096)
                if not chunk:
                    raise BenchError(f"fake model exited: {buf.decode(errors='replace')!r}")
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith("listening on "):
            raise BenchError(f"unexpected fake model output: {line!r}")
        self.fake_url = line.removeprefix("listening on ").strip()
        return self.fake_url

    def host_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NANOCLAW_", "TELEGRAM_", "DISCORD_", "SLACK_"))
               and k not in ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN")}
        env.update({
            "NANOCLAW_DATA_DIR": str(self.data), "NANOCLAW_LOGS_DIR": str(self.tmp / "logs"),
            "NANOCLAW_GROUPS_DIR": str(self.tmp / "groups"), "NANOCLAW_RUNTIME": self.runtime,
            "NANOCLAW_PROVIDER": "anthropic", "ANTHROPIC_BASE_URL": self.fake_url,
            "ANTHROPIC_API_KEY": "bench-key", **self.env,
        })
        return env

    def start_host(self) -> None:
        self.host_log = open(self.tmp / "host.out", "wb")
        self.host_started = time.perf_counter()
        self.host = subprocess.Popen(
            [sys.executable, "-m", "nanoclaw", "run"], cwd=self.tmp, env=self.host_env(),
            stdout=self.host_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent, start_new_session=True)

    def tree(self) -> tuple[dict[int, str], dict[int, str]]:
        if self.host is None:
            return {}, {}
        self.spares = {}
        host, agents = process_tree(self.host.pid, self.spares)
        for pid in (*host, *agents):
            self.seen.setdefault(pid, _cmdline(pid))
        return host, agents

    def stop_host(self) -> dict[str, Any]:
        if self.host is None:
            return {}
        with contextlib.suppress(Exception):
            self.tree()
        t0 = time.perf_counter()
        rc = _stop(self.host)
        out = {"exit_code": rc, "stop_ms": round((time.perf_counter() - t0) * 1000, 1)}
        # Last resort: anything of the host's still alive (same pid, same command line).
        time.sleep(0.2)
        leftovers = []
        for pid, cmd in self.seen.items():
            if pid == self.host.pid or not cmd or _cmdline(pid) != cmd:
                continue
            leftovers.append(f"{pid} {cmd[:80]}")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        out["leftover_processes_killed"] = leftovers
        if leftovers:
            out["note"] = ("these processes of the host were still running after it exited "
                           "and were killed with SIGKILL by the bench")
        return out

    def close(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        try:
            info = self.stop_host()
        finally:
            _stop(self.fake, 5)
            if self.host_log is not None:
                self.host_log.close()
            if not self.keep:
                shutil.rmtree(self.tmp, ignore_errors=True)
        return info

    def error_log_lines(self) -> list[str]:
        path = self.tmp / "logs" / "nanoclaw.error.log"
        try:
            return [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return []

    # -- the fake's own HTTP side (recorded requests)
    def fake_call(self, method: str, path: str) -> Any:
        host, port = self.fake_url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request(method, path, body=b"{}" if method == "POST" else None,
                         headers={"Content-Type": "application/json"})
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()


# --- the fake's own round trip --------------------------------------------------------------

def fake_round_trip(url: str, n: int) -> dict[str, Any]:
    """Raw POST /v1/messages (streaming, like the agent) to the fake: what the fake costs."""
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


# --- the terminal-channel client ------------------------------------------------------------

class Chat:
    """One persistent connection to cli.sock, on one chat."""

    def __init__(self, sock: Path, name: str, run_id: str) -> None:
        self.sock = sock
        self.name = name
        self.run_id = run_id
        self.seq = 0
        self.acks: dict[str, asyncio.Future] = {}
        self.replies: dict[str, asyncio.Future] = {}
        self.stray = 0
        self.mismatched = 0
        self.errors: list[dict] = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None

    async def open(self) -> "Chat":
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.sock), limit=1 << 22), 10)
        self.task = asyncio.create_task(self._read())
        return self

    def _fail_all(self, exc: BaseException) -> None:
        for table in (self.acks, self.replies):
            for fut in table.values():
                if not fut.done():
                    fut.set_exception(exc)
            table.clear()

    async def _read(self) -> None:
        assert self.reader is not None
        try:
            while True:
                line = await self.reader.readline()
                now = time.perf_counter()
                if not line:
                    self._fail_all(BenchError(f"chat {self.name}: host closed the connection"))
                    return
                frame = json.loads(line)
                kind = frame.get("type")
                if kind == "ack":
                    fut = self.acks.pop(frame.get("id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(now)
                elif kind == "reply":
                    fut = self.replies.pop(frame.get("in_reply_to"), None)
                    if fut is not None and not fut.done():
                        fut.set_result((now, frame))
                    else:
                        self.stray += 1
                elif kind == "error":
                    self.errors.append(frame)
                    self._fail_all(BenchError(f"chat {self.name}: host error frame {frame}"))
        except (ConnectionError, ValueError) as e:
            self._fail_all(BenchError(f"chat {self.name}: {e}"))

    async def send(self, text: str) -> tuple[float, float]:
        """Send one message; (ack latency, reply latency) in ms."""
        assert self.writer is not None
        self.seq += 1
        mid = f"{self.run_id}-{self.name}-{self.seq}"
        loop = asyncio.get_running_loop()
        ack, rep = loop.create_future(), loop.create_future()
        self.acks[mid], self.replies[mid] = ack, rep
        frame = json.dumps({"type": "message", "text": text, "chat": self.name, "id": mid})
        t0 = time.perf_counter()
        self.writer.write(frame.encode() + b"\n")
        try:
            await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)
            t_ack = await asyncio.wait_for(ack, REPLY_TIMEOUT)
            t_rep, reply = await asyncio.wait_for(
                rep, max(0.1, REPLY_TIMEOUT - (time.perf_counter() - t0)))
        except asyncio.TimeoutError:
            self.acks.pop(mid, None)
            self.replies.pop(mid, None)
            raise BenchError(f"chat {self.name}: no reply to {mid} within "
                             f"{REPLY_TIMEOUT:.0f} s") from None
        if text not in str(reply.get("text", "")):
            self.mismatched += 1
        return (t_ack - t0) * 1000, (t_rep - t0) * 1000

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 2)


async def wait_ready(rig: Rig) -> dict[str, float]:
    """Process start -> cli.sock accepting, and -> answering a subscribe frame."""
    deadline = time.monotonic() + START_TIMEOUT
    accepting = None
    while True:
        if rig.host is None or rig.host.poll() is not None:
            raise BenchError(f"host exited during start (code {rig.host and rig.host.returncode}); "
                             f"see {rig.tmp / 'host.out'}")
        if time.monotonic() > deadline:
            raise BenchError(f"host not ready within {START_TIMEOUT:.0f} s")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(rig.sock)), 2)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.002)
            continue
        try:
            if accepting is None:
                accepting = time.perf_counter() - rig.host_started
            writer.write(b'{"type":"subscribe","chat":"bench-ready"}\n')
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 5)
            if json.loads(line or b"{}").get("type") == "subscribed":
                return {"accepting_ms": accepting * 1000,
                        "answering_ms": (time.perf_counter() - rig.host_started) * 1000}
        except (OSError, ValueError, asyncio.TimeoutError):
            await asyncio.sleep(0.01)
        finally:
            writer.close()


async def sample_cpu(rig: Rig, seconds: float) -> dict[str, Any]:
    host, agents = rig.tree()
    labels = {**host, **agents}
    t0 = time.perf_counter()
    before = cpu_ticks(list(labels))
    await asyncio.sleep(seconds)
    after = cpu_ticks(list(labels))
    wall = time.perf_counter() - t0
    host_after, agents_after = rig.tree()

    def part(procs: dict[int, str]) -> dict[str, Any]:
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


# --- the run ---------------------------------------------------------------------------------

async def bench(rig: Rig, args: argparse.Namespace, results: dict[str, Any]) -> None:
    run_id = f"b{int(time.time())}"
    chats: list[Chat] = []

    async def chat(name: str) -> Chat:
        c = await Chat(rig.sock, name, run_id).open()
        chats.append(c)
        return c

    def say(msg: str) -> None:
        print(f"  .. {msg}", flush=True)

    try:
        say("fake model round trip")
        results["fake_round_trip"] = await asyncio.to_thread(fake_round_trip, rig.fake_url, 50)

        say("starting host")
        rig.start_host()
        results["start"] = await wait_ready(rig)
        await asyncio.sleep(1.0)
        host, _ = rig.tree()
        results["host_workers"] = sorted(host.values())
        results["memory_at_start"] = memory(host)

        say(f"cold turns ({args.cold} fresh chats, {args.cold_gap:g} s apart)")
        results["cold_turn_ms"] = await cold_turns(chat, args.cold, args.cold_gap, "cold")

        say(f"warm turns (1 warm-up + {args.n})")
        c = await chat("warm")
        await c.send("warm-up")
        await asyncio.to_thread(rig.fake_call, "POST", "/_fake/reset")
        acks, warm = [], []
        for i in range(args.n):
            a, r = await c.send(f"warm {i}")
            acks.append(a)
            warm.append(r)
        calls = len(await asyncio.to_thread(rig.fake_call, "GET", "/_fake/requests"))
        results["warm_turn_ms"] = summary(warm)
        results["warm_turn_ms"]["values"] = [round(x, 2) for x in warm]
        results["warm_ack_ms"] = summary(acks)
        results["model_calls_per_warm_turn"] = round(calls / max(1, args.n), 2)

        say(f"spaced warm turns ({args.spaced} turns, {args.gap:g} s apart: polls backed off)")
        spaced = []
        for i in range(args.spaced):
            await asyncio.sleep(args.gap)
            spaced.append((await c.send(f"spaced {i}"))[1])
        results["spaced_turn_ms"] = summary(spaced)
        results["spaced_turn_ms"]["values"] = [round(x, 1) for x in spaced]
        results["spaced_turn_ms"]["gap_s"] = args.gap

        say(f"throughput ({args.chats} chats x {args.messages} messages, warm-up first)")
        tp = [await chat(f"tp{i}") for i in range(args.chats)]
        t0 = time.perf_counter()
        first = await asyncio.gather(*(x.send("tp warm-up") for x in tp))
        results["concurrent_cold_start"] = {
            "chats": len(tp), "wall_ms": round((time.perf_counter() - t0) * 1000, 1),
            "turn_ms": summary([r for _, r in first])}

        async def drive(x: Chat) -> list[float]:
            return [(await x.send(f"tp {x.name} {j}"))[1] for j in range(args.messages)]

        await asyncio.to_thread(rig.fake_call, "POST", "/_fake/reset")
        host, agents = rig.tree()
        fake_pid = rig.fake.pid if rig.fake else -1
        cpu0 = cpu_ticks([*host, *agents, fake_pid, os.getpid()])
        t0 = time.perf_counter()
        per_chat = await asyncio.gather(*(drive(x) for x in tp))
        wall = time.perf_counter() - t0
        cpu1 = cpu_ticks([*host, *agents, fake_pid, os.getpid()])

        def cores(pids: Any) -> float:
            d = sum(cpu1[p] - cpu0[p] for p in pids if p in cpu0 and p in cpu1)
            return round(d / CLK_TCK / wall, 3)

        load_cpu = {"host_cores": cores(host), "agents_cores": cores(agents),
                    "fake_cores": cores([fake_pid]), "bench_client_cores": cores([os.getpid()]),
                    "host_per_process_cores": {f"{host[p]} ({p})": cores([p]) for p in host}}
        lat = [v for lst in per_chat for v in lst]
        results["throughput"] = {"chats": len(tp), "messages_per_chat": args.messages,
                                 "replies": len(lat), "wall_s": round(wall, 3),
                                 "msg_s": round(len(lat) / wall, 1),
                                 "turn_ms_under_load": summary(lat), "cpu": load_cpu}
        await asyncio.to_thread(rig.fake_call, "POST", "/_fake/reset")

        _, agents = rig.tree()
        say(f"idle {args.idle_seconds:g} s with {len(chats)} sessions "
            f"({len(agents)} agent processes), after {args.settle:g} s to settle")
        await asyncio.sleep(args.settle)
        results["idle"] = await sample_cpu(rig, args.idle_seconds)
        results["idle"]["sessions"] = len(chats)
        results["idle"]["model_calls_while_idle"] = len(
            await asyncio.to_thread(rig.fake_call, "GET", "/_fake/requests"))

        host, agents = rig.tree()
        results["memory"] = memory(host)
        amem = memory(agents)
        roots = {label.split("/")[0] for label in agents.values()}
        amem["agents"] = len(roots)
        amem["pss_mb_mean_per_agent"] = round(amem["pss_mb"] / max(1, len(roots)), 2)
        results["agent_memory"] = amem
        results["warm_pool_memory"] = memory(rig.spares)
        results["client"] = {"stray_replies": sum(x.stray for x in chats),
                             "mismatched_replies": sum(x.mismatched for x in chats),
                             "error_frames": [e for x in chats for e in x.errors]}
    finally:
        for x in chats:
            await x.close()


async def cold_turns(chat: Any, n: int, gap: float, prefix: str) -> dict[str, Any]:
    """n fresh chats, one after another, `gap` seconds apart (the time a warm pool has to
    refill, as between real people starting conversations)."""
    cold = []
    for i in range(n):
        if i:
            await asyncio.sleep(gap)
        c = await chat(f"{prefix}{i}")
        cold.append((await c.send(f"{prefix} hello {i}"))[1])
    out = summary(cold)
    out["values"] = [round(x, 1) for x in cold]
    out["gap_s"] = gap
    return out


def sandbox_runtimes() -> dict[str, str]:
    """Sandbox runtime name → why it is skipped ("" when it can run here)."""
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
    rig = Rig(keep=args.keep, runtime=runtime, env={"NANOCLAW_WARM_POOL": str(pool)})
    out: dict[str, Any] = {"runtime": runtime, "warm_pool": pool}
    chats: list[Chat] = []

    async def chat(name: str) -> Chat:
        c = await Chat(rig.sock, name, f"{runtime}{int(time.time())}").open()
        chats.append(c)
        return c

    try:
        rig.start_fake()
        rig.start_host()
        await wait_ready(rig)
        await asyncio.sleep(2.0)  # the pool fills; nothing else is running
        out["cold_turn_ms"] = await cold_turns(chat, args.cold, args.cold_gap, "cold")
        last = chats[-1]
        warm = [(await last.send(f"warm {i}"))[1] for i in range(10)]
        out["warm_turn_ms"] = summary(warm)
        c50, w50 = out["cold_turn_ms"]["p50"], out["warm_turn_ms"]["p50"]
        out["spawn_overhead_ms"] = round(c50 - w50, 1) if c50 and w50 else None
    except Exception as e:  # noqa: BLE001 - reported, the main figures still stand
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        for x in chats:
            await x.close()
        out["shutdown"] = rig.close()
    return out


def figures(r: dict[str, Any]) -> dict[str, float | None]:
    g = lambda *path: _get(r, *path)  # noqa: E731
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
    }


def _get(d: Any, *path: str) -> Any:
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
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, dbs)")
    a = p.parse_args(argv)
    defaults = (dict(n=10, cold=3, spaced=3, gap=2.5, chats=5, messages=5, idle_seconds=3.0,
                     settle=1.0) if a.quick
                else dict(n=50, cold=5, spaced=10, gap=3.0, chats=20, messages=20,
                          idle_seconds=30.0, settle=3.0))
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.n < 1 or a.cold < 0 or a.spaced < 0 or a.gap < 0 or a.chats < 1 or a.messages < 1 or a.idle_seconds <= 0:
        p.error("counts must be positive")
    return a


def serve_fake() -> int:
    """The fake model in its own process (zero delay), as `nanoclaw.devtools.fake_model`.

    One difference: its lock is made re-entrant, because GET /_fake/requests holds the
    lock while `_send_json` takes it again (`next_id`), which deadlocks a plain Lock and
    then wedges the whole fake. The bench needs that endpoint to count model calls."""
    import threading

    from nanoclaw.devtools.fake_model import FakeModel

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fake = FakeModel(port=0, delay_ms=0)
    fake._lock = threading.RLock()  # type: ignore[assignment]
    fake.start()
    print(f"listening on {fake.url}", flush=True)
    while not stop.wait(0.5):
        pass
    fake.stop()
    return 0


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
            print(f"  .. {name}: skipped ({can[name]})", flush=True)
            out[name] = {"skipped": can[name]}
            continue
        runs = [(name, 1)] + ([(f"{name}-nopool", 0)] if name == "bwrap" else [])
        for label, pool in runs:
            print(f"  .. {label}: cold turns ({args.cold} fresh chats, {args.cold_gap:g} s"
                  " apart), then 10 warm", flush=True)
            out[label] = asyncio.run(sandbox_bench(name, args, pool))
            if "error" in out[label]:
                print(f"  .. {label}: FAILED {out[label]['error']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    if (argv if argv is not None else sys.argv[1:]) == ["--serve-fake"]:
        return serve_fake()
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
        asyncio.run(bench(rig, args, results))
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
            _stop(rig.host, 2)
            _stop(rig.fake, 2)
            status = 130
    results["host_error_log"] = errors[-20:]
    results["host_error_log_lines"] = len(errors)
    if status == 0 and args.sandboxes != "none":
        results["sandboxes"] = run_sandboxes(args)
    figs = figures(results)
    checks = verdicts(figs)
    results["figures"] = figs
    results["targets"] = checks
    print()
    print(table(figs, checks))
    idle = results.get("idle", {})
    if idle.get("host", {}).get("per_process_cpu_pct"):
        top = ", ".join(f"{k} {v:.2f}%" for k, v in idle["host"]["per_process_cpu_pct"].items())
        print(f"\nidle CPU by host process: {top}")
    lc = _get(results, "throughput", "cpu")
    if lc:
        print(f"CPU during throughput (cores of {os.cpu_count()}): host {lc['host_cores']:.2f}, "
              f"agents {lc['agents_cores']:.2f}, fake {lc['fake_cores']:.2f}, bench client "
              f"{lc['bench_client_cores']:.2f}; host by process: " + ", ".join(
                  f"{k} {v:.2f}" for k, v in lc["host_per_process_cores"].items()))
    mem = results.get("memory", {}).get("per_process_pss_mb")
    if mem:
        print("PSS by host process (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in mem.items()))
    sd = results.get("shutdown") or {}
    if sd:
        print(f"host stop: exit {sd.get('exit_code')} in {sd.get('stop_ms')} ms"
              + (f"; {len(sd['leftover_processes_killed'])} of its processes were still "
                 f"running after it exited (killed): {sd['leftover_processes_killed'][:3]}"
                 if sd.get("leftover_processes_killed") else ""))
    serious = [ln for ln in errors if "| ERROR" in ln or "| CRITICAL" in ln]
    if serious:
        print(f"host error log: {len(serious)} ERROR line(s), e.g. {serious[0][:200]}")
    cl = results.get("client", {})
    if cl.get("stray_replies") or cl.get("mismatched_replies"):
        print(f"client: {cl.get('stray_replies')} stray, {cl.get('mismatched_replies')} "
              "mismatched replies")
    if "error" in results:
        print(f"\nbench FAILED: {results['error']}", file=sys.stderr)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
    except OSError as e:
        print(f"could not write {args.out}: {e}", file=sys.stderr)
        status = status or 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
