"""`make chaos`: a soak under kill -9. `python -m bench.chaos [--messages N] [--runtime R]
[--seed S] [--short] ...`

Starts the fake model and a real host (`bench.rig.Rig`, process runtime by default,
`--runtime bwrap|docker`), then at once:

- traffic: a client that survives the host (`bench.chat.SurvivingClient`: reconnects
  with backoff, resends every unanswered message under its own id, which the terminal
  channel stores once) sends `--messages` messages over `--chats` chats, seeded: one at a
  time or in bursts (one message on each of 2..`--chats` chats at once), a chat's next
  message only after its last was answered (so steps take the chats that are free);
- a killer: every ~`--kill-every` s (seeded jitter, x0.5..1.5) `kill -9` to, drawn from a
  shuffled bag (`--weights`): a random worker (its pid from the `workers` table), a random
  agent with a session (process/bwrap: the top process of the runtime's agent, found by
  the install mark in its environment; docker: its container, `docker kill`), or the
  whole host tree (the orchestrator and every descendant, and, except for docker, every
  agent process of the install, as systemd's KillMode=mixed kills the rest of the unit's
  cgroup), after which the host is started again `--restart-delay` s later, as
  `Restart=always` would, and the killer waits until it answers before the next kill.
  A kind drawn while nothing of it is up is drawn again at the next slot, and the soak
  does not end (for at most `COVER_S` after its traffic) before every kind was hit once.

The host breaker (`data/circuit-breaker.json`) paces host starts on the seed's schedule
over an hour (0, 0, 10, 30, 120 ... s): with a host kill every few seconds it would soon
keep the host down for minutes. `--host-breaker clear` (the default) deletes the file
before each restart, so the soak measures loss and doubling, not the breaker; `real`
leaves it, and the waits (and `breaker_delays_s`) show what systemd would see.

It prints, and writes to `--out` (bench/chaos.json): messages, kills by target, lost,
answered twice, answered with an error notice, unexpected answers, redelivered frames
(a reply frame received again), resends, reconnects, waits (first send -> first reply)
p50/p99/max. Exit 1 on any lost, doubled, error or unexpected answer (or an error notice
sent to a chat in reply to no message); 2 if the soak itself could not run. The host
gets `NANOCLAW_RETRY_BASE=1` (an agent killed mid-turn is retried after 1·2^tries s, not
5·2^tries) unless `--env` says otherwise. `--short` is the version `make test` runs (150 messages, a kill every
~1.5 s; tests/test_chaos_short.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import os
import platform
import random
import signal
import sqlite3
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from bench import BenchError
from bench.chat import SurvivingClient
from bench.phases import summary
from bench.rig import Rig, stop

DEFAULT_OUT = Path(__file__).resolve().parent / "chaos.json"
# The host's failure texts: lifecycle/containers.py FAIL_TEXT, the broker's 502
# ("the host could not reach the model API"), the runner's provider errors and notices
# (agent_runner/poll_loop.py: "Error: ..."), its broker wait ("could not reach the host's
# model broker"), a quarantine (delivery/delivery.py: "This conversation's agent was
# stopped ...", sent to the chat, not in reply to a message).
ERROR_MARKS = ("could not be processed", "could not reach the model",
               "cannot reach the model", "could not reach the host", "Error:",
               "agent was stopped")
# Settings that keep a soak fast (each exists; see README): an agent killed mid-turn is
# retried after retry_base·2^tries s (default 5).
SOAK_ENV = {"NANOCLAW_RETRY_BASE": "1"}
KINDS = ("worker", "agent", "host")
COVER_S = 30.0  # after the traffic, at most this long for a kind not yet hit (see soak)
SLOW_S = 30.0  # a wait past this is counted (the target: none)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--short", action="store_true",
                   help="the version `make test` runs: 150 messages, a kill every 1.5 s,"
                        " 60 s timeout")
    p.add_argument("--messages", type=int, default=None, help="messages to send (1000)")
    p.add_argument("--chats", type=int, default=8, help="chats they go over (8)")
    p.add_argument("--seed", type=int, default=1, help="seed of traffic and killer (1)")
    p.add_argument("--runtime", default="process", choices=("process", "bwrap", "docker"))
    p.add_argument("--kill-every", type=float, default=None,
                   help="seconds between kills, on average (2; --short 1.5); 0: no kills")
    p.add_argument("--weights", default="worker=2,agent=2,host=1",
                   help="how often each target is drawn (worker=2,agent=2,host=1)")
    p.add_argument("--restart-delay", type=float, default=0.5,
                   help="seconds before a killed host is started again (0.5)")
    p.add_argument("--host-breaker", choices=("clear", "real"), default="clear",
                   help="clear: delete data/circuit-breaker.json before each restart "
                        "(default); real: leave it, its delays show in the waits")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a message may wait before its chat moves on (120; --short"
                        " 60); a reply that comes later still counts")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to listen after the last answer, kills stopped (5)")
    p.add_argument("--env", action="append", default=[], metavar="NANOCLAW_X=V",
                   help="a setting for the host (repeatable); the soak sets "
                        + ", ".join(f"{k}={v}" for k, v in SOAK_ENV.items()))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, dbs)")
    a = p.parse_args(argv)
    if a.messages is None:
        a.messages = 150 if a.short else 1000
    if a.kill_every is None:
        a.kill_every = 1.5 if a.short else 2.0
    if a.timeout is None:
        a.timeout = 60.0 if a.short else 120.0
    if a.messages < 1 or a.chats < 1 or a.kill_every < 0 or a.timeout <= 0:
        p.error("counts must be positive")
    try:
        w = {k.strip(): int(v) for k, v in (x.split("=") for x in a.weights.split(","))}
    except ValueError:
        p.error("--weights: like worker=2,agent=2,host=1")
    if set(w) - set(KINDS) or any(v < 0 for v in w.values()) or not sum(w.values()):
        p.error(f"--weights: names among {', '.join(KINDS)}, counts >= 0, not all 0")
    a.weight_map = w
    env = dict(SOAK_ENV)
    for item in a.env:
        k, sep, v = item.partition("=")
        if not sep or not k.startswith("NANOCLAW_"):
            p.error(f"--env {item!r}: NANOCLAW_NAME=VALUE")
        env[k] = v
    a.host_settings = env
    return a


def say(msg: str) -> None:
    print(f"  .. {msg}", flush=True)


class Killer:
    """kill -9 every ~`kill_every` s to a target drawn from a shuffled bag; restarts a
    killed host. `stop` ends it between two kills."""

    def __init__(self, rig: Rig, rng: random.Random, args: argparse.Namespace) -> None:
        self.rig, self.rng, self.args = rig, rng, args
        self.bag: list[str] = []
        self.kills: Counter[str] = Counter()      # worker:<name>, agent, host
        self.skipped: Counter[str] = Counter()    # drawn, but nothing of that kind was up
        self.log: list[dict[str, Any]] = []
        self.restarts: list[float] = []           # host kill -> answering again, ms
        self.breaker_delays: list[float] = []
        self.host_starts_failed = 0
        self.stop = asyncio.Event()
        self.t0 = time.perf_counter()

    def draw(self) -> str:
        if not self.bag:
            self.bag = [k for k in KINDS for _ in range(self.args.weight_map.get(k, 0))]
            self.rng.shuffle(self.bag)
        return self.bag.pop()

    async def run(self) -> None:
        if self.args.kill_every <= 0:
            return
        while not self.stop.is_set():
            gap = self.args.kill_every * self.rng.uniform(0.5, 1.5)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), gap)
            if self.stop.is_set():
                return
            kind = self.draw()
            what = await getattr(self, f"kill_{kind}")()
            if what is None:  # drawn again at the next slot: every kind gets its kills
                self.bag.append(kind)
                self.skipped[kind] += 1
                self.log.append({"t": round(time.perf_counter() - self.t0, 2),
                                 "target": kind, "skipped": "nothing of that kind up"})
            else:
                self.kills[what] += 1
                self.log.append({"t": round(time.perf_counter() - self.t0, 2), "target": what})

    async def kill_worker(self) -> str | None:
        pids = await asyncio.to_thread(self.rig.worker_pids)
        if not pids:
            return None
        name = self.rng.choice(sorted(pids))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[name], signal.SIGKILL)
            return f"worker:{name}"
        return None

    async def kill_agent(self) -> str | None:
        if self.rig.runtime == "docker":
            def kill_container() -> str | None:
                cs = sorted(self.rig.docker_agents(), key=lambda c: c.name)
                if not cs:
                    return None
                c = self.rng.choice(cs)
                try:
                    c.kill()  # SIGKILL
                except Exception:  # noqa: BLE001 - it ended on its own meanwhile
                    return None
                return "agent"
            return await asyncio.to_thread(kill_container)
        roots = await asyncio.to_thread(self.rig.agent_roots)
        if not roots:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.rng.choice(roots), signal.SIGKILL)
            return "agent"
        return None

    async def kill_host(self) -> str | None:
        t = time.perf_counter()
        await asyncio.to_thread(self.rig.kill_host_tree, self.rig.runtime != "docker")
        await self.restart_host()
        self.restarts.append((time.perf_counter() - t) * 1000)
        return "host"

    async def restart_host(self) -> None:
        """Start the host again after `--restart-delay` s until it answers (as
        Restart=always would: again if it exits)."""
        breaker = self.rig.data / "circuit-breaker.json"
        for _ in range(5):
            if self.args.host_breaker == "clear":
                breaker.unlink(missing_ok=True)
            else:
                self.breaker_delays.append(_next_breaker_delay(breaker))
            await asyncio.sleep(self.args.restart_delay)
            self.rig.start_host()
            if await answering(self.rig, 60.0 + (self.breaker_delays or [0])[-1]):
                return
            self.host_starts_failed += 1
            say(f"host did not come back (exit {self.rig.host and self.rig.host.poll()});"
                " starting it again")
            await asyncio.to_thread(self.rig.kill_host_tree, self.rig.runtime != "docker")
        raise BenchError(f"the host did not come back after 5 starts; see {self.rig.tmp}")


def _next_breaker_delay(path: Path) -> float:
    """The delay the host breaker will impose on the next start (breaker.HostBreaker)."""
    from nanoclaw.breaker import HostBreaker, delay_for, next_attempt

    prev, ts = HostBreaker(path).read()
    return delay_for(next_attempt(prev, ts, time.time()))


async def answering(rig: Rig, timeout: float) -> bool:
    """Whether the host's terminal socket answers a subscribe frame within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rig.host is None or rig.host.poll() is not None:
            return False
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(rig.sock)), 2)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)
            continue
        try:
            writer.write(b'{"type":"subscribe","chat":"chaos-ready"}\n')
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 5)
            if json.loads(line or b"{}").get("type") == "subscribed":
                return True
        except (OSError, ValueError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)
        finally:
            writer.close()
    return False


