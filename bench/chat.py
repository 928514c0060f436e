"""The bench's terminal-channel client: one persistent `cli.sock` connection per chat.

Why a module of its own: every phase (and every sandbox run) talks to the host through
it, and it is the part that times a turn: send -> ack frame, send -> reply frame (and keeps the
last send's wall-clock times, for the per-stage breakdown). Every wait is bounded by
REPLY_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

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
        # the last send: id, text, wall-clock send and reply times (epoch s), latency (ms);
        # the per-stage breakdown lines these up with the host's timestamped rows
        self.last: dict[str, Any] = {}

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
        wall0 = time.time()
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
        turn = (t_rep - t0) * 1000
        self.last = {"id": mid, "text": text, "sent": wall0, "replied": wall0 + turn / 1000,
                     "turn_ms": turn}
        return (t_ack - t0) * 1000, turn

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 2)


# --- a client that survives the host (bench/chaos.py) --------------------------------------

RECONNECT_MIN = 0.02
RECONNECT_MAX = 1.0
ACK_RESEND = 5.0  # an unacked message is sent again after this long on a live connection


class Sent:
    """One message of a `SurvivingClient`: when it went out, its ack, every reply."""

    def __init__(self, mid: str, chat: str, text: str, t0: float) -> None:
        self.mid, self.chat, self.text, self.t0 = mid, chat, text, t0
        self.sends = 0                 # frames written (1 + resends)
        self.last_send = 0.0
        self.acked: float | None = None
        self.first_reply: float | None = None
        self.replies: dict[str, str] = {}  # reply frame id -> text, in order of arrival
        self.done: asyncio.Event = asyncio.Event()


class SurvivingClient:
    """One connection to cli.sock for several chats, which outlives the host.

    It reconnects with backoff whenever the socket goes away (a killed `channel:cli`
    worker or host), subscribes to every chat again (so replies that waited in the
    outbox come) and sends every unanswered message again under the same id: the
    terminal channel stores a message once per (chat, id) (`inbound_events` is unique
    on it), so a resend is answered once. Replies are matched by `in_reply_to`; a reply
    frame id seen twice is a redelivered frame, two reply ids for one message are two
    answers."""

    def __init__(self, sock: Path, chats: list[str]) -> None:
        self.sock, self.chats = sock, list(chats)
        self.sent: dict[str, Sent] = {}
        self.frames_seen: dict[str, int] = {}   # reply frame id -> times received
        self.redelivered = 0                    # reply frames received again (same id)
        self.stray: list[dict] = []             # replies to no message of ours
        self.error_frames: list[dict] = []
        self.connects = 0
        self.resends = 0
        self.connected = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None
        self.closing = False

    def start(self) -> "SurvivingClient":
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        delay = RECONNECT_MIN
        while not self.closing:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.sock), limit=1 << 22), 5)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            self.connects += 1
            self.writer = writer
            resend = asyncio.create_task(self._resend_loop(writer))
            try:
                for chat in self.chats:
                    writer.write(json.dumps({"type": "subscribe", "chat": chat}).encode() + b"\n")
                for s in list(self.sent.values()):
                    if not s.replies:
                        self._write(writer, s, again=True)
                await writer.drain()
                self.connected.set()
                while True:
                    line = await reader.readline()
                    if not line:
                        break
                    self._frame(json.loads(line))
            except (OSError, ValueError, asyncio.IncompleteReadError):
                pass
            finally:
                self.connected.clear()
                self.writer = None
                resend.cancel()
                writer.close()
                with contextlib.suppress(BaseException):
                    await resend

    def _write(self, writer: asyncio.StreamWriter, s: Sent, again: bool = False) -> None:
        if s.sends and again:
            self.resends += 1
        s.sends += 1
        s.last_send = time.perf_counter()
        writer.write(json.dumps({"type": "message", "text": s.text, "chat": s.chat,
                                 "id": s.mid}).encode() + b"\n")

    async def _resend_loop(self, writer: asyncio.StreamWriter) -> None:
        """Send again what a live connection did not ack within ACK_RESEND s."""
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            for s in list(self.sent.values()):
                if s.acked is None and not s.replies and now - s.last_send > ACK_RESEND:
                    self._write(writer, s, again=True)
            with contextlib.suppress(Exception):
                await writer.drain()

    def _frame(self, frame: dict) -> None:
        now = time.perf_counter()
        kind = frame.get("type")
        if kind == "ack":
            s = self.sent.get(frame.get("id"))
            if s is not None and s.acked is None:
                s.acked = now
        elif kind == "reply":
            rid = str(frame.get("id"))
            n = self.frames_seen.get(rid, 0)
            self.frames_seen[rid] = n + 1
            if n:
                self.redelivered += 1
                return
            s = self.sent.get(frame.get("in_reply_to"))
            if s is None:
                self.stray.append(frame)
                return
            s.replies[rid] = str(frame.get("text", ""))
            if s.first_reply is None:
                s.first_reply = now
                s.done.set()
        elif kind == "error":
            self.error_frames.append(frame)

    async def send(self, chat: str, text: str, mid: str, timeout: float) -> Sent:
        """Send (now if connected, else on the next connection) and wait up to `timeout`
        s for the first reply; the returned record says whether one came."""
        s = Sent(mid, chat, text, time.perf_counter())
        self.sent[mid] = s
        if self.writer is not None and self.connected.is_set():
            self._write(self.writer, s)
            with contextlib.suppress(Exception):
                await self.writer.drain()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(s.done.wait(), timeout)
        return s

    async def close(self) -> None:
        self.closing = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
