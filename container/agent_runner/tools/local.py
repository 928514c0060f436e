"""Shell and file tools for the `anthropic` provider: bash, read, write, edit, glob, grep,
web_fetch. (The `claude` provider has the CLI's own.)

File tools stay inside the folders the agent may use (its group folder, the session
folder, /tmp; read also the global and extra folders and the skills); the runner's own
files cannot be written. Output is clipped so one tool call cannot flood the context.
Commands run in a new process group and are killed whole on timeout or shutdown.
"""

from __future__ import annotations

import fnmatch
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from typing import Any

from agent_runner.tools.base import Tool, ToolContext, ToolError, obj, string

MAX_OUTPUT = 30_000
BASH_DEFAULT_S = 120
BASH_MAX_S = 600
MAX_MATCHES = 200
MAX_GREP_FILE = 2 * 1024 * 1024
FETCH_TIMEOUT_S = 30
FETCH_MAX_BYTES = 2 * 1024 * 1024
RUNNER_FILES = ("inbound.db", "outbound.db", "inbound.db-journal", "outbound.db-journal",
                ".heartbeat")


def clip(text: str, limit: int = MAX_OUTPUT) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n… [{len(text) - limit} characters cut] …\n{text[-half:]}"


def _writable(ctx: ToolContext, path: str) -> str:
    full = ctx.path(path, writable=True)
    private = os.path.realpath(ctx.config.provider_dir)
    runner = {os.path.join(os.path.realpath(d), n) for n in RUNNER_FILES
              for d in (ctx.config.session_dir, ctx.config.db_dir or ctx.config.session_dir)}
    if full in runner or \
            full.startswith(private + os.sep) or full == private:
        raise ToolError(f"{path} belongs to the runner and cannot be written")
    return full


def bash_timeout(args: dict[str, Any]) -> int:
    return min(max(int(args.get("timeout") or BASH_DEFAULT_S), 1), BASH_MAX_S)


def _bash(ctx: ToolContext, args: dict[str, Any]) -> str:
    deadline = time.monotonic() + bash_timeout(args)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(["bash", "-c", args["command"]], cwd=ctx.config.group_dir,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        reason = None
        while reason is None:
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                if ctx.should_stop():
                    reason = "stopped: the agent is shutting down"
                elif time.monotonic() > deadline:
                    reason = f"timed out after {bash_timeout(args)} s"
        if reason is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        output = out.read().decode("utf-8", "replace")
    if reason is not None:
        raise ToolError(f"command {reason}\n{clip(output)}")
    return f"exit code {proc.returncode}\n{clip(output)}"


def _read_text(path: str, shown: str) -> str:
    if not os.path.isfile(path):
        raise ToolError(f"{shown} is not a file")
    with open(path, "rb") as fh:
        data = fh.read()
    if b"\0" in data[:8192]:
        raise ToolError(f"{shown} is a binary file")
    return data.decode("utf-8", "replace")


def _read(ctx: ToolContext, args: dict[str, Any]) -> str:
    lines = _read_text(ctx.path(args["path"]), args["path"]).splitlines()
    start = max(int(args.get("offset") or 1), 1) - 1
    limit = max(int(args.get("limit") or 2000), 1)
    numbered = [f"{i + 1:6}\t{line}" for i, line in enumerate(lines[start:start + limit],
                                                               start)]
    return clip("\n".join(numbered)) or "(empty file)"


def _write(ctx: ToolContext, args: dict[str, Any]) -> str:
    path = _writable(ctx, args["path"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(args["content"])
    return f"wrote {len(args['content'].encode())} bytes to {path}"


def _edit(ctx: ToolContext, args: dict[str, Any]) -> str:
    path = _writable(ctx, args["path"])
    text = _read_text(path, args["path"])
    old, new = args["old_string"], args["new_string"]
    if old == new:
        raise ToolError("old_string and new_string are the same")
    count = text.count(old)
    if count == 0:
        raise ToolError(f"old_string was not found in {args['path']}")
    if count > 1 and not args.get("replace_all"):
        raise ToolError(f"old_string occurs {count} times in {args['path']}; give more"
                        " context to make it unique, or set replace_all")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text.replace(old, new) if args.get("replace_all") else text.replace(old, new, 1))
    return f"replaced {count if args.get('replace_all') else 1} occurrence(s) in {path}"


def _walk(root: str):
    if os.path.isfile(root):
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", "node_modules",
                                                               "__pycache__"))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _glob(ctx: ToolContext, args: dict[str, Any]) -> str:
    root = ctx.path(args.get("path") or ctx.config.group_dir)
    pattern = args["pattern"]
    hits = [p for p in _walk(root) if fnmatch.fnmatch(os.path.relpath(p, root), pattern)
            or fnmatch.fnmatch(os.path.basename(p), pattern)]
    hits.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    more = f"\n… and {len(hits) - MAX_MATCHES} more" if len(hits) > MAX_MATCHES else ""
    return "\n".join(hits[:MAX_MATCHES]) + more if hits else "no files match"