async def traffic(client: SurvivingClient, rng: random.Random, args: argparse.Namespace,
                  run_id: str, kills: Counter[str]) -> None:
    """Send every message in seeded steps: one message to one chat, or a burst of one
    message to each of 2..`--chats` chats at once. A chat has at most one message
    waiting (a second one would be answered in the same turn, under the id of the last),
    so a step takes its chats among those whose last message was answered (or waited
    `--timeout`), as many as are free, and goes out at once: steps overlap."""
    chats = client.chats
    busy: set[str] = set()
    freed = asyncio.Event()
    pending: set[asyncio.Task] = set()
    n = 0
    next_report = 100

    async def one(chat: str, i: int) -> None:
        try:
            await client.send(chat, f"chaos message {i} on {chat}", f"{run_id}-{i:05d}",
                              args.timeout)
        finally:
            busy.discard(chat)
            freed.set()

    while n < args.messages:
        k = 1 if rng.random() < 0.5 or len(chats) == 1 else rng.randint(2, len(chats))
        while len(busy) == len(chats):
            freed.clear()
            await freed.wait()
        free = [c for c in chats if c not in busy]
        picked = rng.sample(free, min(k, len(free), args.messages - n))
        for i, chat in enumerate(picked):
            busy.add(chat)
            t = asyncio.create_task(one(chat, n + i))
            pending.add(t)
            t.add_done_callback(pending.discard)
        n += len(picked)
        await asyncio.sleep(0)  # let the step's frames go out before the next step
        if n >= next_report or n == args.messages:
            now = time.perf_counter()
            waiting = [s for s in client.sent.values() if s.first_reply is None]
            late = sum(1 for s in waiting if now - s.t0 > SLOW_S)
            say(f"{n}/{args.messages} sent, {len(waiting)} waiting ({late} for over"
                f" {SLOW_S:.0f} s), {sum(kills.values())} kills so far")
            next_report += 100
    if pending:
        await asyncio.gather(*pending)


