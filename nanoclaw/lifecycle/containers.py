"""The one place agents are started and stopped (so two wakes never start two agents).

Reads wake/kill requests from the central DB, spawns through the selected runtime with
a fresh per-session broker token, watches running agents, and after an agent ends
resets the rows it had claimed (backoff `5 s·2^tries`, failed after 5 tries; the user is
told). An agent that keeps dying before it does any work is respawned with the same
backoff and, after 5 failures, its pending messages fail with a message to the user.

Before a start the session folder is brought to the current layout (`sessiondb.create`),
an `outbound.db` the host refuses to read is set aside for a fresh one, the group folder
is made (and handed to the sandbox user) through `hostile.py`, and the agent's settings
are written to `db/container.json`, which only the host can write.

Time is passed in: `pass_once(now)` by the worker's loop, and `clock` (default
`time.time`) for the stamps taken inside an action (start-retry backoff, claimed rows'
retry times, what is due), so a test drives the backoff on a fake clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from nanoclaw import breaker, hostile, upstreams
from nanoclaw.agents import mounts
from nanoclaw.config import Settings
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.log import logger
from nanoclaw.runtime import Runtime, SpawnSpec, opencode
from nanoclaw.runtime.warm import WarmSpec
from nanoclaw.util import RUNNER_DIR, iso, token_hash

BROKER_START_S = 30.0  # time for a restarted broker to listen, beyond its breaker delay
BROKER_MAX_ATTEMPTS = 100  # far past the end of every breaker schedule
REWAKE_GAP = 10.0  # s: at most one wake right after a kill per session in this long


def broker_down_s() -> float:
    """The longest the breaker may keep the `broker` worker down between two starts:
    the longest step of the schedule its restart kind gets."""
    kind = breaker.restart_kind("broker")
    return max(breaker.delay_for(a, kind) for a in range(1, BROKER_MAX_ATTEMPTS))


def broker_wait_s() -> float:
    """How long an agent waits for an unreachable broker (container.json `broker_wait_s`):
    the longest the breaker may keep it down, plus its start. A runner given no bound
    waits the longest step of the slowest schedule, plus the start
    (agent_runner/config.py DEFAULT_BROKER_WAIT_S; tests/test_broker_outage.py checks)."""
    return broker_down_s() + BROKER_START_S


FAIL_TEXT = ("Sorry, your message could not be processed (the agent failed {n} times)."
             " The details are in logs/containers/{sid}/ on the host.")


def install_id(settings: Settings) -> str:
    return hashlib.sha1(str(settings.data_dir.resolve()).encode()).hexdigest()[:8]


class Containers:
    def __init__(self, store: Store, settings: Settings, runtime: Runtime,
                 clock: Callable[[], float] = time.time):
        self.store, self.settings, self.runtime = store, settings, runtime
        self.clock = clock
        self.install = install_id(settings)
        self.running: dict[str, str] = {}          # session id → container id
        self.failures: dict[str, int] = {}         # session id → consecutive failed starts
        self.rewoken: dict[str, float] = {}        # session id → last wake right after a kill
        self.retry_at: dict[str, float] = {}       # session id → not before
        self.version = -1

    # ---- start-up ---------------------------------------------------------------------
    def adopt(self) -> None:
        """Before any agent starts. An agent outlives its containers worker, or its whole
        host (`kill -9` of the orchestrator: the workers die with it, a process agent or a
        docker container does not): re-attach to each one the sessions table names and
        that still runs, so its session never gets a second one. Then stop every other
        agent of this install (the old pool's spares, an agent started but not yet
        recorded when its host died) and wait until they are gone; only then settle the
        sessions whose agent ended, which may start one again."""
        ended = []
        for s in self.store.running_sessions():
            cid = s["container_id"]
            if cid and cid not in self.running.values() and self.runtime.exit_code(cid) is None:
                self.running[s["id"]] = cid
                logger.info("re-attached to agent {} of session {}", cid, s["id"])
            else:
                ended.append(s)
        n = self.runtime.cleanup_orphans(self.install, set(self.running.values()))
        if n:
            logger.warning("stopped {} orphaned agent(s) of this install", n)
        for s in ended:
            self._ended(s, code=None)
        self.runtime.prewarm(WarmSpec(RUNNER_DIR, self.install, self.settings.logs_dir,
                                      self._providers()))

    # ---- one pass ---------------------------------------------------------------------
    def pass_once(self, now: float) -> bool:
        did = self._watch(now)
        did |= self.runtime.maintain()
        v = self.store.version()
        if v != self.version or self.retry_at:
            self.version = v
            did |= self._requests(now)
        return did

    def _requests(self, now: float) -> bool:
        reqs = self.store.open_container_requests()
        handled, did = [], False
        wanted: dict[str, list[str]] = {}
        for r in reqs:  # in order: a kill then a wake means "restart"
            wanted.setdefault(r["session_id"], []).append(r["action"])
        for sid, acts in wanted.items():
            if "kill" in acts:
                self.stop(sid, reason="kill requested")
                did = True
            if acts[-1] == "wake" and sid not in self.running:
                if self.retry_at.get(sid, 0) > now:
                    continue  # keep the request open until the backoff passes
                did |= self.wake(sid)
        for r in reqs:
            if not (r["action"] == "wake" and r["session_id"] not in self.running
                    and self.retry_at.get(r["session_id"], 0) > now):
                handled.append(r["id"])
        if handled:
            self.store.close_container_requests(handled)
        for sid in [s for s, t in self.retry_at.items() if t <= now and s not in wanted]:
            del self.retry_at[sid]
            s = self.store.session(sid)
            if s and sessiondb.SessionInbound(self._paths(s)).due_count(iso(now)):
                did |= self.wake(sid)
        return did

    def _watch(self, now: float) -> bool:
        did = False
        for sid, cid in list(self.running.items()):
            code = self.runtime.exit_code(cid)
            if code is None:
                continue
            del self.running[sid]
            s = self.store.session(sid)
            if s is not None:
                self._ended(s, code)
            did = True
        return did

    # ---- actions ----------------------------------------------------------------------
    def wake(self, sid: str) -> bool:
        s = self.store.session(sid)
        if s is None or sid in self.running:
            return False
        paths = self._paths(s)
        owner = self.settings.agent_owner()
        try:
            sessiondb.create(paths.root, owner)
        except (OSError, ValueError, sqlite3.DatabaseError) as e:
            logger.error("session {}: its folder is unusable: {}", sid, e)
            self._start_failed(s, str(e))
            return False
        if not sessiondb.SessionInbound(paths).due_count(iso(self.clock())):
            return False
        broker = self.store.get_state("broker_url")
        if not broker:
            logger.warning("session {}: broker not up yet; wake postponed", sid)
            self.retry_at[sid] = self.clock() + 0.5
            return False
        ag = self.store.agent_group(s["agent_group_id"])
        group_dir = self.settings.group_dir(ag["folder"])
        try:
            self.settings.groups_dir.mkdir(parents=True, exist_ok=True)  # the host's
            self._prepare_folders(sid, paths, group_dir, owner)
        except (OSError, ValueError) as e:
            logger.error("session {}: cannot prepare its folders: {}", sid, e)
            self._start_failed(s, str(e))
            return False
        self._write_config(s, ag, paths)
        sessiondb.SessionInbound(paths).write_routing(self._routing(s),
                                                      self.store.destinations(ag["id"]))
        token = secrets.token_urlsafe(32)
        spawn = f"{int(self.clock() * 1000)}"
        cfg = self.store.container_config(ag["id"])
        extra, refused = mounts.resolve(cfg.get("additional_mounts"), self.settings.mount_allowlist,
                                        mounts.protected(self.settings))
        for why in refused:
            logger.error("session {}: {}", sid, why)
        spec = SpawnSpec(
            session_id=sid, agent_group_id=ag["id"], session_dir=Path(paths.root).resolve(),
            group_dir=self.settings.groups_dir.resolve() / ag["folder"],
            global_dir=(self.settings.groups_dir / "global").resolve(),
            runner_dir=RUNNER_DIR, install_id=self.install,
            log_path=self.settings.logs_dir / "containers" / sid / f"{spawn}.log",
            env={"ANTHROPIC_BASE_URL": broker, "ANTHROPIC_API_KEY": token,
                 "TZ": self.settings.tz},
            image=cfg.get("image_tag") or None, extra_mounts=extra)
        # the broker must know the token before the agent can first use it
        self.store.set_container(sid, "running", None, token_hash(token))
        try:
            cid = self.runtime.spawn(spec)
        except Exception as e:
            self.store.set_container(sid, "stopped")
            logger.error("session {}: cannot start agent: {}", sid, e)
            self._start_failed(s, str(e))
            return False
        self.running[sid] = cid
        self.store.set_container(sid, "running", cid, token_hash(token))
        logger.info("session {}: agent started ({})", sid, cid)
        return True

    def stop(self, sid: str, reason: str) -> None:
        cid = self.running.pop(sid, None)
        if cid is None:
            s = self.store.session(sid)
            cid = s["container_id"] if s else None
        if cid:
            logger.info("session {}: stopping agent {} ({})", sid, cid, reason)
            self.runtime.stop(cid)
        s = self.store.session(sid)
        if s is not None:
            self._ended(s, code=None, killed=True)

    def stop_all(self) -> None:
        """Stop every agent at once (one by one would outlast the host's grace period)."""
        from concurrent.futures import ThreadPoolExecutor

        sids = list(self.running)
        if not sids:
            self.runtime.close()
            return
        with ThreadPoolExecutor(max_workers=min(32, len(sids))) as pool:
            list(pool.map(lambda sid: self.runtime.stop(self.running[sid]), sids))
        for sid in sids:
            self.running.pop(sid, None)
            s = self.store.session(sid)
            if s is not None:
                self._ended(s, code=None, killed=True, again=False)
        self.runtime.close()

    def _ended(self, s: dict[str, Any], code: int | None, killed: bool = False,
               again: bool = True) -> None:
        """Bookkeeping after an agent ended: state, claimed rows, respawn policy.

        Rows due when it ended wake it again, after a kill too (not at shutdown: `again`
        false): the router asks for no wake while an agent runs (`Router._wake`), so a
        message routed as it was being killed is served now, not at the sweep's next pass.
        The state is set first, before the count, for that router's sake. After a kill,
        only once per `REWAKE_GAP` s: an agent that gets itself killed at once (a refused
        `outbound.db`) is woken again no faster than the sweep's pass would."""
        sid = s["id"]
        self.store.set_container(sid, "stopped")
        paths = self._paths(s)
        if not Path(paths.inbound).exists():
            return
        try:
            inbound = sessiondb.SessionInbound(paths)
            inbound.sync_acks()
            touched = inbound.reset_stuck(self.clock(), self.settings.retry_base)
        except sqlite3.DatabaseError as e:
            logger.error("session {}: session database unusable: {}", sid, e)
            touched = []
        if code not in (None, 0) and not touched and not killed:
            logger.warning("session {}: agent exited ({}) without taking work", sid, code)
            self._start_failed(s, f"exit {code}")
            return
        if code not in (None, 0) or touched:
            logger.warning("session {}: agent ended ({}); {} claimed row(s) reset", sid,
                           "killed" if code is None else f"exit {code}", len(touched))
        self._tell_failed(s, [m for m, what in touched if what == "failed"])
        if code == 0 or touched == []:
            self.failures.pop(sid, None)
        if not again:
            return
        try:
            due = sessiondb.SessionInbound(paths).due_count(iso(self.clock()))
        except sqlite3.DatabaseError as e:
            logger.error("session {}: session database unusable: {}", sid, e)
            return
        if due and killed:
            now = self.clock()
            if now - self.rewoken.get(sid, -REWAKE_GAP) < REWAKE_GAP:
                return  # the sweep wakes it
            self.rewoken[sid] = now
        if due:
            self.wake(sid)

    def _start_failed(self, s: dict[str, Any], why: str) -> None:
        sid = s["id"]
        n = self.failures.get(sid, 0) + 1
        self.failures[sid] = n
        if n >= sessiondb.MAX_TRIES:
            self.failures.pop(sid, None)
            self.retry_at.pop(sid, None)
            failed = self._fail_pending(s)
            logger.error("session {}: agent failed to start {} times ({}); {} message(s) failed",
                         sid, n, why, len(failed))
            self._tell_failed(s, failed)
            return
        delay = self.settings.retry_base * 2 ** (n - 1)
        self.retry_at[sid] = self.clock() + delay
        logger.warning("session {}: agent start failed ({}); retry {} in {:.0f}s", sid, why, n,
                       delay)

    def _fail_pending(self, s: dict[str, Any]) -> list[str]:
        return sessiondb.SessionInbound(self._paths(s)).fail_pending_triggers()

    def _tell_failed(self, s: dict[str, Any], message_ids: list[str]) -> None:
        """Never fail silently: each failed message gets a reply in its own chat, queued
        straight to the channel (the session's own databases may be what is broken)."""
        paths = self._paths(s)
        for mid in message_ids:
            row = sessiondb.SessionInbound(paths).message(mid)
            if row is None or not row["platform_id"] or row["channel_type"] == "agent":
                continue
            if not self.store.may_send(s, row["channel_type"], row["platform_id"]):
                logger.error("session {}: failure notice for {} not sent: {}:{} is not a chat"
                             " of this session", s["id"], mid, row["channel_type"],
                             row["platform_id"])
                continue
            text = FAIL_TEXT.format(n=max(row["tries"], 1), sid=s["id"])
            self.store.enqueue_send(f"{s['id']}:failed:{mid}", row["channel_type"],
                                    row["platform_id"], row["thread_id"], "chat", {"text": text},
                                    session_id=s["id"], message_out_id=f"failed:{mid}",
                                    in_reply_to=mid)

    # ---- helpers ----------------------------------------------------------------------
    def _providers(self) -> list[str]:
        """The providers warm agents import ahead: the default and every group's."""
        names = {self.settings.provider} | {p.strip().lower() for p in self.store.providers_in_use()}
        return sorted(names & {"claude", "anthropic", "openai", "opencode"})

    def _paths(self, s: dict[str, Any]) -> sessiondb.SessionPaths:
        return sessiondb.of(self.settings, s)

    def _routing(self, s: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
        own = self.store.own_chat(s)
        return (*own, s["thread_id"]) if own else (None, None, None)

    @staticmethod
    def _prepare_folders(sid: str, paths: sessiondb.SessionPaths, group_dir: Path,
                         owner: tuple[int, int] | None) -> None:
        """The agent's folders, by descriptor: the group folder made (or handed over
        whole when it belongs to someone else, e.g. after `agent_uid` changed), the last
        heartbeat gone, and an outbound.db the host refuses set aside."""
        with hostile.Folder.open(group_dir, create=True, owner=owner) as g:
            st = os.fstat(g.fd)
            if owner is not None and (st.st_uid, st.st_gid) != owner:
                n = g.adopt(*owner)
                logger.info("group folder {} handed to uid {} ({} entries)", group_dir.name,
                            owner[0], n)
        with paths.work_folder() as work:
            work.remove(sessiondb.HEARTBEAT)
        why = sessiondb.reset_outbound(paths, owner)
        if why:
            logger.warning("session {}: outbound.db set aside ({}); the agent starts with a"
                           " fresh one", sid, why)

    def _write_config(self, s: dict[str, Any], ag: dict[str, Any],
                      paths: sessiondb.SessionPaths) -> None:
        cfg = self.store.container_config(ag["id"])
        provider = upstreams.group_provider(s, cfg, ag)
        upstream, fallback_upstream = upstreams.group_upstreams(provider, cfg, self.settings)
        known = upstreams.configured(self.settings)
        data = {"provider": provider, "model": cfg.get("model") or self.settings.model,
                # where the broker forwards its calls (<broker>/up/NAME) and in which API
                "upstream": upstream, "upstream_api": getattr(known.get(upstream), "api", None),
                "fallback_upstream": fallback_upstream,
                "fallback_upstream_api": getattr(known.get(fallback_upstream or ""), "api",
                                                 None),
                # the pinned OpenCode binary as the agent sees it: the host's cache
                # (process; bwrap binds it in), the agent image's own (docker)
                "opencode_bin": opencode.agent_path(self.runtime.name)
                if provider == "opencode" else None,
                "fallback_model": cfg.get("fallback_model") or self.settings.fallback_model
                or None,
                "assistant_name": cfg.get("assistant_name") or self.settings.assistant_name,
                "agent_group_id": ag["id"], "effort": cfg.get("effort"),
                "max_messages_per_prompt": cfg.get("max_messages_per_prompt") or 10,
                # JSON text in the table; the runner parses and checks both
                "mcp_servers": cfg.get("mcp_servers") or {}, "skills": cfg.get("skills") or "all",
                # what the agent is shown; the host enforces it (agent_cli.py) either way
                "cli_scope": cfg.get("cli_scope") or "group",
                # the runner waits this long for a broker the breaker keeps down
                "broker_wait_s": broker_wait_s(),
                "model_stall_s": self.settings.model_stall_timeout,
                "claude_idle_s": self.settings.claude_idle_s}
        tmp = paths.config + ".tmp"  # db/ is the host's: the agent cannot touch either
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2))
        os.chmod(tmp, 0o644)
        os.replace(tmp, paths.config)
