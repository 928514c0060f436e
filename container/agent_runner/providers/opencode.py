"""The `opencode` provider: the pinned OpenCode CLI (`nanoclaw/runtime/opencode.py`,
1.18.33) run as `opencode serve` on the sandbox's loopback, driven by a small client of
its REST + SSE API written against that version's OpenAPI document (`GET /doc`).

- Offline: its config comes in `OPENCODE_CONFIG_CONTENT` (one provider, pointed at the
  host's broker: `@ai-sdk/openai-compatible` at `<broker>/up/<upstream>` for an
  OpenAI-style upstream, the bundled `anthropic` provider at `<broker>/v1` for Claude;
  the per-session token as its key), with the model catalogue fetch, auto-update,
  default plugins, LSP downloads and project config turned off, and its home and XDG
  folders in `<session>/.provider/opencode/`. It never reaches the internet.
- Tools: its own (bash, read, edit, …) under permissions it must ask for; the answers
  follow our rules (`decide`: the folders the `anthropic` provider's local tools may
  use, never a blanket "always"). The nanoclaw tools are offered to it as a remote MCP
  server (`McpServer`, Streamable HTTP on 127.0.0.1, a random bearer token); a call is
  run by the one Toolbox on the query's own thread, in order.
- Turns: `POST /session` once (its id is the continuation), then per prompt
  `POST /session/{id}/prompt_async` with our system prompt; events from `GET /event`
  until `session.idle`; the answer is the text of the assistant messages after the last
  user message (`GET /session/{id}/message`). A `session.error` is a visible error.
- A `opencode serve` that dies is started again (up to `MAX_RESTARTS` per query) on the
  same data folder, so the session lives on; an unanswered prompt is sent again, and
  the message is answered once.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from agent_runner.config import Config
from agent_runner.providers import (
    Activity,
    Error,
    Event,
    Idle,
    Init,
    ProviderError,
    ProviderUnavailable,
    QueryInput,
    Result,
    StaleSession,
    ToolEnd,
    ToolStart,
)
from agent_runner.providers.toolloop import upstream_url

log = logging.getLogger("agent_runner")

PROVIDER_ID = "nanoclaw"
START_TIMEOUT_S = 60.0
MAX_RESTARTS = 3
IDLE_EVERY_S = 0.5
MCP_PROTOCOL = "2025-06-18"
# what opencode must ask us for; everything else stays inside its working folder
ASK = {"edit": "ask", "bash": "ask", "webfetch": "ask", "external_directory": "ask",
       "websearch": "deny", "codesearch": "deny"}


def config_content(model: str, api: str, base_url: str, token: str, mcp_url: str,
                   mcp_token: str) -> dict[str, Any]:
    """The whole OpenCode config: one provider behind the broker, our MCP server."""
    if api == "anthropic":
        provider = {"npm": "@ai-sdk/anthropic", "name": "NanoClaw broker",
                    "options": {"baseURL": base_url + "/v1", "apiKey": token}}
    else:
        provider = {"npm": "@ai-sdk/openai-compatible", "name": "NanoClaw broker",
                    "options": {"baseURL": base_url, "apiKey": token}}
    provider["models"] = {model: {"name": model, "tool_call": True}}
    return {"$schema": "https://opencode.ai/config.json",
            "model": f"{PROVIDER_ID}/{model}", "small_model": f"{PROVIDER_ID}/{model}",
            "enabled_providers": [PROVIDER_ID], "provider": {PROVIDER_ID: provider},
            "autoupdate": False, "snapshot": False, "share": "disabled",
            "permission": ASK,
            "mcp": {"nanoclaw": {"type": "remote", "url": mcp_url, "enabled": True,
                                 "oauth": False,
                                 "headers": {"Authorization": f"Bearer {mcp_token}"}}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the nanoclaw tools as an MCP server ---------------------------------------------------

class ToolCall:
    """A tools/call from opencode, waiting for the query's thread to run it."""

    def __init__(self, name: str, args: dict[str, Any]) -> None:
        self.name, self.args = name, args
        self.done = threading.Event()
        self.text, self.is_error = "", False


