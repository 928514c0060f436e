"""Logging: loguru to `logs/nanoclaw.log` (everything) and `logs/nanoclaw.error.log`
(warnings and errors), every line tagged with the worker that wrote it.

Each process calls `setup(worker)` after it starts; loguru's file sinks are opened in
append mode, so several processes share the files line by line.

Every message is one line: newlines and other control characters in it are escaped
(`\\n`, `\\x1b`, …), so text that came from an agent or a chat cannot forge log lines.
Both files rotate by size (`logfiles.py`).
`terminal(...)` writes a line to the terminal (stderr) only, never to the files: for
what another local user must not read there (the web chat's token).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[worker]: <14} | {message}"

# C0 controls (newline, carriage return, escape, …), DEL, C1 controls (NEL among them)
# and the Unicode line and paragraph separators: anything a reader could take as a
# line break or a terminal command.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_TERMINAL_ONLY = "terminal_only"


def one_line(text: str) -> str:
    """`text` with every control character escaped, so it prints as one line."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: _NAMED.get(m.group()) or (
        f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"),
        text)


def _escape(record: dict) -> None:
    """Patcher: runs on every record before any sink formats it."""
    record["message"] = one_line(record["message"])


def _to_files(record: dict) -> bool:
    return not record["extra"].get(_TERMINAL_ONLY)


def setup(worker: str, logs_dir: Path, level: str = "INFO", stderr: bool = True, *,
          rotate_mb: float = 20.0, keep: int = 5) -> None:
    """Both files rotate past `rotate_mb`, `keep` old copies each (`logfiles.py`: one
    shared rotation for every process; `watch` reopens the new file)."""
    from nanoclaw.logfiles import Rotator

    logger.remove()
    logger.configure(extra={"worker": worker}, patcher=_escape)
    logs_dir.mkdir(parents=True, exist_ok=True)
    for name, lvl in (("nanoclaw.log", level), ("nanoclaw.error.log", "WARNING")):
        path = logs_dir / name
        logger.add(path, format=FORMAT, level=lvl, enqueue=False, filter=_to_files,
                   watch=True, rotation=Rotator(path, int(rotate_mb * 2**20), keep))
    if stderr:
        logger.add(sys.stderr, format=FORMAT, level=level)


def terminal(message: str, *args: object) -> None:
    """An INFO line for the terminal only (the `nanoclaw run` foreground, where every
    worker's stderr goes), never for the log files other users might come to read."""
    logger.opt(depth=1).bind(**{_TERMINAL_ONLY: True}).info(message, *args)


__all__ = ["logger", "one_line", "setup", "terminal"]
