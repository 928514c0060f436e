"""The fake model and a real host, started and stopped for one bench run (`Rig`).

Why a module of its own: starting them (temp dir, environment, readiness) and above all
stopping them on every path (errors, Ctrl-C, a bench killed with -9) is what keeps a
bench from leaving processes behind; the phases only use what it hands them. The fake is
the stock `python -m nanoclaw.devtools.fake_model` (zero delay) in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import ROOT, BenchError
from bench.chat import Chat
from bench.procfs import Procs, cmdline, process_tree
from nanoclaw.runtime.procfs import children as descendants
from nanoclaw.runtime.warm import agent_roots

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def _die_with_parent() -> None:
    """Child pre-exec: get SIGTERM if the bench dies without cleaning up (kill -9)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen | None, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM, then SIGKILL after `timeout` s; the exit code, None if it had to be killed."""
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
    """The fake model and the host, in a temp dir; `close()` always stops both.

    It also holds the open chats (by name), so that phases can share them."""

    def __init__(self, keep: bool, runtime: str = "process", env: dict[str, str] | None = None,
                 run_id: str | None = None):
        self.keep, self.runtime, self.env = keep, runtime, env or {}
        self.run_id = run_id or f"b{int(time.time())}"
        self.tmp = Path(tempfile.mkdtemp(prefix="nanoclaw-bench-"))
        self.data = self.tmp / "data"
        self.sock = self.data / "cli.sock"
        self.fake: subprocess.Popen | None = None
        self.fake_url = ""
        self.host: subprocess.Popen | None = None
        self.host_started = 0.0
        self.host_log = None
        self.chats: dict[str, Chat] = {}
        self.seen: dict[int, str] = {}  # every host/agent pid observed, for the last resort
        self.spares: Procs = {}  # the warm pool's (or a zygote's), at the last tree()
        self.notes: dict[str, Any] = {}  # what one phase leaves for a later one

    def start_fake(self, module: str = "fake_model") -> str:
        """The zero-delay fake (`fake_model`, or `fake_openai` for the openai provider)."""
        self.fake = subprocess.Popen(
            [sys.executable, "-m", f"nanoclaw.devtools.{module}", "--port", "0",
             "--delay-ms", "0"],
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
        if self.host_log is not None:
            self.host_log.close()
        self.host_log = open(self.tmp / "host.out", "ab")  # a restarted host appends
        self.host_started = time.perf_counter()
        self.host = subprocess.Popen(
            [sys.executable, "-m", "nanoclaw", "run"], cwd=self.tmp, env=self.host_env(),
            stdout=self.host_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent, start_new_session=True)

    async def wait_ready(self) -> dict[str, float]:
        """Process start -> cli.sock accepting, and -> answering a subscribe frame."""
        deadline = time.monotonic() + START_TIMEOUT
        accepting = None
        while True:
            if self.host is None or self.host.poll() is not None:
                raise BenchError(f"host exited during start (code "
                                 f"{self.host and self.host.returncode}); "
                                 f"see {self.tmp / 'host.out'}")
            if time.monotonic() > deadline:
                raise BenchError(f"host not ready within {START_TIMEOUT:.0f} s")
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.sock)), 2)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.002)
                continue
            try:
                if accepting is None:
                    accepting = time.perf_counter() - self.host_started
                writer.write(b'{"type":"subscribe","chat":"bench-ready"}\n')
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 5)
                if json.loads(line or b"{}").get("type") == "subscribed":
                    return {"accepting_ms": accepting * 1000,
                            "answering_ms": (time.perf_counter() - self.host_started) * 1000}
            except (OSError, ValueError, asyncio.TimeoutError):
                await asyncio.sleep(0.01)
            finally:
                writer.close()

    async def chat(self, name: str) -> Chat:
        """Open a chat (kept in `chats` until `close_chats()`)."""
        c = await Chat(self.sock, name, self.run_id).open()
        self.chats[name] = c
        return c

    async def close_chats(self) -> None:
        for c in self.chats.values():
            await c.close()

    def tree(self) -> tuple[Procs, Procs]:
        if self.host is None:
            return {}, {}
        self.spares = {}
        host, agents = process_tree(self.host.pid, self.spares)
        for pid in (*host, *agents):
            self.seen.setdefault(pid, cmdline(pid))
        return host, agents

    def stop_host(self) -> dict[str, Any]:
        if self.host is None:
            return {}
        with contextlib.suppress(Exception):
            self.tree()
        t0 = time.perf_counter()
        rc = stop(self.host)
        out = {"exit_code": rc, "stop_ms": round((time.perf_counter() - t0) * 1000, 1)}
        # Last resort: anything of the host's still alive (same pid, same command line).
        time.sleep(0.2)
        leftovers = []
        for pid, cmd in self.seen.items():
            if pid == self.host.pid or not cmd or cmdline(pid) != cmd:
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
            self._kill_orphans(info)
        finally:
            stop(self.fake, 5)
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

    def fake_call(self, method: str, path: str) -> Any:
        """The fake's own HTTP side: /_fake/reset, /_fake/requests (recorded calls)."""
        host, port = self.fake_url.removeprefix("http://").split("/")[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request(method, path, body=b"{}" if method == "POST" else None,
                         headers={"Content-Type": "application/json"})
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    # ---- what the chaos soak (bench/chaos.py) kills ------------------------------------
    @property
    def install_id(self) -> str:
        """The host's install id (`lifecycle.containers.install_id`): the mark in each
        agent's environment and the label on each of its containers."""
        return hashlib.sha1(str(self.data.resolve()).encode()).hexdigest()[:8]

    def marked_pids(self) -> list[int]:
        """Processes started by this host's runtimes (`NANOCLAW_INSTALL` = the install id
        in their environment): agents of the process runtime (also those a killed
        containers worker left behind), bwrap processes, the warm pool's spares."""
        mark = f"NANOCLAW_INSTALL={self.install_id}".encode()
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/environ", "rb") as f:
                        if mark in f.read().split(b"\0"):
                            out.append(int(name))
                except OSError:
                    continue
        return sorted(out)

    def agent_roots(self) -> list[int]:
        """The top process of each agent that has a session (spares left out; an agent
        forked from a zygote, i.e. whose parent is a waiting runner, is a root too)."""
        return agent_roots(set(self.marked_pids()))

    def worker_pids(self) -> dict[str, int]:
        """Worker name -> pid, from the `workers` table, for workers alive under this host."""
        if self.host is None or self.host.poll() is not None:
            return {}
        try:
            conn = sqlite3.connect(f"file:{self.data / 'nanoclaw.db'}?mode=ro",
                                   uri=True, timeout=5)
            try:
                rows = conn.execute("SELECT name, pid FROM workers WHERE pid > 0").fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            return {}
        return {name: pid for name, pid in rows if _ppid(pid) == self.host.pid}

    def kill_host_tree(self, agents_too: bool) -> list[int]:
        """SIGKILL the host and every descendant (and, with `agents_too`, every process of
        its install, as systemd's KillMode=mixed kills what is left in the unit's cgroup
        once the main process died). Each is stopped first, top down, so nothing forks a
        process the kill would miss."""
        if self.host is None:
            return []
        stopped: list[int] = []
        for _ in range(10):
            new = [p for p in [self.host.pid, *descendants(self.host.pid)] if p not in stopped]
            if agents_too:
                new += [p for p in self.marked_pids() if p not in stopped and p not in new]
            if not new:
                break
            for p in new:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGSTOP)
                stopped.append(p)
        for p in stopped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.host.wait(10)
        return stopped

    def docker_agents(self) -> list:
        """This install's running agent containers (docker runtime)."""
        import docker

        client = docker.from_env(timeout=30)
        try:
            return client.containers.list(filters={"label": f"nanoclaw.install={self.install_id}"})
        finally:
            client.close()

    def _kill_orphans(self, info: dict[str, Any]) -> None:
        """After the host stopped: agents of its install still running (a killed host's
        adopted ones), and for docker its containers."""
        left = self.marked_pids()
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if left:
            info["leftover_agents_killed"] = left
        if self.runtime == "docker":
            with contextlib.suppress(Exception):
                gone = []
                for c in self.docker_agents():
                    c.remove(force=True)
                    gone.append(c.name)
                if gone:
                    info["leftover_containers_removed"] = gone


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