class McpServer:
    """Streamable HTTP MCP (JSON answers, no sessions) on 127.0.0.1: initialize,
    tools/list, tools/call. Calls are handed to `calls` and answered when run."""

    def __init__(self, specs: list[dict[str, Any]], calls: "queue.Queue[Any]") -> None:
        self.specs, self.calls = specs, calls
        self.token = secrets.token_urlsafe(24)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, body: Any = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - no server-initiated stream
                self._send(405)

            def do_DELETE(self) -> None:  # noqa: N802
                self._send(405)

            def do_POST(self) -> None:  # noqa: N802
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._send(401, {"error": "unauthorized"})
                    return
                try:
                    msg = json.loads(self.rfile.read(int(self.headers.get("Content-Length")
                                                         or 0)))
                except ValueError:
                    self._send(400, {"jsonrpc": "2.0", "id": None,
                                     "error": {"code": -32700, "message": "parse error"}})
                    return
                if not isinstance(msg, dict) or "id" not in msg:
                    self._send(202)  # a notification
                    return
                self._send(200, {"jsonrpc": "2.0", "id": msg["id"], **server.answer(msg)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="mcp", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/mcp"

    def answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        method, params = msg.get("method"), msg.get("params") or {}
        if method == "initialize":
            return {"result": {"protocolVersion": params.get("protocolVersion", MCP_PROTOCOL),
                               "capabilities": {"tools": {"listChanged": False}},
                               "serverInfo": {"name": "nanoclaw", "version": "1"}}}
        if method == "ping":
            return {"result": {}}
        if method == "tools/list":
            return {"result": {"tools": [{"name": t["name"], "description": t["description"],
                                          "inputSchema": t["input_schema"]}
                                         for t in self.specs]}}
        if method == "tools/call":
            call = ToolCall(str(params.get("name")), params.get("arguments") or {})
            self.calls.put(("tool", call))
            call.done.wait()
            return {"result": {"content": [{"type": "text", "text": call.text}],
                               "isError": call.is_error}}
        return {"error": {"code": -32601, "message": f"unknown method {method}"}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- opencode serve and its API ------------------------------------------------------------

# What the OpenCode server keeps of the agent's environment besides its own settings.
PASS_ON = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
           "AGENT_BROWSER_EXECUTABLE_PATH", "AGENT_BROWSER_ARGS")


class Serve:
    """One `opencode serve` process, its HTTP API and its event stream (into `events`)."""

    def __init__(self, binary: str, home: str, cwd: str, config: dict[str, Any],
                 events: "queue.Queue[Any]") -> None:
        self.port = free_port()
        self.password = secrets.token_urlsafe(18)
        self.events = events
        for sub in ("data", "config", "cache", "state"):
            os.makedirs(os.path.join(home, sub), exist_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "TZ": os.environ.get("TZ", "UTC"), "LANG": "C.UTF-8",
               "XDG_DATA_HOME": os.path.join(home, "data"),
               "XDG_CONFIG_HOME": os.path.join(home, "config"),
               "XDG_CACHE_HOME": os.path.join(home, "cache"),
               "XDG_STATE_HOME": os.path.join(home, "state"),
               "NO_PROXY": "127.0.0.1,localhost",
               "OPENCODE_CONFIG_CONTENT": json.dumps(config),
               "OPENCODE_SERVER_PASSWORD": self.password,
               "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1",
               "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
               "OPENCODE_DISABLE_PROJECT_CONFIG": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
               # the web through the egress door (sandbox_entry sets these), for its
               # webfetch tool and the agent-browser its shell runs
               **{k: v for k, v in os.environ.items() if k in PASS_ON}}
        self.proc = subprocess.Popen(
            [binary, "serve", "--hostname", "127.0.0.1", "--port", str(self.port)],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.listening = threading.Event()
        self._seen: list[str] = []
        self._stream: http.client.HTTPConnection | None = None
        threading.Thread(target=self._output, name="opencode-out", daemon=True).start()
        self._wait_listening()
        threading.Thread(target=self._read_events, name="opencode-events", daemon=True).start()

    def _wait_listening(self) -> None:
        """Until it says `server listening on`; a server that exits or stays silent past
        START_TIMEOUT_S is stopped and reported with the end of its output."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ProviderError("opencode serve did not start: "
                                    + " | ".join(self._seen[-5:]), classification="config")
        log.info("opencode serve up pid=%d port=%d", self.proc.pid, self.port)

    def _output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode("utf-8", "replace").rstrip()[:500]
            if not self.listening.is_set():
                self._seen.append(text)
                if "server listening on" in text:
                    self.listening.set()
                    continue
            log.info("opencode: %s", text)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _auth(self) -> dict[str, str]:
        cred = base64.b64encode(f"opencode:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {cred}"}

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, data, {**self._auth(), "Content-Type":
                                              "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectionError(f"opencode serve: {exc}") from exc
        finally:
            conn.close()
        if resp.status == 404:
            raise LookupError(path)
        if resp.status >= 400:
            raise ProviderError(f"opencode answered {method} {path.split('?')[0]} with"
                                f" HTTP {resp.status}: {raw[:300].decode('utf-8', 'replace')}")
        return json.loads(raw) if raw.strip() else None

    def _read_events(self) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=None)
            self._stream = conn
            conn.request("GET", "/event", headers={**self._auth(),
                                                   "Accept": "text/event-stream"})
            resp = conn.getresponse()
            while True:
                line = resp.fp.readline()
                if not line:
                    break
                if line.startswith(b"data:"):
                    try:
                        self.events.put(("event", json.loads(line[5:])))
                    except ValueError:
                        continue
        except (OSError, http.client.HTTPException):
            pass
        self.events.put(("ended", self))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait(5)
        if self._stream is not None:
            try:
                self._stream.close()
            except OSError:
                pass


# --- the provider --------------------------------------------------------------------------

def decide(tools: Any, permission: str, patterns: list[str]) -> str:
    """Our answer to opencode's permission request: `once` or `reject`, never `always`.
    Files: the folders the `anthropic` provider's file tools may use (writes: not the
    runner's own files); the shell and web fetches as that provider's tools have them."""
    from agent_runner.tools import local
    from agent_runner.tools.base import ToolError

    if permission in ("bash", "webfetch"):
        return "once"
    ctx = getattr(tools, "ctx", None)
    if ctx is None or permission not in ("edit", "external_directory") or not patterns:
        return "reject"
    try:
        for pattern in patterns:
            path = pattern[:-2] if pattern.endswith("/*") else pattern
            if permission == "edit":
                local._writable(ctx, path)
            else:
                ctx.path(path, writable=False)
    except ToolError:
        return "reject"
    return "once"


class OpenCodeProvider:
    name = "opencode"
    supports_native_slash_commands = False
    reads_claude_md = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.binary = config.opencode_bin or shutil.which("opencode")
        if not self.binary or not os.access(self.binary, os.X_OK):
            raise ProviderUnavailable(
                "the opencode binary is not installed here (the host installs it with"
                " `python -m nanoclaw.runtime.opencode install`; the agent image has it"
                " from `make image`)", classification="config")
        self.home = os.path.join(config.provider_dir, "opencode")
        self.api = config.upstream_api or "openai"
        self.upstream = config.upstream or ("anthropic" if self.api == "anthropic"
                                            else "openai")
        self.events: "queue.Queue[Any]" = queue.Queue()
        self.serve: Serve | None = None
        self.mcp: McpServer | None = None
        self.restarts = 0

    def ensure(self, tools: Any) -> Serve:
        """A running `opencode serve` (started, or started again after it died)."""
        if self.serve is not None and self.serve.alive():
            return self.serve
        if self.serve is not None:
            self.restarts += 1
            log.warning("opencode serve exited (%s); starting it again",
                        self.serve.proc.returncode)
            self.serve.stop()
        if self.mcp is None:
            specs = tools.specs(local=False) if tools is not None else []
            self.mcp = McpServer(specs, self.events)
        content = config_content(
            self.config.model, self.api,
            upstream_url(os.environ.get("ANTHROPIC_BASE_URL", ""), self.upstream, self.api),
            os.environ.get("ANTHROPIC_API_KEY", ""), self.mcp.url, self.mcp.token)
        self.serve = Serve(self.binary, self.home, self.config.group_dir, content, self.events)
        return self.serve

    def query(self, q: QueryInput) -> "OpenCodeQuery":
        return OpenCodeQuery(self, q)

    def is_session_invalid(self, err: BaseException) -> bool:
        return isinstance(err, StaleSession)

    def forget(self, continuation: str) -> None:
        if self.serve is not None and self.serve.alive():
            try:
                self.serve.call("DELETE", f"/session/{continuation}")
            except (ProviderError, ConnectionError, LookupError):
                pass

    def close(self) -> None:
        if self.serve is not None:
            self.serve.stop()
        if self.mcp is not None:
            self.mcp.close()


class OpenCodeQuery:
    def __init__(self, provider: OpenCodeProvider, q: QueryInput) -> None:
        self.p, self.q = provider, q
        self._pushed: list[str] = []
        self._aborted = False

    def push(self, text: str) -> None:
        self._pushed.append(text)

    def end(self) -> None:
        pass

    def abort(self) -> None:
        self._aborted = True
        serve = self.p.serve
        if serve is not None and serve.alive() and self.q.continuation:
            try:
                serve.call("POST", f"/session/{self.q.continuation}/abort", {}, timeout=5)
            except (ProviderError, ConnectionError, LookupError):
                pass

    def events(self) -> Iterator[Event]:
        try:
            serve = self.p.ensure(self.q.tools)
            sid = self._session(serve)
        except (ProviderError, ConnectionError) as exc:
            yield Error(exc if isinstance(exc, ProviderError) else ProviderError(str(exc)))
            return
        yield Init(sid)
        prompt, restarts = self.q.prompt, 0
        while not self._aborted:
            try:
                self._prompt(sid, prompt)
                text = yield from self._until_idle(sid)
            except ConnectionError as exc:  # the server died under the turn
                restarts += 1
                if restarts > MAX_RESTARTS:
                    yield Error(ProviderError(f"opencode serve keeps failing: {exc}"))
                    return
                try:
                    self.p.ensure(self.q.tools)
                except ProviderError as err:
                    yield Error(err)
                    return
                continue  # the same prompt again: it was not answered
            except ProviderError as exc:
                yield Error(exc)
                return
            yield Result(text, more=bool(self._pushed))
            if not self._pushed:
                return
            prompt = "\n\n".join(self._pushed)
            self._pushed.clear()

    def _session(self, serve: Serve) -> str:
        cid = self.q.continuation
        if cid:
            try:
                serve.call("GET", f"/session/{cid}")
                return cid
            except LookupError:
                raise StaleSession(f"opencode session {cid} is gone") from None
        return str(serve.call("POST", "/session", {})["id"])

    def _prompt(self, sid: str, text: str) -> None:
        serve = self.p.serve
        if serve is None or not serve.alive():
            raise ConnectionError("opencode serve is not running")
        self.q.continuation = sid
        while True:  # what a past turn left behind (a late idle) must not end this one
            try:
                kind, item = self.p.events.get_nowait()
            except queue.Empty:
                break
            if kind == "tool":  # not ours to drop: answer it as refused
                item.text, item.is_error = "Error: the turn that asked for this ended", True
                item.done.set()
        serve.call("POST", f"/session/{sid}/prompt_async", {
            "parts": [{"type": "text", "text": text}], "system": self.q.system,
            "model": {"providerID": PROVIDER_ID, "modelID": self.p.config.model}})

    def _until_idle(self, sid: str) -> Iterator[Event]:
        """Events until the session is idle again; returns the answer's text."""
        serve = self.p.serve
        assert serve is not None
        last_idle = time.monotonic()
        while True:
            if self._aborted:
                raise ProviderError("aborted")
            try:
                kind, item = self.p.events.get(timeout=0.1)
            except queue.Empty:
                if not serve.alive():
                    raise ConnectionError(f"opencode serve exited ({serve.proc.returncode})")
                if time.monotonic() - last_idle >= IDLE_EVERY_S:
                    last_idle = time.monotonic()
                    yield Idle()
                continue
            if kind == "tool":
                yield from self._run_tool(item)
                continue
            if kind == "ended":
                if item is serve:
                    raise ConnectionError("opencode's event stream ended")
                continue
            ev_type = item.get("type")
            props = item.get("properties") or {}
            if props.get("sessionID", sid) != sid:
                continue
            if ev_type == "permission.asked":
                reply = decide(self.q.tools, str(props.get("permission")),
                               [str(p) for p in props.get("patterns") or []])
                log.info("opencode asks permission=%s patterns=%s reply=%s",
                         props.get("permission"), props.get("patterns"), reply)
                serve.call("POST", f"/permission/{props.get('id')}/reply", {"reply": reply})
            elif ev_type == "message.part.updated":
                yield Activity("stream")
            elif ev_type == "session.error":
                err = props.get("error") or {}
                data = err.get("data") or {}
                raise ProviderError(str(data.get("message") or err.get("name")
                                        or "opencode failed"))
            elif ev_type == "session.idle":
                return self._answer(serve, sid)

    def _run_tool(self, call: ToolCall) -> Iterator[Event]:
        tools = self.q.tools
        yield ToolStart(call.name, tools.timeout_ms(call.name, call.args) if tools else None)
        try:
            outcome = tools.run(call.name, call.args) if tools else None
            call.text = outcome.text if outcome else "no tools here"
            call.is_error = outcome.is_error if outcome else True
        finally:
            call.done.set()
        yield ToolEnd(call.name)

    @staticmethod
    def _answer(serve: Serve, sid: str) -> str:
        messages = serve.call("GET", f"/session/{sid}/message") or []
        last_user = max((i for i, m in enumerate(messages)
                         if (m.get("info") or {}).get("role") == "user"), default=-1)
        texts, errors = [], []
        for m in messages[last_user + 1:]:
            info = m.get("info") or {}
            if info.get("role") != "assistant":
                continue
            texts += [p.get("text", "") for p in m.get("parts") or []
                      if p.get("type") == "text" and not p.get("synthetic")]
            if info.get("error"):
                err = info["error"]
                errors.append(str((err.get("data") or {}).get("message") or err.get("name")))
        if not any(t.strip() for t in texts) and errors:
            raise ProviderError(errors[-1])
        return "\n".join(t for t in texts if t.strip())