def outbox_doubles(rig: Rig) -> dict[str, Any]:
    """The host's side: terminal sends per message in `channel_outbox` (more than one is
    a second answer queued, whether or not it reached the client), failed sends."""
    try:
        conn = sqlite3.connect(f"file:{rig.data / 'nanoclaw.db'}?mode=ro", uri=True,
                               timeout=10)
        try:
            doubles = conn.execute(
                "SELECT in_reply_to, COUNT(*) FROM channel_outbox WHERE channel_type='cli'"
                " AND in_reply_to IS NOT NULL GROUP BY in_reply_to HAVING COUNT(*) > 1"
            ).fetchall()
            failed = conn.execute("SELECT COUNT(*) FROM channel_outbox WHERE channel_type='cli'"
                                  " AND status='failed'").fetchone()[0]
            rows = conn.execute("SELECT COUNT(*) FROM channel_outbox WHERE channel_type='cli'"
                                ).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        return {"error": str(e)}
    return {"rows": rows, "messages_with_two_or_more": len(doubles),
            "examples": [list(d) for d in doubles[:10]], "failed": failed}


def tally(client: SurvivingClient, args: argparse.Namespace) -> dict[str, Any]:
    sent = list(client.sent.values())
    lost = [s for s in sent if not s.replies]
    twice = [s for s in sent if len(s.replies) > 1]
    errors, unexpected = [], []
    for s in sent:
        for text in s.replies.values():
            if any(m in text for m in ERROR_MARKS):
                errors.append((s, text))
            elif s.text not in text:
                unexpected.append((s, text))
    waits = [(s.first_reply - s.t0) * 1000 for s in sent if s.first_reply is not None]
    w = summary(waits)
    return {
        "messages": len(sent),
        "answered": len(sent) - len(lost),
        "lost": len(lost),
        "answered_twice": len(twice),
        "error_answers": len(errors),
        "unexpected_answers": len(unexpected),
        "redelivered_frames": client.redelivered,
        "resends": client.resends,
        "connects": client.connects,
        "stray_replies": len(client.stray),
        "stray_error_notices": sum(1 for f in client.stray
                                   if any(m in str(f.get("text", "")) for m in ERROR_MARKS)),
        "error_frames": len(client.error_frames),
        "wait_ms": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in w.items()},
        f"waits_over_{SLOW_S:.0f}s": sum(1 for x in waits if x > SLOW_S * 1000),
        "examples": {
            "lost": [s.mid for s in lost[:10]],
            "answered_twice": [{"id": s.mid, "replies": s.replies} for s in twice[:10]],
            "error_answers": [{"id": s.mid, "text": t[:300]} for s, t in errors[:10]],
            "unexpected_answers": [{"id": s.mid, "sent": s.text, "text": t[:300]}
                                   for s, t in unexpected[:10]],
            "stray_replies": [{"chat": f.get("chat"), "text": str(f.get("text"))[:300]}
                              for f in client.stray[:10]],
            "slowest": [{"id": s.mid, "wait_ms": round((s.first_reply - s.t0) * 1000, 1),
                         "sends": s.sends}
                        for s in sorted((s for s in sent if s.first_reply is not None),
                                        key=lambda s: s.t0 - s.first_reply)[:5]],
        },
    }


