"""Logging: loguru to `logs/nanoclaw.log` (everything) and `logs/nanoclaw.error.log`
(warnings and errors), every line tagged with the worker that wrote it.

Each process calls `setup(worker)` after it starts; loguru's file sinks are opened in
append mode, so several processes share the files line by line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[worker]: <14} | {message}"


def setup(worker: str, logs_dir: Path, level: str = "INFO", stderr: bool = True) -> None:
    logger.remove()
    logger.configure(extra={"worker": worker})
    logs_dir.mkdir(parents=True, exist_ok=True)
    logger.add(logs_dir / "nanoclaw.log", format=FORMAT, level=level, enqueue=False)
    logger.add(logs_dir / "nanoclaw.error.log", format=FORMAT, level="WARNING", enqueue=False)
    if stderr:
        logger.add(sys.stderr, format=FORMAT, level=level)


__all__ = ["logger", "setup"]
