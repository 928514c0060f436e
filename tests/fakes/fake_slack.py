"""A fake Slack on 127.0.0.1: the Web API under /api/ and Socket Mode (a websocket at
/link, handed out by apps.connections.open), driven by the real slack-sdk clients.

Socket Mode: `hello` on connect; events and block_actions arrive as envelopes that the
app must acknowledge (`{"envelope_id"}`); an unacknowledged envelope is sent again on
the next connection, and `redeliver` sends one again as Slack's retries do (a new
envelope id, the same event). A user's edit (`edit_message`), a change that is not an
edit (`edited=False`: an unfurl, no new `edited` stamp) and a deletion arrive as
`message_changed` / `message_deleted` events; so does the bot's own chat.update, as in
Slack. Web API: auth.test, chat.postMessage, chat.update, reactions.add,
conversations.open, the files_upload_v2 trio (getUploadURLExternal, the upload URL,
completeUploadExternal) and files.info, plus private file downloads. 429s carry
`Retry-After` and `{"ok": false, "error": "ratelimited"}` as Slack's do.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

from aiohttp import WSMsgType, web

from fakes.base import Call, FakeServer, Rule
from fakes.contract import PlatformFake, Sent

BOT_USER, BOT_ID = "UBOT0001", "BBOT0001"


def _ok(**data: Any) -> web.Response:
    return web.json_response({"ok": True, **data})


class FakeSlack(FakeServer, PlatformFake):
    channel, limit, typing, reply_refs, user = "slack", 40_000, False, False, "UCLICK01"
    idempotent_sends = True  # each part's metadata marker is found in the history

    def __init__(self, bot_token: str = "xoxb-test", app_token: str = "xapp-test") -> None:
        super().__init__()
        self.bot_token, self.app_token = bot_token, app_token
        self.sockets: list[web.WebSocketResponse] = []
        self.unacked: dict[str, dict[str, Any]] = {}
        self.acked: list[str] = []
        self.envelopes: dict[str, dict[str, Any]] = {}  # every envelope ever sent
        self.connections = 0
        self.clock = 1_700_000_000.0
        self.messages: dict[str, dict[str, Any]] = {}  # ts → message (bot and users)
        self.files: dict[str, dict[str, Any]] = {}
        self.last_user_envelope: str | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/link", self._socket)
        app.router.add_post("/upload/{fid}", self._upload)
        app.router.add_get("/files-pri/{fid}/{name}", self._download)
        app.router.add_route("*", "/api/{method}", self._api)
        return app

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/"

    def ts(self) -> str:
        with self.lock:
            self.clock = max(self.clock + 0.000100, time.time())  # Slack's ts is a time
            return f"{self.clock:.6f}"

    # ---- test side --------------------------------------------------------------------
    def user_message(self, channel: str, text: str, *, user: str = "UANN0001",
                     thread_ts: str | None = None, file: tuple[str, bytes, str] | None = None,
                     raw: dict[str, Any] | None = None) -> str:
        ts = self.ts()
        ev: dict[str, Any] = {"type": "message", "channel": channel, "user": user, "text": text,
                              "ts": ts, "channel_type": "im" if channel.startswith("D") else "channel",
                              "event_ts": ts}
        if thread_ts:
            ev["thread_ts"] = thread_ts
        if file:
            name, data, mime = file
            fid = f"F{len(self.files) + 1:08d}"
            self.files[fid] = {"id": fid, "name": name, "mimetype": mime, "size": len(data),
                               "data": data}
            ev["subtype"] = "file_share"
            ev["files"] = [{"id": fid, "name": name, "mimetype": mime, "size": len(data),
                            "url_private_download": f"{self.url}/files-pri/{fid}/{name}"}]
        ev.update(raw or {})
        self.messages[ts] = ev
        self.last_user_envelope = self.envelope("events_api", {"token": "t", "team_id": "T1", "api_app_id": "A1",
                                     "type": "event_callback", "event_id": f"Ev{ts}",
                                     "event_time": int(time.time()), "event": ev})
        return ts

    def edit_message(self, ts: str, text: str, *, edited: bool = True,
                     raw: dict[str, Any] | None = None) -> str:
        """The author changes a message they sent (a `message_changed` event); with
        `edited=False` it is a change that is not an edit (an unfurl adds attachments,
        the text stays). Returns the envelope id."""
        stamp = self.ts()
        with self.lock:
            before = self.messages[ts]
            after = {**before, "text": text, **(raw or {})}
            if edited:
                after["edited"] = {"user": before.get("user"), "ts": stamp}
            self.messages[ts] = after
        self.last_user_envelope = self.envelope(
            "events_api", self._callback(self._changed(before, after, stamp)))
        return self.last_user_envelope

    def delete_message(self, ts: str) -> str:
        """The author deletes a message (a `message_deleted` event); the envelope id."""
        stamp = self.ts()
        with self.lock:
            before = self.messages.pop(ts)
        ev = {"type": "message", "subtype": "message_deleted", "hidden": True,
              "channel": before["channel"], "channel_type": before.get("channel_type", "channel"),
              "ts": stamp, "event_ts": stamp, "deleted_ts": ts,
              "previous_message": _inner(before)}
        return self.envelope("events_api", self._callback(ev))

    def redeliver(self, envelope_id: str) -> str:
        """Slack retries an envelope (as after a missed ack): the same event under a new
        envelope id, even if it was acknowledged. Returns the new envelope id."""
        old = self.envelopes[envelope_id]
        eid = uuid.uuid4().hex
        env = {**old, "envelope_id": eid, "retry_attempt": old["retry_attempt"] + 1,
               "retry_reason": "timeout"}
        self.unacked[eid] = self.envelopes[eid] = env
        self.send_raw(json.dumps(env))
        return eid

    def _changed(self, before: dict[str, Any], after: dict[str, Any], stamp: str) -> dict:
        return {"type": "message", "subtype": "message_changed", "hidden": True,
                "channel": before["channel"], "channel_type": before.get("channel_type", "channel"),
                "ts": stamp, "event_ts": stamp, "message": _inner(after),
                "previous_message": _inner(before)}

    @staticmethod
    def _callback(ev: dict[str, Any]) -> dict[str, Any]:
        return {"token": "t", "team_id": "T1", "api_app_id": "A1", "type": "event_callback",
                "event_id": f"Ev{ev['event_ts']}", "event_time": int(time.time()), "event": ev}

    def click(self, channel: str, ts: str, action_id: str, user: str = "UANN0001") -> None:
        self.envelope("interactive", {
            "type": "block_actions", "user": {"id": user, "username": "ann"},
            "channel": {"id": channel}, "container": {"type": "message", "message_ts": ts,
                                                      "channel_id": channel},
            "message": {"ts": ts}, "trigger_id": f"trig{uuid.uuid4().hex[:8]}",
            "actions": [{"type": "button", "action_id": action_id, "block_id": "b",
                         "value": "0", "action_ts": self.ts()}]})

    def envelope(self, kind: str, payload: Any, envelope_id: str | None = None) -> str:
        eid = envelope_id or uuid.uuid4().hex
        env = {"envelope_id": eid, "type": kind, "payload": payload,
               "accepts_response_payload": False, "retry_attempt": 0, "retry_reason": ""}
        self.unacked[eid] = self.envelopes[eid] = env
        self.send_raw(json.dumps(env))
        return eid

    def send_raw(self, text: str) -> None:
        async def _send() -> None:
            for ws in list(self.sockets):
                if not ws.closed:
                    await ws.send_str(text)
        self.run(_send())

    def drop(self) -> None:
        async def _drop() -> None:
            for ws in list(self.sockets):
                await ws.close()
        self.run(_drop())

    def sent(self, channel: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages.values()
                    if m["channel"] == channel and m.get("bot_id") == BOT_ID]

    # ---- PlatformFake (tests/fakes/contract.py) ---------------------------------------
    def host_env(self) -> dict[str, str]:
        return {"SLACK_BOT_TOKEN": self.bot_token, "SLACK_APP_TOKEN": self.app_token,
                "SLACK_API_BASE": self.api_base}

    def connected(self, host: Any) -> bool:
        return self.connections > 0

    def chat(self, n: int) -> str:
        return f"C6{n:03d}"

    def new_thread(self, chat: str) -> str:
        return self.ts()  # a thread root's ts

    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        return self.user_message(chat, text, thread_ts=thread, file=file)

    def user_edits(self, chat: str, message_id: str, text: str) -> str:
        self.edit_message(message_id, text)
        return f"edit{self.messages[message_id]['edited']['ts']}:{message_id}"

    def redeliver_last(self) -> None:
        assert self.last_user_envelope is not None
        self.redeliver(self.last_user_envelope)

    def press(self, chat: str, card: Sent, index: int) -> None:
        self.click(chat, card.id, card.buttons[index][1], user=self.user)

    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        out = []
        for m in self.sent(chat):
            if thread is not None and m.get("thread_ts") != thread:
                continue
            buttons = [(b["text"]["text"], b["action_id"]) for blk in m.get("blocks") or []
                       if blk.get("type") == "actions" for b in blk.get("elements") or []]
            files = [(self.files[f]["name"], self.files[f].get("data", b""))
                     for f in m.get("files") or []]
            out.append(Sent(m["ts"], m.get("text") or "", m.get("thread_ts"), None, buttons,
                            files, list(m.get("reactions") or []), m))
        return out

    def send_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("chat.postMessage", None)
                if c.params.get("channel") == chat]

    def typing_calls(self, chat: str) -> list[Call]:
        return []  # Slack shows bots no typing indicator

    def land_then_stall(self, chat: str) -> Rule:
        return self.inject("chat.postMessage", land_then_stall=True, channel=chat)

    def rate_limit(self, chat: str, seconds: float) -> Rule:
        return self.inject("chat.postMessage", status=429, retry_after=seconds, channel=chat)

    def fail_sends(self, chat: str, count: int) -> Rule:
        return self.inject("chat.postMessage", count=count, status=500, channel=chat)

    def refuse_sends(self, chat: str) -> Rule:
        return self.inject("chat.postMessage", status=200, channel=chat)  # channel_not_found

    # ---- Socket Mode ------------------------------------------------------------------
    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.connections += 1
        self.record("socket_connect", dict(request.query))
        self.sockets.append(ws)
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1,
                                      "connection_info": {"app_id": "A1"},
                                      "debug_info": {"host": "fake"}}))
        for env in list(self.unacked.values()):  # redeliver what was never acknowledged
            await ws.send_str(json.dumps(env))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        eid = json.loads(msg.data).get("envelope_id")
                    except ValueError:
                        continue
                    if eid and self.unacked.pop(eid, None) is not None:
                        self.acked.append(eid)
        finally:
            self.sockets.remove(ws)
        return ws

    # ---- Web API ----------------------------------------------------------------------
    def _error(self, status: int, retry_after: float | None = None) -> web.Response:
        if status == 429:
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429,
                                     headers={"Retry-After": str(int(retry_after or 1))})
        if status < 300:  # a Slack-style failure: HTTP 200, ok false
            return web.json_response({"ok": False, "error": "channel_not_found"})
        return web.Response(status=status, text="upstream error")

    async def _api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        p: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            p.update(await request.json())
        elif request.can_read_body:
            p.update({k: str(v) for k, v in (await request.post()).items()})
        auth = request.headers.get("Authorization", "")
        want = self.app_token if method == "apps.connections.open" else self.bot_token
        if auth != f"Bearer {want}":
            self.record(method, p, "unauthorized")
            return web.json_response({"ok": False, "error": "invalid_auth"})
        bad = await self.misbehave(request, method, p, self._error)
        if bad is not None:
            return bad
        self.record(method, p)
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        return await handler(p)

    async def _m_auth_test(self, p: dict) -> web.Response:
        return _ok(url="https://fake.slack.com/", team="Fake", user="andy", team_id="T1",
                   user_id=BOT_USER, bot_id=BOT_ID)

    async def _m_apps_connections_open(self, p: dict) -> web.Response:
        return _ok(url=f"ws://127.0.0.1:{self.port}/link?ticket={uuid.uuid4().hex[:8]}")

    def _post(self, channel: str, text: str, thread_ts: Any = None, **extra: Any) -> dict:
        ts = self.ts()
        m = {"type": "message", "channel": channel, "text": text, "ts": ts, "bot_id": BOT_ID,
             "user": BOT_USER, **extra}
        if thread_ts:
            m["thread_ts"] = thread_ts
        with self.lock:
            self.messages[ts] = m
        return m

    async def _m_chat_postMessage(self, p: dict) -> web.Response:
        text = str(p.get("text") or "")
        if len(text) > 40_000:
            return web.json_response({"ok": False, "error": "msg_too_long"})
        blocks = p.get("blocks")
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        meta = p.get("metadata")
        if isinstance(meta, str):
            meta = json.loads(meta)
        m = self._post(p["channel"], text, p.get("thread_ts"), blocks=blocks,
                       **({"metadata": meta} if meta else {}))
        return _ok(channel=p["channel"], ts=m["ts"], message=m)

    def _history(self, p: dict, keep: Callable[[dict], bool]) -> web.Response:
        """Newest first, from `oldest` on; metadata only when asked for, as Slack does."""
        oldest = float(p.get("oldest") or 0)
        with self.lock:
            ms = [dict(m) for m in self.messages.values()
                  if m.get("channel") == p.get("channel") and float(m["ts"]) >= oldest
                  and keep(m)]
        if str(p.get("include_all_metadata")).lower() not in ("true", "1"):
            for m in ms:
                m.pop("metadata", None)
        ms.sort(key=lambda m: float(m["ts"]), reverse=True)
        return _ok(messages=ms[:int(p.get("limit") or 100)], has_more=False)

    async def _m_conversations_history(self, p: dict) -> web.Response:
        return self._history(p, lambda m: not m.get("thread_ts") or m["thread_ts"] == m["ts"])

    async def _m_conversations_replies(self, p: dict) -> web.Response:
        ts = str(p.get("ts"))
        return self._history(p, lambda m: m["ts"] == ts or m.get("thread_ts") == ts)

    async def _m_chat_update(self, p: dict) -> web.Response:
        m = self.messages.get(str(p.get("ts")))
        if m is None:
            return web.json_response({"ok": False, "error": "message_not_found"})
        stamp = self.ts()
        with self.lock:
            before = dict(m)
            m["text"] = p.get("text")
            blocks = p.get("blocks")
            m["blocks"] = json.loads(blocks) if isinstance(blocks, str) else blocks
            m["edited"] = {"user": m.get("user"), "ts": stamp}
            after = dict(m)
        # Slack tells the app about its own edits too (a message_changed with bot_id)
        eid = uuid.uuid4().hex
        env = {"envelope_id": eid, "type": "events_api", "accepts_response_payload": False,
               "payload": self._callback(self._changed(before, after, stamp)),
               "retry_attempt": 0, "retry_reason": ""}
        self.unacked[eid] = self.envelopes[eid] = env
        for ws in list(self.sockets):
            if not ws.closed:
                await ws.send_str(json.dumps(env))
        return _ok(channel=p["channel"], ts=m["ts"], text=m["text"])

    async def _m_reactions_add(self, p: dict) -> web.Response:
        m = self.messages.get(str(p.get("timestamp")))
        if m is None:
            return web.json_response({"ok": False, "error": "message_not_found"})
        with self.lock:
            m.setdefault("reactions", []).append(p.get("name"))
        return _ok()

    async def _m_users_info(self, p: dict) -> web.Response:
        return _ok(user={"id": p.get("user"), "name": "ann",
                         "profile": {"display_name": "Ann", "real_name": "Ann Example"}})

    async def _m_conversations_open(self, p: dict) -> web.Response:
        return _ok(channel={"id": "D" + str(p.get("users"))[1:]})

    async def _m_files_getUploadURLExternal(self, p: dict) -> web.Response:
        fid = f"F{len(self.files) + 1:08d}"
        self.files[fid] = {"id": fid, "name": p.get("filename"), "size": int(p.get("length") or 0)}
        return _ok(upload_url=f"{self.url}/upload/{fid}", file_id=fid)

    async def _m_files_completeUploadExternal(self, p: dict) -> web.Response:
        files = p.get("files")
        files = json.loads(files) if isinstance(files, str) else files
        out = []
        for f in files or []:
            rec = self.files.get(f["id"], {})
            rec.update({"title": f.get("title"), "channel": p.get("channel_id")})
            self._post(str(p.get("channel_id")), "", p.get("thread_ts"), files=[f["id"]])
            out.append({"id": f["id"], "name": rec.get("name"), "title": f.get("title")})
        return _ok(files=out)

    async def _m_files_info(self, p: dict) -> web.Response:
        f = self.files.get(str(p.get("file")))
        if f is None:
            return web.json_response({"ok": False, "error": "file_not_found"})
        return _ok(file={k: v for k, v in f.items() if k != "data"})

    async def _upload(self, request: web.Request) -> web.Response:
        fid = request.match_info["fid"]
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            data = b""
            async for part in reader:
                data = bytes(await part.read())  # type: ignore[union-attr]
        else:
            data = await request.read()
        self.files.setdefault(fid, {"id": fid})["data"] = data
        self.record("upload", {"file_id": fid, "size": len(data)})
        return web.Response(text="OK - 1")

    async def _download(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.bot_token}":
            return web.Response(status=403)
        f = self.files.get(request.match_info["fid"])
        if f is None or "data" not in f:
            return web.Response(status=404)
        return web.Response(body=f["data"], content_type="application/octet-stream")


def _inner(m: dict[str, Any]) -> dict[str, Any]:
    """A message as Slack nests it in message_changed/deleted (no channel fields)."""
    return {k: v for k, v in m.items() if k not in ("channel", "channel_type", "event_ts")}
