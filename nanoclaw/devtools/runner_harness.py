"""Drive the agent runner the way the host does, without the host.

`Session` builds a session folder with `nanoclaw.db.session` (real DBs, read and
written through `SessionInbound` and `SessionOutbound`, a group folder
with `container.json`, two destinations) and writes `messages_in` rows as the router
would; `Runner` starts `python -m agent_runner` with the environment of
container/README.md pointed at a fake model. Used by the runner tests and handy for
trying the runner by hand.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from nanoclaw.db.session import SessionInbound, SessionOutbound, create

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 15.0


def wait_for(cond: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def unlocked(read: Callable[[], Any], empty: Any) -> Any:
    """A read of the runner's outbound.db, `empty` while the runner holds it locked
    (the callers poll: they look again)."""
    try:
        return read()
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            return empty
        raise


DESTINATIONS = [
    {"name": "tg-main", "display_name": "Main chat", "type": "channel",
     "channel_type": "telegram", "platform_id": "tg:1", "agent_group_id": None},
    {"name": "ops", "display_name": "Ops", "type": "channel",
     "channel_type": "slack", "platform_id": "C9", "agent_group_id": None},
]


class Session:
    """A session folder plus the group folder the runner works in."""

    def __init__(self, tmp: Path, provider: str = "anthropic", **config: Any) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.paths = create(str(tmp / "session"))
        self.inbound, self.outbound = SessionInbound(self.paths), SessionOutbound(self.paths)
        self.group = tmp / "group"
        self.group.mkdir(exist_ok=True)
        (tmp / "global").mkdir(exist_ok=True)
        self.configure(provider=provider, **config)
        self.inbound.write_routing(("telegram", "tg:1", None), DESTINATIONS)
        self._n = 0

    def configure(self, **config: Any) -> None:
        data = {"provider": "anthropic", "model": "claude-fake-1", "assistant_name": "Andy",
                "agent_group_id": "ag-1", "max_messages_per_prompt": 10, "effort": None}
        path = Path(self.paths.config)
        if path.exists():
            data.update(json.loads(path.read_text()))
        data.update(config)
        path.write_text(json.dumps(data))

    def insert(self, kind: str, content: dict, channel=("telegram", "tg:1"), **kw: Any) -> str:
        self._n += 1
        mid = kw.pop("id", f"m{self._n}")
        self.inbound.insert(id=mid, kind=kind, content=content, channel_type=channel[0],
                            platform_id=channel[1], **kw)
        return mid

    def chat(self, text: str, channel=("telegram", "tg:1"), **kw: Any) -> str:
        content = kw.pop("content", {"sender": "Alice", "senderId": "telegram:alice",
                                     "text": text, "attachments": []})
        return self.insert(kw.pop("kind", "chat"), content, channel, **kw)

    def out(self) -> list[dict]:
        rows = unlocked(self.outbound.messages, [])
        for r in rows:
            r["body"] = json.loads(r["content"])
            r["text"] = r["body"].get("text")
        return rows

    def acks(self) -> dict[str, str]:
        return {mid: st for mid, (st, _) in unlocked(self.outbound.acks, {}).items()}

    def state(self, key: str) -> str | None:
        return unlocked(lambda: self.outbound.state(key), None)

    def reply_to(self, mid: str, timeout: float = DEADLINE_S) -> dict:
        return wait_for(lambda: next((r for r in self.out() if r["in_reply_to"] == mid
                                      and r["kind"] == "chat"), None),
                        f"a reply to {mid}", timeout)

    def completed(self, mid: str, timeout: float = DEADLINE_S) -> None:
        wait_for(lambda: self.acks().get(mid) == "completed", f"{mid} completed", timeout)


class Runner:
    """`python -m agent_runner` for a session, its output in a log file."""

    def __init__(self, session: Session, fake_url: str, env: dict[str, str] | None = None):
        self.session = session
        self.log = session.tmp / f"runner-{time.monotonic_ns()}.log"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT / "container"),
            "HOME": str(session.tmp),
            "NANOCLAW_SESSION_DIR": session.paths.work,
            "NANOCLAW_DB_DIR": session.paths.db,
            "NANOCLAW_GROUP_DIR": str(session.group),
            "NANOCLAW_GLOBAL_DIR": str(session.tmp / "global"),
            "ANTHROPIC_BASE_URL": fake_url,
            "ANTHROPIC_API_KEY": "session-token",
            "TZ": "UTC",
            **(env or {}),
        }
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent_runner"], env=self.env,
                                     cwd=str(session.group), stdout=self._fh,
                                     stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self) -> None:
        wait_for(lambda: "started provider=" in self.text() or self.proc.poll() is not None,
                 "runner start")
        assert self.proc.poll() is None, self.text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._fh.close()
        return rc


def last_user_text(request: dict) -> str:
    content = [m for m in request["body"]["messages"] if m["role"] == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content if isinstance(b, dict))


def model_calls(fake: Any) -> list[dict]:
    return [r for r in list(fake.requests) if r["path"] == "/v1/messages"]
