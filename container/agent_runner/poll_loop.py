"""The poll loop: notice new rows, claim a batch, ask the provider, write the answers.

`loop_once(now)` does one unit of work; `agent_runner.main` owns the forever loop, the
stop flag and the sleep between polls. While a query is open, new messages are claimed
and pushed into it instead of waiting for the next turn. Fixes over the original
(reference §8): `system` rows are filtered out *before* the per-prompt limit (they used
to starve chat); rows written by tools carry the batch's `in_reply_to`; a busy model is
a visible "retrying" notice and a failure an `Error:` row with the batch completed
(never silence); unknown destinations go back to the agent; bare text gets one nudge and
then a fallback to the one plausible destination instead of vanishing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from agent_runner import inbox, memory
from agent_runner.batch import Batch
from agent_runner.config import Config
from agent_runner.db import Address, ClaimFailed, Inbound, InboundRow, Outbound, utcnow
from agent_runner.formatter import format_batch, system_prompt
from agent_runner.providers import (
    REGISTRY,
    Error,
    Idle,
    Init,
    Notice,
    Provider,
    ProviderError,
    ProviderUnavailable,
    QueryInput,
    Result,
    Retrying,
    ToolEnd,
    ToolStart,
    Waiting,
)
from agent_runner.replies import NUDGE, correction, parse_reply
from agent_runner.scripts import run_script
from agent_runner.tools import Toolbox

log = logging.getLogger("agent_runner")

SAFETY_NET_S = 1.0  # read rows at least this often even if the file looks unchanged
FOLLOW_UP_S = 0.02  # while a query is open, look for new rows at most this often
COMMANDS = ("/clear", "/compact")
WAIT_NOTICE_S = 30.0  # the user hears once that the answer waits for the host's broker


class Shutdown(BaseException):
    """Stop requested mid-batch; not an `Exception`, so no handler swallows it."""


@dataclass
class TurnState:
    batch: Batch
    claimed: list[str] = field(default_factory=list)
    completed: set[str] = field(default_factory=set)  # marked so with the answer already
    pending: list[InboundRow] = field(default_factory=list)  # pushed, not yet answered
    raw_command: bool = False
    corrected: bool = False
    nudged: bool = False
    first_bare: str = ""
    written: int = 0
    retry_noticed: bool = False
    wait_noticed: bool = False
    follow_signal: tuple[int, int, int] | None = None
    follow_read: float = 0.0


def disk_full(e: BaseException) -> bool:
    """An error that says the disk is full (a file write, or SQLite's)."""
    import errno
    import sqlite3

    if isinstance(e, sqlite3.OperationalError):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def touch(path: str) -> None:
    """The heartbeat: its own mtime, never a file a link there points at."""
    try:
        os.utime(path, follow_symlinks=False)
    except FileNotFoundError:
        with open(path, "a"):
            pass


def command(row: InboundRow) -> str | None:
    text = row.text.strip() if row.kind in ("chat", "chat-sdk") else ""
    return text if text in COMMANDS else None


class PollLoop:
    def __init__(self, config: Config, should_stop: Callable[[], bool] = lambda: False) -> None:
        self.config = config
        self.should_stop = should_stop
        self.inbound = Inbound(config.inbound)
        self.outbound = Outbound(config.outbound, self.inbound, config.session_dir)
        self.tools = Toolbox(config, self.inbound, self.outbound, should_stop,
                             heartbeat=lambda: touch(config.heartbeat))
        self.provider: Provider | None = None
        self.provider_error: ProviderError | None = None
        self.continuation: str | None = None
        self.composed = ""
        self.first_poll = True
        self._signal: tuple[int, int, int] | None = None
        self._last_read = float("-inf")
        self._state_key = f"continuation:{config.provider}"

    # -- lifecycle
    def initialize(self) -> None:
        stale = self.outbound.delete_stale_claims()
        self.composed = memory.compose(self.config)
        try:
            self.provider = REGISTRY.factory(self.config.provider)(self.config)
        except ProviderError as exc:
            self.provider_error = exc
        except ImportError as exc:
            self.provider_error = ProviderUnavailable(
                f"provider {self.config.provider!r} cannot load: {exc}")
        if self.provider_error:
            log.error("provider unavailable provider=%s error=%s", self.config.provider,
                      self.provider_error)
        self.continuation = self.outbound.get_state(self._state_key)
        log.info("started provider=%s model=%s stale_claims=%d resumed=%s",
                 self.config.provider, self.config.model, stale, bool(self.continuation))

    def shutdown(self) -> None:
        if self.provider is not None:
            try:
                self.provider.close()
            except Exception:  # closing must never turn a clean stop into a crash
                log.exception("provider close failed")
        log.info("stopped")

    def loop_once(self, now: float) -> bool:
        """Read rows if inbound.db moved (or the safety net is due) and answer one batch.
        Returns True when anything happened, so the caller keeps polling fast."""
        signal = self.inbound.change_signal()
        moved = signal != self._signal
        if not (moved or self.first_poll or now - self._last_read >= SAFETY_NET_S):
            self.idle()
            return False
        self._signal, self._last_read = signal, now
        rows = self.fetch()
        if not any(r.trigger for r in rows):
            self.idle()
            return moved
        self.handle(rows)
        return True

    def idle(self) -> None:
        """Nothing to answer: a provider may give back what it keeps between queries
        (`claude`: its CLI, after `claude_idle_s`)."""
        idle = getattr(self.provider, "idle", None)
        if idle is not None:
            idle()

    # -- fetch and claim
    def fetch(self) -> list[InboundRow]:
        """Pending, due, unacked non-system rows: the newest N, oldest first."""
        rows = self.inbound.unanswered(utcnow(), self.first_poll, self.outbound.path,
                                       self.config.max_messages_per_prompt)
        self.first_poll = False
        rows.reverse()
        return rows

    def handle(self, rows: list[InboundRow]) -> None:
        cmd_at = next((i for i, r in enumerate(rows) if command(r)), None)
        if cmd_at is not None:
            rows = rows[: cmd_at + 1]
        # the rows were read at `self._signal`: the query's first look for follow-ups
        # waits for the file to move (or FOLLOW_UP_S), instead of reading them again
        state = TurnState(Batch(rows, *self.inbound.addressing()),
                          follow_signal=self._signal, follow_read=time.monotonic())
        self.claim(state, rows, beside=True)  # committed while the request is made
        log.info("batch claimed n=%d first_seq=%d last_seq=%d", len(rows), rows[0].seq,
                 rows[-1].seq)
        self.tools.begin(state.batch)
        try:
            cmd = command(rows[-1]) if cmd_at is not None else None
            if cmd == "/clear":
                self.clear_session(state)
            elif cmd == "/compact":
                self.compact(state)
            else:
                ready = self.prepare(rows)
                state.batch = dataclasses.replace(state.batch, rows=ready)
                self.tools.begin(state.batch)
                if any(r.trigger for r in ready):
                    self.answer(state)
                else:  # only context rows are left (a task's script said no): they wait
                    context = [r.id for r in ready]
                    self.outbound.release(context)
                    state.claimed = [i for i in state.claimed if i not in context]
        except Shutdown:
            if state.written or self.tools.sent:
                self.complete_rest(state)
            else:
                self.outbound.release(state.claimed)
            log.info("batch interrupted by shutdown n=%d", len(state.claimed))
            raise
        self.complete_rest(state)
        log.info("batch completed n=%d replies=%d", len(state.claimed),
                 state.written + self.tools.sent)

    def complete_rest(self, state: TurnState) -> None:
        """Mark the batch's rows completed, but those the answer's own transaction did
        (one commit fewer per turn, `deliver`)."""
        rest = [i for i in state.claimed if i not in state.completed]
        if rest:
            self.outbound.complete(rest)

    def claim(self, state: TurnState, rows: list[InboundRow], beside: bool = False) -> None:
        (self.outbound.claim_beside if beside else self.outbound.claim)(r.id for r in rows)
        state.claimed += [r.id for r in rows]
        touch(self.config.heartbeat)

    def prepare(self, rows: list[InboundRow]) -> list[InboundRow]:
        """Attachments into the inbox, task scripts run: the rows for the model. A task
        whose script says no is completed here without a model call."""
        ready, done = [], []
        for row in rows:
            row = inbox.prepare(row, self.config.session_dir)
            script = row.content.get("script") if row.kind == "task" else None
            if script and "scriptOutput" not in row.content:
                result = run_script(str(script), self.config.group_dir, self.should_stop)
                if self.should_stop():  # a killed script says nothing about the task
                    raise Shutdown()
                if not result.wake:
                    log.info("task not woken id=%s reason=%s", row.id,
                             result.error or "wakeAgent false")
                    done.append(row.id)
                    continue
                row = dataclasses.replace(row, content={**row.content,
                                                        "scriptOutput": result.data})
            ready.append(row)
        if done:
            self.outbound.complete(done)
        return ready

    # -- commands
    def clear_session(self, state: TurnState) -> None:
        if self.continuation and self.provider is not None:
            self.provider.forget(self.continuation)
        self.set_continuation(None)
        log.info("session cleared")
        self.notify(state, "Session cleared.")

    def compact(self, state: TurnState) -> None:
        if self.provider is None or not self.provider.supports_native_slash_commands:
            self.notify(state, f"/compact is not available with the {self.config.provider!r}"
                               " provider; /clear starts afresh.")
            return
        if not self.continuation:
            self.notify(state, "Nothing to compact yet.")
            return
        state.raw_command = True
        err = self.run_query(state, "/compact", self.system(state.batch))
        self.notify(state, f"Error: {err}" if err else "Conversation compacted.",
                    "error" if err else None)

    # -- the query
    def system(self, batch: Batch) -> str:
        reads_md = getattr(self.provider, "reads_claude_md", False)
        return system_prompt(self.config.assistant_name, batch.destinations,
                             self.config.group_dir,
                             "" if reads_md else memory.memory(self.config, self.composed))

    def answer(self, state: TurnState) -> None:
        if self.provider is None:
            self.notify(state, f"Error: {self.provider_error}", "error")
            return
        attempt = 0
        while attempt < 2:
            attempt += 1
            self.absorb(state)
            prompt = format_batch(state.batch.rows, state.batch.destinations, self.config.tz)
            written = state.written
            try:
                err = self.run_query(state, prompt, self.system(state.batch))
            except ClaimFailed:  # nothing of this turn is written: its rows stay pending
                raise
            except Exception as exc:  # a bug must still reach the user, not kill the loop
                if disk_full(exc) and state.written == written:
                    # the host's fault, not the user's: nothing was answered yet, so wait
                    # for space and answer again (one more model call, never an error)
                    log.error("no space left for the session's files (%s): waiting for"
                              " space, then answering again", exc)
                    self.wait_for_space()
                    attempt -= 1
                    continue
                log.exception("query crashed")
                err = ProviderError(f"internal error: {type(exc).__name__}: {exc}")
            if err is None:
                if memory.welcomed(self.config):  # introduced: not again, anywhere
                    self.composed = memory.compose(self.config)
                return
            if attempt == 1 and self.provider.is_session_invalid(err):
                log.warning("continuation unusable, starting fresh error=%s", err)
                self.set_continuation(None)
                continue
            log.warning("query failed classification=%s error=%s",
                        getattr(err, "classification", "error"), err)
            self.notify(state, f"Error: {err}", "error")
            return

    def wait_for_space(self, need: int = 1 << 20) -> None:
        """Until the session's folder has `need` bytes free again (the heartbeat kept
        fresh, so the host does not take a wait for a hang; a stop ends it)."""
        where = os.path.dirname(self.config.heartbeat) or "."
        while True:
            st = os.statvfs(where)
            if st.f_bavail * st.f_frsize >= need:
                log.warning("space again: carrying on")
                return
            touch(self.config.heartbeat)
            if self.should_stop():
                raise Shutdown()
            time.sleep(1.0)

    def run_query(self, state: TurnState, prompt: str, system: str) -> ProviderError | None:
        assert self.provider is not None
        query = self.provider.query(QueryInput(prompt, self.continuation,
                                               self.config.group_dir, system, self.tools))
        events = query.events()
        try:
            for ev in events:
                if not isinstance(ev, Idle):
                    touch(self.config.heartbeat)
                if self.should_stop():
                    query.abort()
                    raise Shutdown()
                if isinstance(ev, Init):
                    self.set_continuation(ev.continuation)
                elif isinstance(ev, ToolStart):
                    log.info("tool start name=%s", ev.name)
                    self.outbound.set_current_tool(ev.name, ev.timeout_ms)
                elif isinstance(ev, ToolEnd):
                    self.outbound.set_current_tool(None)
                elif isinstance(ev, Retrying):
                    self.retrying(state, ev)
                elif isinstance(ev, Waiting):  # (the heartbeat above keeps the sweep off)
                    self.waiting(state, ev)
                elif isinstance(ev, Notice):
                    log.info("notice for the user text=%s", ev.text[:200])
                    self.notify(state, ev.text, "notice")
                elif isinstance(ev, Error):
                    return ev.error
                elif isinstance(ev, Result):
                    if not ev.more:  # this result answers the pushed rows too
                        self.absorb(state)
                    follow = None if state.raw_command else self.deliver(
                        state, ev.text, final=not ev.more)
                    self.absorb(state)  # the next turn is about them
                    if follow:
                        query.push(follow)
                    elif not ev.more and not self.follow_up(query, state, force=True):
                        query.end()
                    continue
                self.follow_up(query, state)
        finally:
            events.close()
        return None

    def follow_up(self, query, state: TurnState, force: bool = False) -> bool:
        """Claim rows that arrived while the query is open and push them into it.
        Commands (/clear) are left for the outer loop, after this query ends."""
        if state.raw_command:
            return False
        now = time.monotonic()
        if not force and now - state.follow_read < FOLLOW_UP_S:
            return False
        signal = self.inbound.change_signal()
        if signal == state.follow_signal and now - state.follow_read < SAFETY_NET_S:
            return False
        state.follow_signal, state.follow_read = signal, now
        rows = [r for r in self.fetch() if r.id not in state.claimed]
        if not any(r.trigger for r in rows) or any(command(r) for r in rows):
            return False
        self.claim(state, rows)
        ready = self.prepare(rows)
        if not any(r.trigger for r in ready):
            self.outbound.release(r.id for r in ready)
            state.claimed = [i for i in state.claimed if i not in {r.id for r in ready}]
            return False
        state.pending += ready
        query.push(format_batch(ready, self.inbound.destinations(), self.config.tz))
        log.info("follow-up pushed n=%d last_seq=%d", len(ready), ready[-1].seq)
        return True

    def absorb(self, state: TurnState) -> None:
        """Pushed rows join the batch once the model has them (addressing, tools)."""
        if not state.pending:
            return
        state.batch = state.batch.extend(state.pending, *self.inbound.addressing())
        state.pending = []
        state.corrected = state.nudged = False  # new messages deserve their own answer
        self.tools.extend(state.batch)
        self.tools.ctx.sent = 0

    def retrying(self, state: TurnState, ev: Retrying) -> None:
        log.warning("model busy, retrying attempt=%d max=%d delay_s=%.1f reason=%s",
                    ev.attempt, ev.max_attempts, ev.delay_s, ev.reason)
        if not state.retry_noticed and ev.status is not None:  # a blip of the connection
            state.retry_noticed = True  # (the broker restarting) is not worth a message
            self.notify(state, f"The host cannot reach the model API just now ({ev.reason});"
                        " retrying…" if ev.unreachable else
                        f"The model is busy ({ev.reason}); retrying…", "notice")

    def waiting(self, state: TurnState, ev: Waiting) -> None:
        """The broker is down (a host worker restarting): no error, and after a while
        one word so the user knows the answer is coming."""
        log.debug("waiting for the %s waited_s=%.1f limit_s=%.0f", ev.what, ev.waited_s,
                  ev.limit_s)
        if not state.wait_noticed and ev.waited_s >= WAIT_NOTICE_S:
            state.wait_noticed = True
            self.notify(state, "(The host is restarting its connection to the model; I will"
                               " answer as soon as it is back.)", "notice")

    def set_continuation(self, value: str | None) -> None:
        if value == self.continuation:
            return
        if value is None:
            self.outbound.delete_state(self._state_key)
        else:
            self.outbound.set_state(self._state_key, value)
        self.continuation = value

    # -- output
    def deliver(self, state: TurnState, text: str, final: bool = True) -> str | None:
        """Write the result's `<message>` blocks; return a follow-up to push, if any. A
        `final` result that answers in full (every block has its destination) marks the
        batch's rows completed in the same transaction as the answer, so a kill -9 right
        after it neither loses the answer nor has the next runner answer again."""
        batch = state.batch
        parsed = parse_reply(text)
        unknown, blocks = [], []
        for name, body in parsed.blocks:
            dest = batch.destination(name)
            if dest is None:
                unknown.append(name)
                continue
            address, reply_to = batch.address_for(dest.channel)
            blocks.append((address, body, reply_to or batch.asker_id))
        claimed = set(state.claimed)
        answered = [r.id for r in batch.rows if r.id in claimed] \
            if final and blocks and not unknown else []
        if blocks:
            written = self.outbound.write_answer(
                [("chat", {"text": body}, address, reply_to, None)
                 for address, body, reply_to in blocks], answered)
            state.completed.update(answered)
            for (out_id, seq), (address, _, _) in zip(written, blocks):
                state.written += 1
                log.info("reply written id=%s seq=%d channel=%s", out_id, seq,
                         address.channel_type)
        if unknown:
            if not state.corrected:
                state.corrected = True
                log.info("unknown destinations reported to agent names=%s", unknown)
                return correction(unknown, [d.name for d in batch.destinations])
            log.warning("unknown destinations after correction names=%s", unknown)
        if parsed.blocks or self.tools.sent:
            return None
        if not state.nudged:
            if not parsed.bare:
                log.info("result with nothing to send")
                return None
            state.nudged, state.first_bare = True, parsed.bare
            log.info("bare reply, nudging agent")
            return NUDGE
        target = batch.sole_origin()
        if target is None:
            log.warning("bare reply lost: no single plausible destination")
            return None
        log.warning("bare reply delivered to origin after nudge")
        self.write(state, target[0], state.first_bare, target[1])
        return None

    def notify(self, state: TurnState, text: str, status: str | None = None) -> None:
        """A line from the runner itself to the chat that asked: the answer to a command
        (`status` None), a word while the answer is on its way (`notice`) or the turn's
        failure (`error`); `status` lets a client that waits for the answer tell them
        apart (`nanoclaw send`)."""
        target = state.batch.origin()
        if target is None:
            log.error("nowhere to send notice text=%s", text[:200])
            return
        self.write(state, target[0], text, target[1], status)

    def write(self, state: TurnState, address: Address, text: str,
              reply_to: str | None, status: str | None = None) -> None:
        content = {"text": text, **({"status": status} if status else {})}
        out_id, seq = self.outbound.write_message("chat", content, address, reply_to)
        state.written += 1
        log.info("reply written id=%s seq=%d channel=%s", out_id, seq, address.channel_type)