async def soak(rig: Rig, args: argparse.Namespace, results: dict[str, Any]) -> None:
    rig.start_fake()
    rig.start_host()
    results["start"] = await rig.wait_ready()
    chats = [f"chaos-{i}" for i in range(args.chats)]
    client = SurvivingClient(rig.sock, chats).start()
    killer = Killer(rig, random.Random(f"{args.seed}:killer"), args)
    t0 = time.perf_counter()
    killing = asyncio.create_task(killer.run())
    try:
        await traffic(client, random.Random(f"{args.seed}:traffic"), args, rig.run_id,
                      killer.kills)
        # a short soak can end before every kind of target was drawn: let the killer go
        # on (bounded) until it has hit each once, the host answering between kills
        deadline = time.perf_counter() + COVER_S
        while args.kill_every > 0 and time.perf_counter() < deadline and not all(
                any(t.split(":")[0] == k for t in killer.kills) for k in KINDS):
            await asyncio.sleep(0.1)
        killer.stop.set()
        await killing  # finishes a host restart under way
        if rig.host is None or rig.host.poll() is not None or not await answering(rig, 60):
            raise BenchError("the host is not answering at the end of the soak")
        # every message has its answer or waited --timeout: listen a little longer
        await asyncio.sleep(args.settle)  # second answers and redeliveries, if any
    finally:
        killer.stop.set()
        if not killing.done():
            killing.cancel()
            with contextlib.suppress(BaseException):
                await killing
        results["duration_s"] = round(time.perf_counter() - t0, 1)
        await client.close()
        results.update(tally(client, args))
        results["kills"] = {
            "total": sum(killer.kills.values()),
            "by_kind": {k: sum(v for t, v in killer.kills.items() if t.split(":")[0] == k)
                        for k in KINDS},
            "by_target": dict(sorted(killer.kills.items())),
            "drawn_but_nothing_up": dict(killer.skipped),
            "log": killer.log,
        }
        results["host_restarts"] = {
            "count": len(killer.restarts),
            "kill_to_answering_ms": summary(killer.restarts),
            "starts_that_failed": killer.host_starts_failed,
            "breaker": args.host_breaker,
            "breaker_delays_s": killer.breaker_delays,
        }
        results["host_outbox"] = await asyncio.to_thread(outbox_doubles, rig)


