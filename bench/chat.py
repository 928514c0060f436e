"""The bench's terminal-channel client: one persistent `cli.sock` connection per chat.

Why a module of its own: every phase (and every sandbox run) talks to the host through
it, and it is the part that times a turn: send -> ack frame, send -> reply frame. Every
wait is bounded by REPLY_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from bench import BenchError

REPLY_TIMEOUT = 30.0


class Chat:
    """One persistent connection to cli.sock, on one chat."""

    def __init__(self, sock: Path, name: str, run_id: str) -> None:
        self.sock = sock
        self.name = name
        self.run_id = run_id
        self.seq = 0
        self.acks: dict[str, asyncio.Future] = {}
        self.replies: dict[str, asyncio.Future] = {}
        self.stray = 0
        self.mismatched = 0
        self.errors: list[dict] = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None

    async def open(self) -> "Chat":
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.sock), limit=1 << 22), 10)
        self.task = asyncio.create_task(self._read())
        return self

    def _fail_all(self, exc: BaseException) -> None:
        for table in (self.acks, self.replies):
            for fut in table.values():
                if not fut.done():
                    fut.set_exception(exc)
            table.clear()

    async def _read(self) -> None:
        assert self.reader is not None
        try:
            while True:
                line = await self.reader.readline()
                now = time.perf_counter()
                if not line:
                    self._fail_all(BenchError(f"chat {self.name}: host closed the connection"))
                    return
                frame = json.loads(line)
                kind = frame.get("type")
                if kind == "ack":
                    fut = self.acks.pop(frame.get("id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(now)
                elif kind == "reply":
                    fut = self.replies.pop(frame.get("in_reply_to"), None)
                    if fut is not None and not fut.done():
                        fut.set_result((now, frame))
                    else:
                        self.stray += 1
                elif kind == "error":
                    self.errors.append(frame)
                    self._fail_all(BenchError(f"chat {self.name}: host error frame {frame}"))
        except (ConnectionError, ValueError) as e:
            self._fail_all(BenchError(f"chat {self.name}: {e}"))

    async def send(self, text: str) -> tuple[float, float]:
        """Send one message; (ack latency, reply latency) in ms."""
        assert self.writer is not None
        self.seq += 1
        mid = f"{self.run_id}-{self.name}-{self.seq}"
        loop = asyncio.get_running_loop()
        ack, rep = loop.create_future(), loop.create_future()
        self.acks[mid], self.replies[mid] = ack, rep
        frame = json.dumps({"type": "message", "text": text, "chat": self.name, "id": mid})
        t0 = time.perf_counter()
        self.writer.write(frame.encode() + b"\n")
        try:
            await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)
            t_ack = await asyncio.wait_for(ack, REPLY_TIMEOUT)
            t_rep, reply = await asyncio.wait_for(
                rep, max(0.1, REPLY_TIMEOUT - (time.perf_counter() - t0)))
        except asyncio.TimeoutError:
            self.acks.pop(mid, None)
            self.replies.pop(mid, None)
            raise BenchError(f"chat {self.name}: no reply to {mid} within "
                             f"{REPLY_TIMEOUT:.0f} s") from None
        if text not in str(reply.get("text", "")):
            self.mismatched += 1
        return (t_ack - t0) * 1000, (t_rep - t0) * 1000

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 2)