def _grep(ctx: ToolContext, args: dict[str, Any]) -> str:
    try:
        rx = re.compile(args["pattern"], re.I if args.get("ignore_case") else 0)
    except re.error as exc:
        raise ToolError(f"`pattern` is not a valid regular expression: {exc}") from None
    root = ctx.path(args.get("path") or ctx.config.group_dir)
    hits: list[str] = []
    for path in _walk(root):
        if args.get("glob") and not fnmatch.fnmatch(os.path.basename(path), args["glob"]):
            continue
        try:
            if os.path.getsize(path) > MAX_GREP_FILE:
                continue
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if rx.search(line):
                hits.append(f"{path}:{n}:{line[:500]}")
                if len(hits) >= MAX_MATCHES:
                    return clip("\n".join(hits) + "\n… (more matches cut)")
    return clip("\n".join(hits)) if hits else "no matches"


class _Text(HTMLParser):
    SKIP = {"script", "style", "noscript", "head"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.SKIP:
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _web_fetch(ctx: ToolContext, args: dict[str, Any]) -> str:
    url = args["url"].strip()
    if not url.startswith(("http://", "https://")):
        raise ToolError("`url` must start with http:// or https://")
    req = urllib.request.Request(url, headers={"User-Agent": "nanoclaw-agent/1.0"})
    try:
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S) as resp:
            body = resp.read(FETCH_MAX_BYTES + 1)
            ctype = resp.headers.get("Content-Type", "")
            charset = resp.headers.get_content_charset() or "utf-8"
    except urllib.error.HTTPError as exc:
        raise ToolError(f"HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ToolError(f"could not fetch {url}: {getattr(exc, 'reason', exc)}") from None
    text = body[:FETCH_MAX_BYTES].decode(charset, "replace")
    if "html" in ctype:
        parser = _Text()
        parser.feed(text)
        text = re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip()
    limit = int(args.get("max_chars") or MAX_OUTPUT)
    return clip(text, max(1000, min(limit, MAX_OUTPUT)))


PATH = string("a path; relative paths are in your working directory", minLength=1)
TOOLS = [
    Tool("bash", "Run a bash command in your working directory; returns the exit code and"
         " output (stdout and stderr).",
         obj({"command": string(minLength=1), "timeout": {
             "type": "integer", "minimum": 1, "maximum": BASH_MAX_S,
             "description": f"seconds (default {BASH_DEFAULT_S})"}}, ("command",)),
         _bash, local=True, timeout_s=bash_timeout),
    Tool("read", "Read a text file, with line numbers.",
         obj({"path": PATH, "offset": {"type": "integer", "minimum": 1,
                                       "description": "first line, 1-based"},
              "limit": {"type": "integer", "minimum": 1, "description": "number of lines"}},
             ("path",)), _read, local=True),
    Tool("write", "Write a text file, replacing it.",
         obj({"path": PATH, "content": string()}, ("path", "content")), _write, local=True),
    Tool("edit", "Replace exact text in a file (old_string must be unique unless"
         " replace_all).",
         obj({"path": PATH, "old_string": string(minLength=1), "new_string": string(),
              "replace_all": {"type": "boolean"}}, ("path", "old_string", "new_string")),
         _edit, local=True),
    Tool("glob", "Find files by name pattern (e.g. '**/*.md'), newest first.",
         obj({"pattern": string(minLength=1), "path": string("folder to search")},
             ("pattern",)), _glob, local=True),
    Tool("grep", "Search file contents with a regular expression; returns path:line:text.",
         obj({"pattern": string(minLength=1), "path": string("file or folder to search"),
              "glob": string("only files whose name matches, e.g. '*.py'"),
              "ignore_case": {"type": "boolean"}}, ("pattern",)), _grep, local=True),
    Tool("web_fetch", "Fetch a web page or file over HTTP(S) and return its text.",
         obj({"url": string(minLength=1), "max_chars": {"type": "integer", "minimum": 1000}},
             ("url",)), _web_fetch, local=True),
]