def failures(r: dict[str, Any]) -> list[str]:
    return [f"{r.get(k, '?')} {k.replace('_', ' ')}" for k in
            ("lost", "answered_twice", "error_answers", "unexpected_answers",
             "stray_error_notices")
            if r.get(k) != 0]


def print_report(r: dict[str, Any]) -> None:
    w = r.get("wait_ms", {})
    k = r.get("kills", {})
    hr = r.get("host_restarts", {})

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:,.0f} ms"

    print(f"\nchaos soak: runtime {r['params']['runtime']}, seed {r['params']['seed']}, "
          f"{r.get('duration_s', '?')} s")
    rows = [
        ("messages", r.get("messages")), ("answered", r.get("answered")),
        ("lost", r.get("lost")), ("answered twice", r.get("answered_twice")),
        ("answered with an error", r.get("error_answers")),
        ("unexpected answers", r.get("unexpected_answers")),
        ("error notices to no message", r.get("stray_error_notices")),
        ("redelivered frames", r.get("redelivered_frames")),
        ("resent messages", r.get("resends")), ("connections", r.get("connects")),
        ("wait p50 / p99 / max", f"{ms(w.get('p50'))} / {ms(w.get('p99'))} / {ms(w.get('max'))}"),
        (f"waits over {SLOW_S:.0f} s", r.get(f"waits_over_{SLOW_S:.0f}s")),
        ("kills", f"{k.get('total')}  " + ", ".join(
            f"{n} {c}" for n, c in (k.get("by_kind") or {}).items())),
        ("  by target", ", ".join(f"{t} {c}" for t, c in (k.get("by_target") or {}).items())),
        ("host restarts (kill -> answering)",
         f"{hr.get('count')}, p50 {ms((hr.get('kill_to_answering_ms') or {}).get('p50'))}, "
         f"max {ms((hr.get('kill_to_answering_ms') or {}).get('max'))}; breaker {hr.get('breaker')}"),
        ("host outbox: messages sent to twice",
         (r.get("host_outbox") or {}).get("messages_with_two_or_more")),
    ]
    for name, v in rows:
        print(f"  {name:<36} {v}")
    bad = failures(r)
    if "error" in r:
        print(f"\nFAILED: {r['error']}")
    elif bad:
        print(f"\nFAILED: {', '.join(bad)} (examples in the JSON file)")
    else:
        print("\nOK: nothing lost, nothing answered twice, no error answers")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("weight_map", "env")}
    results: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "params": params,
    }
    rig = Rig(keep=args.keep, runtime=args.runtime, env=args.host_settings,
              run_id=f"c{int(time.time())}")
    print(f"nanoclaw chaos soak: {args.messages} messages over {args.chats} chats, runtime "
          f"{args.runtime}, a kill every ~{args.kill_every:g} s, seed {args.seed}; "
          f"work dir {rig.tmp}", flush=True)
    status = 0
    try:
        asyncio.run(soak(rig, args, results))
    except KeyboardInterrupt:
        results["error"] = "interrupted"
        status = 130
    except Exception as e:  # noqa: BLE001 - report whatever broke, after cleaning up
        results["error"] = f"{type(e).__name__}: {e}"
        results["traceback"] = traceback.format_exc()
        status = 2
    finally:
        errors = rig.error_log_lines()
        try:
            results["shutdown"] = rig.close()
        except KeyboardInterrupt:
            stop(rig.host, 2)
            stop(rig.fake, 2)
            status = 130
    results["host_error_log_lines"] = len(errors)
    results["host_error_log"] = errors[-30:]
    if status == 0 and failures(results):
        status = 1
    results["ok"] = status == 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_report(results)
    print(f"written to {args.out}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
