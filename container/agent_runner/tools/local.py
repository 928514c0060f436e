"""The agent's tools: send_message, bash, read, write.

Provider-neutral: each tool is a JSON schema plus a function returning text, so the
`anthropic` provider runs them in its own loop and a later provider can serve them over
MCP. `send_message` writes a `messages_out` row at once and carries the current batch's
`in_reply_to` (the original's separate MCP process lost it). File tools are confined
to the folders the agent may use; a refusal is a clear tool error, never an exception.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from typing import Any, Callable

from agent_runner.batch import Batch
from agent_runner.config import Config
from agent_runner.db import Outbound
from agent_runner.providers import ToolOutcome

MAX_OUTPUT = 30_000
BASH_DEFAULT_S = 120
BASH_MAX_S = 600

SPECS: list[dict[str, Any]] = [
    {"name": "send_message",
     "description": "Send a chat message now (e.g. a progress update). Without `to` it goes "
                    "to the conversation you are in.",
     "input_schema": {"type": "object", "properties": {
         "to": {"type": "string", "description": "a destination name"},
         "text": {"type": "string"}}, "required": ["text"]}},
    {"name": "bash",
     "description": "Run a bash command in your working directory; returns exit code and "
                    "output.",
     "input_schema": {"type": "object", "properties": {
         "command": {"type": "string"},
         "timeout": {"type": "integer", "description": f"seconds, at most {BASH_MAX_S}"}},
         "required": ["command"]}},
    {"name": "read",
     "description": "Read a text file (relative paths are in your working directory).",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string"},
         "offset": {"type": "integer", "description": "first line, 1-based"},
         "limit": {"type": "integer", "description": "number of lines"}},
         "required": ["path"]}},
    {"name": "write",
     "description": "Write a text file, replacing it (relative paths are in your working "
                    "directory).",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string"}, "content": {"type": "string"}},
         "required": ["path", "content"]}},
]


class ToolError(Exception):
    pass


def _clip(text: str) -> str:
    if len(text) <= MAX_OUTPUT:
        return text
    half = MAX_OUTPUT // 2
    return f"{text[:half]}\n… [{len(text) - MAX_OUTPUT} characters cut] …\n{text[-half:]}"


class Toolbox:
    specs = SPECS

    def __init__(self, config: Config, outbound: Outbound,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.config = config
        self.outbound = outbound
        self.should_stop = should_stop
        self.batch: Batch | None = None
        self.sent = 0
        session = os.path.realpath(config.session_dir)
        self._protected = {os.path.join(session, n) for n in (
            "inbound.db", "outbound.db", "inbound.db-journal", "outbound.db-journal",
            ".heartbeat")}
        self._protected_dir = os.path.realpath(config.provider_dir)

    def begin(self, batch: Batch) -> None:
        self.batch, self.sent = batch, 0

    def timeout_ms(self, name: str, args: dict[str, Any]) -> int | None:
        return self._bash_timeout(args) * 1000 if name == "bash" else None

    def run(self, name: str, args: dict[str, Any]) -> ToolOutcome:
        handler = {"send_message": self._send_message, "bash": self._bash,
                   "read": self._read, "write": self._write}.get(name)
        if handler is None:
            return ToolOutcome(f"Error: unknown tool {name!r}", True)
        try:
            return handler(args)
        except ToolError as exc:
            return ToolOutcome(f"Error: {exc}", True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            return ToolOutcome(f"Error: {type(exc).__name__}: {exc}", True)

    # -- send_message
    def _send_message(self, args: dict[str, Any]) -> ToolOutcome:
        batch = self.batch or Batch([], [], None)
        text = str(args.get("text") or "").strip()
        if not text:
            raise ToolError("text is empty")
        names = ", ".join(d.name for d in batch.destinations) or "(none)"
        if args.get("to"):
            dest = batch.destination(str(args["to"]))
            if dest is None:
                raise ToolError(f"unknown destination {args['to']!r}; known: {names}")
            channel = dest.channel
        elif batch.routing is not None:
            channel = batch.routing.channel
        elif len(batch.destinations) == 1:
            channel = batch.destinations[0].channel
        else:
            raise ToolError(f"no default destination here; pass `to` (one of: {names})")
        address, _ = batch.address_for(channel)
        _, seq = self.outbound.write_message("chat", {"text": text}, address, batch.latest_id)
        self.sent += 1
        return ToolOutcome(f"sent (seq {seq})")

    # -- bash
    @staticmethod
    def _bash_timeout(args: dict[str, Any]) -> int:
        try:
            return min(max(int(args.get("timeout") or BASH_DEFAULT_S), 1), BASH_MAX_S)
        except (TypeError, ValueError):
            return BASH_DEFAULT_S

    def _bash(self, args: dict[str, Any]) -> ToolOutcome:
        command = str(args.get("command") or "")
        if not command.strip():
            raise ToolError("command is empty")
        deadline = time.monotonic() + self._bash_timeout(args)
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(["bash", "-c", command], cwd=self.config.group_dir,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            reason = None
            while reason is None:
                try:
                    proc.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    if self.should_stop():
                        reason = "stopped: the agent is shutting down"
                    elif time.monotonic() > deadline:
                        reason = "timed out"
            if reason is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.seek(0)
            output = out.read().decode("utf-8", "replace")
        if reason is not None:
            return ToolOutcome(f"Error: command {reason}\n{_clip(output)}", True)
        return ToolOutcome(f"exit code {proc.returncode}\n{_clip(output)}")

    # -- files
    def _resolve(self, path: str, roots: list[str]) -> str:
        if not path:
            raise ToolError("path is empty")
        full = path if os.path.isabs(path) else os.path.join(self.config.group_dir, path)
        real = os.path.realpath(full)
        for root in roots:
            r = os.path.realpath(root)
            if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
                return real
        raise ToolError(f"{path} is outside the folders you may use: {', '.join(roots)}")

    def _read(self, args: dict[str, Any]) -> ToolOutcome:
        c = self.config
        path = self._resolve(str(args.get("path") or ""),
                             [c.group_dir, c.session_dir, c.global_dir, "/tmp"])
        if not os.path.isfile(path):
            raise ToolError(f"{args.get('path')} is not a file")
        with open(path, "rb") as fh:
            data = fh.read()
        if b"\0" in data[:8192]:
            raise ToolError(f"{args.get('path')} is a binary file")
        lines = data.decode("utf-8", "replace").splitlines()
        start = max(int(args.get("offset") or 1), 1) - 1
        limit = max(int(args.get("limit") or 2000), 1)
        return ToolOutcome(_clip("\n".join(lines[start:start + limit])))

    def _write(self, args: dict[str, Any]) -> ToolOutcome:
        c = self.config
        path = self._resolve(str(args.get("path") or ""), [c.group_dir, c.session_dir, "/tmp"])
        if path in self._protected or path.startswith(self._protected_dir + os.sep):
            raise ToolError(f"{args.get('path')} belongs to the runner and cannot be written")
        content = args.get("content")
        if not isinstance(content, str):
            raise ToolError("content must be a string")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(content)
        return ToolOutcome(f"wrote {len(content.encode())} bytes to {path}")
