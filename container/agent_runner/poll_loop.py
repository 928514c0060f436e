"""The poll loop: notice new rows, claim a batch, ask the provider, write the answers.

`loop_once(now)` does one unit of work; `agent_runner.main` owns the forever loop, the
stop flag and the sleep between polls. Fixes over the original (reference §8): `system`
rows are filtered out *before* the per-prompt limit (they used to starve chat), every
failure becomes a visible `Error:` row with the batch completed (never silence), unknown
destinations go back to the agent, and bare text gets one nudge and then a fallback to
the one plausible destination instead of vanishing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from agent_runner.batch import Batch
from agent_runner.config import Config
from agent_runner.db import Address, Inbound, InboundRow, Outbound, utcnow
from agent_runner.formatter import format_batch, system_prompt
from agent_runner.providers import (
    REGISTRY, Error, Init, Provider, ProviderError, ProviderUnavailable, QueryInput, Result,
    ToolEnd, ToolStart,
)
from agent_runner.replies import NUDGE, correction, parse_reply
from agent_runner.tools import Toolbox

log = logging.getLogger("agent_runner")

SAFETY_NET_S = 1.0  # read rows at least this often even if the file looks unchanged
CLEAR_COMMAND = "/clear"


class Shutdown(BaseException):
    """Stop requested mid-batch; not an `Exception`, so no handler swallows it."""


@dataclass
class TurnState:
    corrected: bool = False
    nudged: bool = False
    first_bare: str = ""
    written: int = 0


def touch(path: str) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        with open(path, "a"):
            pass


def is_clear(row: InboundRow) -> bool:
    return row.kind in ("chat", "chat-sdk") and row.text.strip() == CLEAR_COMMAND


class PollLoop:
    def __init__(self, config: Config, should_stop: Callable[[], bool] = lambda: False) -> None:
        self.config = config
        self.should_stop = should_stop
        self.inbound = Inbound(config.inbound)
        self.outbound = Outbound(config.outbound, self.inbound)
        self.tools = Toolbox(config, self.outbound, should_stop)
        self.provider: Provider | None = None
        self.provider_error: ProviderError | None = None
        self.continuation: str | None = None
        self.first_poll = True
        self._signal: tuple[int, int, int] | None = None
        self._last_read = float("-inf")
        self._state_key = f"continuation:{config.provider}"

    # -- lifecycle
    def initialize(self) -> None:
        stale = self.outbound.delete_stale_claims()
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
        log.info("stopped")

    def loop_once(self, now: float) -> bool:
        """Read rows if inbound.db moved (or the safety net is due) and answer one batch.
        Returns True when anything happened, so the caller keeps polling fast."""
        signal = self.inbound.change_signal()
        moved = signal != self._signal
        if not (moved or self.first_poll or now - self._last_read >= SAFETY_NET_S):
            return False
        self._signal, self._last_read = signal, now
        rows = self.fetch()
        if not any(r.trigger for r in rows):
            return moved
        self.handle(rows)
        return True

    # -- fetch and claim
    def fetch(self) -> list[InboundRow]:
        """Pending, due, unacked non-system rows: the newest N, oldest first."""
        rows = self.inbound.pending(utcnow(), include_on_wake=self.first_poll)
        self.first_poll = False
        acked = self.outbound.acked(r.id for r in rows)
        rows = [r for r in rows if r.id not in acked][: self.config.max_messages_per_prompt]
        rows.reverse()
        return rows

    def handle(self, rows: list[InboundRow]) -> None:
        clear_at = next((i for i, r in enumerate(rows) if is_clear(r)), None)
        if clear_at is not None:
            rows = rows[: clear_at + 1]
        batch = Batch(rows, self.inbound.destinations(), self.inbound.routing())
        self.outbound.claim(batch.ids)
        log.info("batch claimed n=%d first_seq=%d last_seq=%d", len(rows), rows[0].seq,
                 rows[-1].seq)
        state = TurnState()
        self.tools.begin(batch)
        try:
            if clear_at is not None:
                self.clear_session(batch, state)
            else:
                self.answer(batch, state)
        except Shutdown:
            if state.written or self.tools.sent:
                self.outbound.complete(batch.ids)
            else:
                self.outbound.release(batch.ids)
            log.info("batch interrupted by shutdown n=%d", len(rows))
            raise
        self.outbound.complete(batch.ids)
        log.info("batch completed n=%d replies=%d", len(rows), state.written + self.tools.sent)

    # -- commands
    def clear_session(self, batch: Batch, state: TurnState) -> None:
        if self.continuation and self.provider is not None:
            self.provider.forget(self.continuation)
        self.set_continuation(None)
        log.info("session cleared")
        self.notify(batch, "Session cleared.", state)

    # -- the query
    def answer(self, batch: Batch, state: TurnState) -> None:
        if self.provider is None:
            self.notify(batch, f"Error: {self.provider_error}", state)
            return
        prompt = format_batch(batch.rows, batch.destinations, self.config.tz)
        system = system_prompt(self.config.assistant_name, batch.destinations,
                               self.config.group_dir, self.config.global_dir)
        for attempt in (1, 2):
            try:
                err = self.run_query(batch, prompt, system, state)
            except Exception as exc:  # a bug must still reach the user, not kill the loop
                log.exception("query crashed")
                err = ProviderError(f"internal error: {type(exc).__name__}: {exc}")
            if err is None:
                return
            if attempt == 1 and self.provider.is_session_invalid(err):
                log.warning("continuation unusable, starting fresh error=%s", err)
                self.set_continuation(None)
                continue
            log.warning("query failed classification=%s error=%s",
                        getattr(err, "classification", "error"), err)
            self.notify(batch, f"Error: {err}", state)
            return

    def run_query(self, batch: Batch, prompt: str, system: str,
                  state: TurnState) -> ProviderError | None:
        assert self.provider is not None
        query = self.provider.query(QueryInput(prompt, self.continuation,
                                               self.config.group_dir, system, self.tools))
        events = query.events()
        try:
            for ev in events:
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
                elif isinstance(ev, Result):
                    follow_up = self.deliver(batch, ev.text, state)
                    if follow_up:
                        query.push(follow_up)
                    else:
                        query.end()
                elif isinstance(ev, Error):
                    return ev.error
        finally:
            events.close()
        return None

    def set_continuation(self, value: str | None) -> None:
        if value == self.continuation:
            return
        if value is None:
            self.outbound.delete_state(self._state_key)
        else:
            self.outbound.set_state(self._state_key, value)
        self.continuation = value

    # -- output
    def deliver(self, batch: Batch, text: str, state: TurnState) -> str | None:
        """Write the result's `<message>` blocks; return a follow-up to push, if any."""
        parsed = parse_reply(text)
        unknown = []
        for name, body in parsed.blocks:
            dest = batch.destination(name)
            if dest is None:
                unknown.append(name)
                continue
            address, reply_to = batch.address_for(dest.channel)
            self.write(address, body, reply_to, state)
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
        self.write(target[0], state.first_bare, target[1], state)
        return None

    def notify(self, batch: Batch, text: str, state: TurnState) -> None:
        target = batch.origin()
        if target is None:
            log.error("nowhere to send notice text=%s", text[:200])
            return
        self.write(target[0], text, target[1], state)

    def write(self, address: Address, text: str, reply_to: str | None,
              state: TurnState) -> None:
        out_id, seq = self.outbound.write_message("chat", {"text": text}, address, reply_to)
        state.written += 1
        log.info("reply written id=%s seq=%d channel=%s", out_id, seq, address.channel_type)
