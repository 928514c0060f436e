"""The `claude` provider: claude-agent-sdk driving its bundled Claude Code CLI.

The SDK is asynchronous and keeps the CLI process open between turns, so one `_Live`
session (a `ClaudeSDKClient` on its own asyncio thread) serves every query while the
system prompt and continuation stay the same: a warm container answers without
starting the CLI again. Its messages reach the poll loop through a queue, mapped to
provider events; each prompt carries a uuid, and a result says which prompts it
answered, so pushed messages the CLI folds into a running turn are not waited for twice.
An idle CLI is given back: when the poll loop has nothing to answer it calls `idle()`,
and after `claude_idle_s` (container.json) since the last query ended the CLI is closed
(it flushes the conversation file and exits; the runner stays). The next query starts
it again with `--resume` of the same session, so only the files remain of an idle
conversation. Both run on the poll loop's thread, so a message that arrives while the
CLI closes waits for it (and its flushed file) before the CLI is started again.

The nanoclaw tools run in this process as the SDK MCP server `nanoclaw`; the CLI keeps
its own shell and file tools, with the cron, plan, worktree and question tools blocked
(the host owns scheduling and questions). Permissions are bypassed: the sandbox is the
boundary. A PreCompact hook archives the transcript to `conversations/` and, when the
CLI compacts on its own, tells the user (a `Notice`). The CLI gets
the non-secret environment it needs to run offline and quietly; the credential and
the broker's address come from the runner's own environment. The CLI retries a failed
call itself (`CLAUDE_CODE_MAX_RETRIES`); a turn that still failed with no HTTP answer
behind it (connection refused or dropped) makes the runner ask whether the broker is
down or was restarted (`agent_runner/broker.py`): it then waits for it (`Waiting`
events, up to `broker_wait_s`) and sends the turn's prompt again instead of an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import deque
from typing import Any, AsyncIterator, Iterator

from agent_runner import archive, broker
from agent_runner.config import Config
from agent_runner.providers import (
    Activity, Error, Event, Idle, Init, Notice, ProviderError, ProviderUnavailable, QueryInput,
    Result, Retrying, StaleSession, ToolEnd, ToolStart,
)

log = logging.getLogger("agent_runner")

try:
    import claude_agent_sdk as sdk
except ImportError as exc:  # pragma: no cover - depends on the image
    sdk = None
    IMPORT_ERROR = str(exc)

STALE = re.compile(r"no conversation found|ENOENT.*jsonl|session.*not found", re.I)
ALLOWED_TOOLS = [
    "Bash", "Read", "Write", "Edit", "Glob", "Grep", "WebSearch", "WebFetch", "Task", "Agent",
    "TaskOutput", "TaskStop", "TeamCreate", "TeamDelete", "SendMessage", "TodoWrite",
    "ToolSearch", "Skill", "NotebookEdit",
]
BLOCKED_TOOLS = [
    "CronCreate", "CronDelete", "CronList", "ScheduleWakeup", "AskUserQuestion",
    "EnterPlanMode", "ExitPlanMode", "EnterWorktree", "ExitWorktree",
]
# Compaction summarises the history; without this the summary drops the message XML
# (ids, senders, `in_reply_to`) the agent needs to address replies after it.
KEEP_ON_COMPACT = (
    "Keep the messaging context exact: for each message still relevant, keep its <message>"
    " XML attributes (id, from, sender, channel, thread, time) verbatim, who is waiting for"
    " an answer, and any destinations or open questions. Summarise the rest.")

CLI_ENV = {  # defaults; the environment wins (tests lower the retries)
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "ENABLE_TOOL_SEARCH": "false",
    "CLAUDE_CODE_AUTO_COMPACT_WINDOW": "165000", "CLAUDE_CODE_MAX_RETRIES": "4",
    "MCP_TOOL_TIMEOUT": "3700000",  # ask_user_question may wait up to an hour
}
IDLE_TICK_S = 0.05
CONNECT_TIMEOUT_S = 120.0
SEND_TIMEOUT_S = 30.0
BUSY = {429: "rate limited", 529: "overloaded"}


def _user_message(text: str, uid: str) -> dict[str, Any]:
    return {"type": "user", "message": {"role": "user", "content": text},
            "parent_tool_use_id": None, "session_id": "default", "uuid": uid}


async def _one(message: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield message


class _Live:
    """One connected ClaudeSDKClient, driven from its own thread and event loop."""

    def __init__(self, options: Any, key: tuple, session_id: str) -> None:
        self.key = key
        self.session_id = session_id
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.closed = False
        self._loop = asyncio.new_event_loop()
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._client: Any = None
        self._thread = threading.Thread(target=self._run, args=(options,), name="claude-sdk",
                                        daemon=True)
        self._thread.start()
        try:
            self._ready.result(timeout=CONNECT_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _run(self, options: Any) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(options))
        finally:
            self._loop.close()

    async def _main(self, options: Any) -> None:
        self._stop = asyncio.Event()
        client = sdk.ClaudeSDKClient(options)
        try:
            await client.connect()
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._client = client
        self._ready.set_result(None)
        reader = asyncio.ensure_future(self._read(client))
        await self._stop.wait()
        reader.cancel()
        try:
            await asyncio.wait_for(client.disconnect(), 10)
        except BaseException as exc:  # the CLI is going away anyway
            log.info("claude cli disconnect error=%s", exc)

    async def _read(self, client: Any) -> None:
        try:
            async for message in client.receive_messages():
                self.events.put(("message", message))
            self.events.put(("closed", None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.events.put(("error", exc))

    @property
    def alive(self) -> bool:
        return not self.closed and self._thread.is_alive()

    def drain(self) -> None:
        """Forget leftovers of an earlier query (e.g. after an error)."""
        while True:
            try:
                self.events.get_nowait()
            except queue.Empty:
                return

    def send(self, text: str, uid: str) -> None:
        future = asyncio.run_coroutine_threadsafe(
            self._client.query(_one(_user_message(text, uid))), self._loop)
        future.result(timeout=SEND_TIMEOUT_S)

    def interrupt(self) -> None:
        if self.alive and self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.interrupt(), self._loop)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._stop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop already ended (the CLI never connected)
                pass
        self._thread.join(timeout=15)


class ClaudeProvider:
    name = "claude"
    supports_native_slash_commands = True
    reads_claude_md = True

    def __init__(self, config: Config) -> None:
        if sdk is None:
            raise ProviderUnavailable(f"the claude provider needs claude-agent-sdk"
                                      f" ({IMPORT_ERROR})", classification="config")
        self.config = config
        self.stderr: deque[str] = deque(maxlen=40)
        self._live: _Live | None = None
        self.on_fallback = False  # the CLI answers with the fallback model (told once)
        self.watch = broker.Watch(config.broker_wait_s)
        self.used = time.monotonic()  # when the last query ended: the idle clock
        self.released = False  # the CLI was closed for idleness (its restart says so)

    # -- the live CLI session
    def live_for(self, q: QueryInput) -> _Live:
        key = (q.system, q.cwd, self.config.model, self.config.effort, id(q.tools))
        live = self._live
        if live and live.alive and live.key == key and q.continuation == live.session_id:
            return live
        self.close()
        session_id = q.continuation or str(uuid.uuid4())
        options = self.options(q, resume=q.continuation,
                               session_id=None if q.continuation else session_id)
        log.info("claude cli starting resume=%s%s", bool(q.continuation),
                 " after_idle_release=1" if self.released else "")
        self.released = False
        self._live = _Live(options, key, session_id)
        return self._live

    def options(self, q: QueryInput, resume: str | None, session_id: str | None) -> Any:
        c = self.config
        servers: dict[str, Any] = {}
        if q.tools is not None:
            servers["nanoclaw"] = self.tool_server(q.tools)
        for name, spec in c.mcp_servers.items():
            servers[name] = {"type": "stdio", "command": spec["command"],
                             "args": [str(a) for a in spec.get("args") or []],
                             "env": {str(k): str(v) for k, v in (spec.get("env") or {}).items()}}
        env = {k: v for k, v in CLI_ENV.items() if k not in os.environ}
        env.setdefault("CLAUDE_CONFIG_DIR", os.environ.get("CLAUDE_CONFIG_DIR")
                       or os.path.join(c.session_dir, ".claude"))
        if os.geteuid() == 0:  # bypassPermissions is refused for root unless exactly this
            env["IS_SANDBOX"] = "1"
        return sdk.ClaudeAgentOptions(
            model=c.model, effort=c.effort, cwd=q.cwd,
            # the CLI refuses a fallback equal to the model
            fallback_model=c.fallback_model if c.fallback_model != c.model else None,
            system_prompt={"type": "preset", "preset": "claude_code", "append": q.system},
            permission_mode="bypassPermissions", setting_sources=["project", "user"],
            mcp_servers=servers, allowed_tools=ALLOWED_TOOLS + [f"mcp__{n}__*" for n in servers],
            disallowed_tools=BLOCKED_TOOLS, add_dirs=c.extra_dirs, env=env,
            resume=resume, session_id=session_id, stderr=self._stderr,
            hooks={"PreCompact": [sdk.HookMatcher(hooks=[self._pre_compact])]})

    def tool_server(self, tools: Any) -> Any:
        def make(tool: Any) -> Any:
            async def handler(args: dict[str, Any]) -> dict[str, Any]:
                outcome = await asyncio.to_thread(tools.run, tool.name, args)
                return {"content": [{"type": "text", "text": outcome.text}],
                        "is_error": outcome.is_error}
            return sdk.SdkMcpTool(tool.name, tool.description, tool.schema, handler)
        return sdk.create_sdk_mcp_server("nanoclaw", tools=[make(t) for t in tools.tools(False)])

    def _stderr(self, line: str) -> None:
        self.stderr.append(line.rstrip())
        log.debug("claude cli: %s", line.rstrip())

    async def _pre_compact(self, data: Any, tool_use_id: Any, context: Any) -> dict[str, Any]:
        path = None
        try:
            path = archive.archive(str(data.get("transcript_path") or ""),
                                   os.path.join(self.config.group_dir, "conversations"),
                                   str(data.get("session_id") or "session"))
            log.info("conversation archived before compaction path=%s", path)
        except Exception:  # archiving must never block compaction
            log.exception("conversation archive failed")
        live = self._live
        if data.get("trigger") == "auto" and live is not None:  # (/compact is answered anyway)
            where = f" The full text is kept in conversations/{os.path.basename(path)}." \
                if path else ""
            live.events.put(("notice", "(Our conversation got long, so I am summarising the"
                                       f" older part; details may be lost.{where})"))
        # the CLI hands a PreCompact hook's message to the summary as its instructions
        return {"systemMessage": KEEP_ON_COMPACT}

    # -- the provider interface
    def query(self, q: QueryInput) -> "ClaudeQuery":
        return ClaudeQuery(self, q)

    def error(self, exc: BaseException) -> ProviderError:
        if isinstance(exc, ProviderError):
            return exc
        text = str(exc).strip() or type(exc).__name__
        if STALE.search(text):
            return StaleSession(f"conversation cannot be resumed: {text[:300]}")
        if sdk is not None and isinstance(exc, sdk.CLINotFoundError):
            return ProviderUnavailable(f"Claude Code CLI not found: {text}",
                                       classification="config")
        tail = " | ".join(list(self.stderr)[-3:])
        return ProviderError(f"the Claude Code CLI failed: {text[:500]}"
                             + (f" ({tail[:300]})" if tail and tail not in text else ""))

    def is_session_invalid(self, err: BaseException) -> bool:
        return isinstance(err, StaleSession) or bool(STALE.search(str(err)))

    def forget(self, continuation: str) -> None:
        self.close()
        self.released = False

    def idle(self) -> None:
        """The poll loop has nothing to answer (no query open, nothing pending): after
        `claude_idle_s` without a query, close the CLI (0: never)."""
        live, limit = self._live, self.config.claude_idle_s
        if live is None or not limit > 0:
            return
        quiet = time.monotonic() - self.used
        if quiet < limit:
            return
        began = time.monotonic()
        self.close()
        self.released = True
        log.info("claude cli released after idle idle_s=%.1f close_s=%.2f (resumes on the"
                 " next message)", quiet, time.monotonic() - began)

    def close(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.close()

    def drop(self, live: _Live) -> None:
        if self._live is live:
            self.close()


class ClaudeQuery:
    def __init__(self, provider: ClaudeProvider, q: QueryInput) -> None:
        self.p = provider
        self.q = q
        self._live: _Live | None = None
        self._outstanding: list[str] = []
        self._texts: dict[str, str] = {}  # uid → what was sent (to repeat it)
        self._ended = False
        self._aborted = False
        self._limit: str | None = None

    def push(self, text: str) -> None:
        uid = str(uuid.uuid4())
        self._outstanding.append(uid)
        self._texts[uid] = text
        assert self._live is not None
        self._live.send(text, uid)

    def end(self) -> None:
        self._ended = True

    def abort(self) -> None:
        self._aborted = True
        if self._live is not None:
            self._live.interrupt()

    def events(self) -> Iterator[Event]:
        try:
            yield from self._events()
        finally:
            self.p.used = time.monotonic()

    def _events(self) -> Iterator[Event]:
        self.p.watch.learn()
        try:
            self._live = live = self.p.live_for(self.q)
            live.drain()
            self.push(self.q.prompt)
        except Exception as exc:
            self.p.close()
            yield Error(self.p.error(exc))
            return
        texts: list[str] = []
        repeated, waited = 0, 0.0  # turns repeated for a broker outage, time waited for it
        while not self._aborted and not (self._ended and not self._outstanding):
            try:
                kind, item = live.events.get(timeout=IDLE_TICK_S)
            except queue.Empty:
                yield Idle()
                continue
            if kind == "notice":
                yield Notice(item)
                continue
            if kind != "message":
                self.p.drop(live)
                yield Error(self.p.error(item) if kind == "error" else ProviderError(
                    "the Claude Code CLI stopped unexpectedly"
                    + (f": {self.p.stderr[-1]}" if self.p.stderr else "")))
                return
            if isinstance(item, sdk.ResultMessage):
                answered = self._answered(item)
                if item.is_error or item.subtype != "success":
                    if self._no_answer(item) and repeated < broker.MAX_FREE_RETRIES:
                        # the CLI's retries found no HTTP answer: the broker down or
                        # restarted? Then wait for it and send the turn again.
                        began = time.monotonic()
                        try:
                            verdict = yield from self.p.watch.settle(
                                lambda: self._aborted, max(self.p.watch.limit_s - waited, 1.0))
                        except ProviderError as exc:
                            yield Error(exc)
                            return
                        waited += time.monotonic() - began
                        if verdict == "down":
                            yield Error(broker.unreachable_error(waited))
                            return
                        again = [self._texts[u] for u in answered if u in self._texts]
                        if verdict in ("back", "restarted") and again:
                            repeated += 1
                            texts = []
                            log.warning("repeating the turn after the broker came back")
                            self.push("\n\n".join(again))
                            continue
                    yield Error(self._result_error(item))
                    return
                text, texts = "\n".join(texts) or (item.result or ""), []
                yield Result(text, more=bool(self._outstanding))
                if not self._outstanding:
                    return
                continue
            yield from self._map(item, texts)

    def _map(self, msg: Any, texts: list[str]) -> Iterator[Event]:
        if isinstance(msg, sdk.AssistantMessage):
            model, c = getattr(msg, "model", None), self.p.config
            if model and model == c.fallback_model and model != c.model:
                if not self.p.on_fallback:  # the CLI switched after repeated 529s
                    self.p.on_fallback = True
                    log.warning("the CLI fell back to model %s", model)
                    yield Notice(f"({c.model} is still busy (overloaded), so {model} answers"
                                 " for now.)")
            elif model:
                self.p.on_fallback = False
            if msg.parent_tool_use_id is None and not msg.error:
                texts += [b.text for b in msg.content if isinstance(b, sdk.TextBlock)]
            for block in msg.content:
                if isinstance(block, sdk.ToolUseBlock):
                    yield ToolStart(block.name, self._timeout_ms(block.name, block.input))
            yield Activity("assistant")
        elif isinstance(msg, sdk.UserMessage):
            content = msg.content if isinstance(msg.content, list) else []
            for block in content:
                if isinstance(block, sdk.ToolResultBlock):
                    yield ToolEnd("tool")
            yield Activity("user")
        elif isinstance(msg, sdk.RateLimitEvent):
            info = msg.rate_limit_info
            if info.status == "rejected":
                self._limit = f"usage limit reached ({info.rate_limit_type or 'unknown'})"
            log.warning("claude rate limit status=%s type=%s", info.status,
                        info.rate_limit_type)
            yield Activity("rate_limit")
        elif isinstance(msg, sdk.SystemMessage):
            data = msg.data or {}
            if msg.subtype == "init" and data.get("session_id"):
                self._live.session_id = data["session_id"]  # type: ignore[union-attr]
                yield Init(data["session_id"])
            elif msg.subtype == "api_retry":
                status = data.get("error_status")
                reason = (f"HTTP {status}, {BUSY.get(status, data.get('error') or 'error')}"
                          if status else str(data.get("error") or "connection failed"))
                yield Retrying(int(data.get("attempt") or 1),
                               int(data.get("max_retries") or 0) + 1,
                               float(data.get("retry_delay_ms") or 0) / 1000, reason,
                               status if isinstance(status, int) else None)
            else:
                yield Activity(msg.subtype)
        else:
            yield Activity(type(msg).__name__)

    def _timeout_ms(self, name: str, args: Any) -> int | None:
        if name == "Bash" and isinstance(args, dict) and args.get("timeout"):
            try:
                return int(args["timeout"])
            except (TypeError, ValueError):
                return None
        if name.startswith("mcp__nanoclaw__") and self.q.tools is not None:
            return self.q.tools.timeout_ms(name, args if isinstance(args, dict) else {})
        return None

    def _answered(self, result: Any) -> list[str]:
        """Drop the prompts `result` answered from the outstanding ones; returns them."""
        answered = set(getattr(result, "user_message_uuids", None) or [])
        if getattr(result, "user_message_uuid", None):
            answered.add(result.user_message_uuid)
        done = [u for u in self._outstanding if u in answered]
        self._outstanding = [u for u in self._outstanding if u not in answered]
        if not done and self._outstanding:  # an older CLI: FIFO
            done.append(self._outstanding.pop(0))
        return done

    def _no_answer(self, result: Any) -> bool:
        """A failed turn with no HTTP status behind it (the CLI's connection errors):
        worth asking whether the broker is down."""
        return (bool(result.is_error) and getattr(result, "api_error_status", None) is None
                and self._limit is None)

    def _result_error(self, result: Any) -> ProviderError:
        status = getattr(result, "api_error_status", None)
        detail = (result.result or "; ".join(result.errors or []) or result.subtype).strip()
        if self._limit:
            return ProviderError(f"model {self._limit}; {detail[:300]}", True, "quota")
        if status in (429, 529) or (status or 0) >= 500:
            return ProviderError(f"model overloaded/rate limited (HTTP {status}, "
                                 f"{BUSY.get(status, 'server error')}); please try again in a"
                                 " moment", True, "quota" if status == 429 else "overloaded")
        if status in (401, 403):  # keep the API's words: e.g. the host's budget message
            return ProviderError(f"model access denied (HTTP {status}): {detail[:300]}", False,
                                 "auth")
        if STALE.search(detail):
            return StaleSession(f"conversation cannot be resumed: {detail[:300]}")
        return ProviderError(f"the model turn failed ({result.subtype}): {detail[:500]}")
