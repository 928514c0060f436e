"""Small shared helpers: UTC timestamps, ids, safe names.

Every timestamp we store is UTC ISO-8601 with milliseconds and a trailing Z, so text
order is time order and no reader has to guess a zone.
"""

from __future__ import annotations

import getpass
import hashlib
import math
import os
import re
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
# The agent runner's source (`container/`). Here, in core, because both the spawner
# (`containers`) and the mount checks (`mounts`) need it and `containers` imports `mounts`.
RUNNER_DIR = Path(__file__).resolve().parent.parent / "container"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def iso(ts: float) -> str:
    """UTC ISO-8601 with milliseconds and Z, the format every stored timestamp uses."""
    # datetime.fromtimestamp's own rounding (to the microsecond, half to even), without
    # building a datetime: a few stamps per message, in every worker
    frac, whole = math.modf(ts)
    sec, us = int(whole), round(frac * 1e6)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    global _second
    if _second[0] != sec:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)))
    return f"{_second[1]}{us // 1000:03d}Z"


def utcnow() -> str:
    return iso(time.time())


def parse_iso(text: str) -> float:
    """Parse a stored timestamp; a value without a zone is read as UTC."""
    t = text.strip().replace(" ", "T")
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def new_id(prefix: str) -> str:
    """`<prefix>-<epochms>-<6 base36>`: sortable by creation, unique enough per host."""
    rand = "".join(secrets.choice(_B36) for _ in range(6))
    return f"{prefix}-{int(time.time() * 1000)}-{rand}"


def is_safe_name(name: str) -> bool:
    return bool(SAFE_NAME.fullmatch(name)) and ".." not in name


def unlink_if_ours(path: str | os.PathLike, ino: int) -> None:
    """Remove the file at `path` unless a newer process has put its own there since
    (it is another inode); a missing file is fine."""
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


def local_user_id() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "owner"
    return f"cli:{name}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


CARD_PREFIXES = ("appr-", "snd-", "chan-")  # approval cards; everything else is a question


def is_approval_card(card_id: str) -> bool:
    """Whether a card id names an approval. Only the host makes such cards: an agent's
    question card never goes out under the id the agent chose."""
    return card_id.startswith(CARD_PREFIXES)
