"""A fake Discord on 127.0.0.1 (REST under /api/v10 and a gateway websocket at /gateway),
driven by the real discord.py client.

Gateway: HELLO (a short heartbeat interval), IDENTIFY → READY (counted: `identifies`),
RESUME → replay of missed events then RESUMED (or INVALID_SESSION for an unknown
session), heartbeats ACKed unless `ack = False`, dispatches MESSAGE_CREATE,
MESSAGE_UPDATE (a user's edit, or a change that is not an edit such as an embed
unfurling; the bot's own edits too, as Discord does), INTERACTION_CREATE, and
GUILD_CREATE / THREAD_CREATE to announce a guild's channels and threads (type 11, with
`parent_id`). `close_after_identify = <code>` closes every connection right after
IDENTIFY (a crash loop); `drop()` closes the live connections (4000).
REST: users/@me, gateway/bot (with session_start_limit), messages (JSON or multipart)
with edits and reactions, typing, DM channels, interaction callbacks, attachments.
JSON is answered with exactly `Content-Type: application/json` (a charset suffix
breaks discord.py's login). 429s carry `Via` and `retry_after` as Discord's do.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import WSMsgType, web

from fakes.base import Call, FakeServer, Rule
from fakes.contract import PlatformFake, Sent

BOT = {"id": "900000000000000001", "username": "andy", "discriminator": "0",
       "global_name": "Andy", "avatar": None, "bot": True, "flags": 0, "mfa_enabled": False,
       "verified": True, "email": None, "locale": "en-US", "public_flags": 0}
APP_ID = "900000000000000002"
EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)  # message timestamps; edits count up


def _json(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


class Session:
    def __init__(self, sid: str) -> None:
        self.id, self.seq = sid, 0
        self.log: list[dict[str, Any]] = []  # every dispatch, for RESUME replay
        self.ws: web.WebSocketResponse | None = None


class FakeDiscord(FakeServer, PlatformFake):
    channel, limit, typing, reply_refs, user = "discord", 2000, True, True, "31"
    idempotent_sends = True  # an enforced nonce answers a repeat with the first message

    def __init__(self, token: str = "discord-test-token") -> None:
        super().__init__()
        self.token = token
        self.heartbeat_ms = 500
        self.ack = True
        self.zombie = False  # a dead connection that stays open: no ACKs, no events
        self.close_after_identify: int | None = None
        self.identifies = 0
        self.resumes = 0
        self.heartbeats = 0
        self.sessions: dict[str, Session] = {}
        self.live: list[tuple[web.WebSocketResponse, Session | None]] = []
        self.next_id = 1_000_000
        self.messages: dict[str, dict[str, Any]] = {}
        self.nonces: dict[tuple[str, str], str] = {}  # (channel, enforced nonce) → message
        self.callbacks: list[dict[str, Any]] = []
        self.attachments: dict[str, bytes] = {}
        self.clicked: dict[str, str] = {}  # interaction id → message id
        self.edits = 0
        self.last_event: tuple[str, Any] | None = None  # the last user event, to replay
        self.thread_guild: dict[str, str] = {}  # thread id → its guild
        self._threads: dict[str, str] = {}  # thread id → its parent channel

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/cdn/{name}", self._cdn)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        return app

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def snowflake(self) -> str:
        with self.lock:
            self.next_id += 1
            return str(900_000_000_000_000_000 + self.next_id)

    # ---- test side --------------------------------------------------------------------
    def user_message(self, channel_id: str, content: str, *, user_id: str = "555",
                     guild_id: str | None = None, mention_bot: bool = False,
                     attachment: tuple[str, bytes, str] | None = None,
                     raw: dict[str, Any] | None = None) -> str:
        mid = self.snowflake()
        if mention_bot:
            content = f"<@{BOT['id']}> {content}"
        m: dict[str, Any] = {
            "id": mid, "channel_id": channel_id, "type": 0, "content": content,
            "author": {"id": user_id, "username": "ann", "discriminator": "0",
                       "global_name": "Ann", "avatar": None},
            "timestamp": "2026-01-01T00:00:00.000000+00:00", "edited_timestamp": None,
            "tts": False, "mention_everyone": False, "pinned": False, "embeds": [],
            "attachments": [], "mentions": [BOT] if mention_bot else [], "mention_roles": [],
            "components": [], "flags": 0}
        if guild_id:
            m["guild_id"] = guild_id
            m["member"] = {"roles": [], "joined_at": "2026-01-01T00:00:00.000000+00:00",
                           "deaf": False, "mute": False, "flags": 0}
        if attachment:
            name, data, mime = attachment
            aid = self.snowflake()
            self.attachments[f"{aid}-{name}"] = data
            url = f"{self.url}/cdn/{aid}-{name}"
            m["attachments"] = [{"id": aid, "filename": name, "size": len(data), "url": url,
                                 "proxy_url": url, "content_type": mime}]
        m.update(raw or {})
        self.messages[mid] = m
        self.last_event = ("MESSAGE_CREATE", json.loads(json.dumps(m)))
        self.dispatch("MESSAGE_CREATE", m)
        return mid

    def edit_message(self, message_id: str, content: str, *, edited: bool = True,
                     raw: dict[str, Any] | None = None) -> dict[str, Any]:
        """The author changes a message (MESSAGE_UPDATE with the whole message, as the
        v10 gateway sends it). `edited=False` is a change that is not an edit, such as an
        embed unfurling: `edited_timestamp` stays as it was. Returns the dispatched data
        (dispatch it again to replay the update)."""
        stamp = self._stamp()
        with self.lock:
            m = self.messages[message_id]
            m.update(content=content, **(raw or {}))
            if edited:
                m["edited_timestamp"] = stamp
            data = json.loads(json.dumps(m))
        self.last_event = ("MESSAGE_UPDATE", data)
        self.dispatch("MESSAGE_UPDATE", data)
        return data

    def guild(self, guild_id: str, channels: list[str],
              threads: list[tuple[str, str]] | None = None) -> None:
        """GUILD_CREATE: the bot joins a guild with these text channels and active
        threads, given as (thread id, parent channel id)."""
        self.dispatch("GUILD_CREATE", {
            "id": guild_id, "name": f"guild {guild_id}", "icon": None, "owner_id": "555",
            "features": [], "roles": [{"id": guild_id, "name": "@everyone", "permissions": "0",
                                       "position": 0, "color": 0, "hoist": False,
                                       "managed": False, "mentionable": False, "flags": 0}],
            "emojis": [], "stickers": [], "member_count": 2, "large": False,
            "unavailable": False, "joined_at": "2026-01-01T00:00:00.000000+00:00",
            "members": [], "voice_states": [], "presences": [], "stage_instances": [],
            "guild_scheduled_events": [], "soundboard_sounds": [],
            "channels": [{"id": c, "type": 0, "guild_id": guild_id, "name": f"chan-{c}",
                          "position": i, "permission_overwrites": [], "parent_id": None,
                          "nsfw": False, "topic": None, "last_message_id": None}
                         for i, c in enumerate(channels)],
            "threads": [self._thread(t, parent, guild_id) for t, parent in threads or []]})

    def start_thread(self, guild_id: str, parent_id: str) -> str:
        """THREAD_CREATE: a user starts a public thread under a channel; its id."""
        tid = self.snowflake()
        self._threads[tid] = parent_id
        self.dispatch("THREAD_CREATE", {**self._thread(tid, parent_id, guild_id),
                                        "newly_created": True})
        return tid

    @staticmethod
    def _thread(tid: str, parent_id: str, guild_id: str) -> dict[str, Any]:
        return {"id": tid, "type": 11, "guild_id": guild_id, "parent_id": parent_id,
                "owner_id": "555", "name": f"thread-{tid}", "last_message_id": None,
                "rate_limit_per_user": 0, "message_count": 0, "member_count": 1, "flags": 0,
                "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                    "archive_timestamp": "2026-01-01T00:00:00.000000+00:00",
                                    "locked": False}}

    def _stamp(self) -> str:
        with self.lock:
            self.edits += 1
            n = self.edits
        return (EPOCH + timedelta(seconds=n)).isoformat(timespec="microseconds")

    def click(self, message_id: str, custom_id: str, user_id: str = "555") -> str:
        m = self.messages[message_id]
        iid = self.snowflake()
        self.clicked[iid] = message_id
        self.dispatch("INTERACTION_CREATE", {
            "id": iid, "application_id": APP_ID, "type": 3, "token": f"tok{iid}", "version": 1,
            "channel_id": m["channel_id"], "channel": {"id": m["channel_id"], "type": 1},
            "user": {"id": user_id, "username": "ann", "discriminator": "0", "avatar": None},
            "data": {"custom_id": custom_id, "component_type": 2}, "message": m,
            "locale": "en-US", "app_permissions": "0", "entitlements": [],
            "authorizing_integration_owners": {}, "attachment_size_limit": 8388608})
        return iid

    def dispatch(self, event: str, data: Any) -> None:
        self.run(self._dispatch(event, data))

    def send_raw(self, text: str) -> None:
        """Send a raw (possibly garbage) frame on every live connection."""
        async def _send() -> None:
            for ws, _ in list(self.live):
                await ws.send_str(text)
        self.run(_send())

    def drop(self, code: int = 4000) -> None:
        async def _drop() -> None:
            for ws, _ in list(self.live):
                await ws.close(code=code)
        self.run(_drop())

    def sent(self, channel_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages.values()
                    if m["channel_id"] == channel_id and m["author"]["id"] == BOT["id"]]

    # ---- PlatformFake (tests/fakes/contract.py) ---------------------------------------
    def host_env(self) -> dict[str, str]:
        return {"DISCORD_BOT_TOKEN": self.token, "DISCORD_API_BASE": self.api_base,
                "DISCORD_GATEWAY_URL": self.gateway_url,
                "NANOCLAW_DISCORD_HEARTBEAT_TIMEOUT": "2", "NANOCLAW_DISCORD_RECONNECTS": "20"}

    def connected(self, host: Any) -> bool:
        try:
            return "discord connected" in (host.base / "logs" / "nanoclaw.log").read_text()
        except OSError:
            return False

    def chat(self, n: int) -> str:
        return str(4000 + n)  # a DM channel

    def new_thread(self, chat: str) -> str:
        gid = str(7000 + int(chat))
        self.guild(gid, [chat])
        tid = self.start_thread(gid, chat)
        self.thread_guild[tid] = gid
        return tid

    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        where = thread or chat
        return self.user_message(where, text, guild_id=self.thread_guild.get(where),
                                 attachment=file)

    def user_edits(self, chat: str, message_id: str, text: str) -> str:
        return edit_key(self.edit_message(message_id, text))

    def redeliver_last(self) -> None:
        assert self.last_event is not None
        self.dispatch(*self.last_event)

    def press(self, chat: str, card: Sent, index: int) -> None:
        self.click(card.id, card.buttons[index][1], user_id=self.user)

    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        where = [thread] if thread else [chat, *(t for t in self.thread_guild
                                                 if self._parent(t) == chat)]
        out = []
        for c in where:
            for m in self.sent(c):
                ref = (m.get("message_reference") or {}).get("message_id")
                out.append(Sent(
                    m["id"], m["content"] or "", None if c == chat else c,
                    None if ref is None else str(ref),
                    [(b["label"], b["custom_id"]) for row in m.get("components") or []
                     for b in row.get("components") or []],
                    [(a["filename"], self.attachments[a["filename"]])
                     for a in m.get("attachments") or []],
                    list(m.get("reactions") or []), m))
        return out

    def _parent(self, thread: str) -> str | None:
        return self._threads.get(thread)

    def send_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("POST /channels/{id}/messages", None)
                if c.params.get("channel_id") == chat]

    def typing_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("POST /channels/{id}/typing")
                if c.params.get("channel_id") == chat]

    def land_then_stall(self, chat: str) -> Rule:
        return self.inject("POST /channels/{id}/messages", land_then_stall=True, channel_id=chat)

    def rate_limit(self, chat: str, seconds: float) -> Rule:
        return self.inject("POST /channels/{id}/messages", status=429, retry_after=seconds,
                           channel_id=chat)

    def fail_sends(self, chat: str, count: int) -> Rule:
        # 503: not one discord.py retries by itself (it does 500, 502, 504 with sleeps)
        return self.inject("POST /channels/{id}/messages", count=count, status=503,
                           channel_id=chat)

    def refuse_sends(self, chat: str) -> Rule:
        return self.inject("POST /channels/{id}/messages", status=403, channel_id=chat)

    # ---- gateway ----------------------------------------------------------------------
    async def _dispatch(self, event: str, data: Any) -> None:
        for s in self.sessions.values():
            s.seq += 1
            frame = {"op": 0, "t": event, "s": s.seq, "d": data}
            s.log.append(frame)
            if s.ws is not None and not s.ws.closed and not self.zombie:
                try:
                    await s.ws.send_str(json.dumps(frame))
                except ConnectionError:
                    pass

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.record("gateway_connect", dict(request.query))
        session: Session | None = None
        entry: list[Any] = [ws, None]
        self.live.append(entry)  # type: ignore[arg-type]
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_ms}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op, d = frame.get("op"), frame.get("d")
                if op == 1:
                    self.heartbeats += 1
                    if self.ack and not self.zombie:
                        await ws.send_str(json.dumps({"op": 11}))
                elif op == 2:
                    self.identifies += 1
                    self.record("IDENTIFY", {"intents": d.get("intents")})
                    if self.close_after_identify is not None:
                        await ws.close(code=self.close_after_identify)
                        break
                    if d.get("token") != self.token:
                        await ws.close(code=4004)
                        break
                    session = Session(f"sess{self.snowflake()}")
                    self.sessions[session.id] = session
                    session.ws = ws
                    entry[1] = session
                    session.seq += 1
                    await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": session.seq, "d": {
                        "v": 10, "user": BOT, "guilds": [], "session_id": session.id,
                        "resume_gateway_url": self.gateway_url, "shard": [0, 1],
                        "application": {"id": APP_ID, "flags": 0}, "private_channels": [],
                        "relationships": []}}))
                elif op == 6:
                    self.resumes += 1
                    self.record("RESUME", {"seq": d.get("seq"), "session_id": d.get("session_id")})
                    s = self.sessions.get(d.get("session_id"))
                    if s is None:
                        await ws.send_str(json.dumps({"op": 9, "d": False}))
                        continue
                    session, s.ws, entry[1] = s, ws, s
                    for f in s.log:
                        if f["s"] > (d.get("seq") or 0):
                            await ws.send_str(json.dumps(f))
                    s.seq += 1
                    await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": s.seq, "d": {}}))
        finally:
            if session is not None and session.ws is ws:
                session.ws = None
            if entry in self.live:
                self.live.remove(entry)  # type: ignore[arg-type]
        return ws

    # ---- REST -------------------------------------------------------------------------
    def _error(self, status: int, retry_after: float | None = None) -> web.Response:
        if status == 429:
            return _json({"message": "You are being rate limited.", "retry_after": retry_after or 1,
                          "global": False}, 429, {"Via": "1.1 google",
                                                  "Retry-After": str(retry_after or 1)})
        msgs = {403: (50013, "Missing Permissions"), 404: (10003, "Unknown Channel"),
                401: (0, "401: Unauthorized")}
        code, text = msgs.get(status, (0, "Internal Server Error"))
        return _json({"message": text, "code": code}, status)

    async def _body(self, request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        files: dict[str, bytes] = {}
        if request.content_type.startswith("multipart/"):
            body: dict[str, Any] = {}
            reader = await request.multipart()
            async for part in reader:
                data = await part.read()  # type: ignore[union-attr]
                if part.name == "payload_json":  # type: ignore[union-attr]
                    body = json.loads(data)
                else:
                    files[part.filename or part.name or "file"] = bytes(data)  # type: ignore
            return body, files
        if request.can_read_body:
            try:
                return await request.json(), files
            except ValueError:
                return {}, files
        return {}, files

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        method = f"{request.method} /{path}"
        if request.headers.get("Authorization") != f"Bot {self.token}" and \
                not path.startswith("interactions/"):  # callbacks authenticate by token
            self.record(method, {}, "unauthorized")
            return self._error(401)
        body, files = await self._body(request)
        parts = path.split("/")
        params = {"path": path, **{k: v for k, v in body.items() if isinstance(v, (str, int))}}
        if len(parts) >= 2 and parts[0] == "channels":
            params["channel_id"] = parts[1]
        key = f"{request.method} {_shape(parts)}"
        bad = await self.misbehave(request, key, params, self._error)
        if bad is not None:
            return bad
        self.record(key, {**params, "body": body, "files": sorted(files)})
        return await self._route(request.method, parts, body, files)

    async def _route(self, verb: str, p: list[str], body: dict[str, Any],
                     files: dict[str, bytes]) -> web.Response:
        if p == ["users", "@me"] and verb == "GET":
            return _json(BOT)
        if p == ["oauth2", "applications", "@me"]:
            return _json({"id": APP_ID, "name": "Andy", "description": "", "icon": None,
                          "bot_public": False, "bot_require_code_grant": False,
                          "owner": {"id": "555", "username": "owner", "discriminator": "0",
                                    "avatar": None}, "verify_key": "00", "flags": 0})
        if p == ["gateway", "bot"]:
            return _json({"url": self.gateway_url, "shards": 1, "session_start_limit": {
                "total": 1000, "remaining": 1000 - self.identifies, "reset_after": 86_400_000,
                "max_concurrency": 1}})
        if p == ["gateway"]:
            return _json({"url": self.gateway_url})
        if p == ["users", "@me", "channels"] and verb == "POST":
            return _json({"id": f"7{body.get('recipient_id')}", "type": 1, "last_message_id": None,
                          "recipients": [{"id": str(body.get("recipient_id")), "username": "u",
                                          "discriminator": "0", "avatar": None}]})
        if len(p) == 2 and p[0] == "users" and verb == "GET":
            return _json({"id": p[1], "username": "user", "discriminator": "0", "avatar": None})
        if len(p) == 3 and p[0] == "channels" and p[2] == "typing":
            return web.Response(status=204)
        if len(p) == 3 and p[0] == "channels" and p[2] == "messages" and verb == "POST":
            content = body.get("content") or ""
            if len(content) > 2000:
                return _json({"message": "Invalid Form Body", "code": 50035}, 400)
            nonce = body.get("nonce")
            if nonce is not None and len(str(nonce)) > 25:
                return _json({"message": "Invalid Form Body", "code": 50035}, 400)
            if body.get("enforce_nonce") and (p[1], str(nonce)) in self.nonces:
                # Discord: the same author, the same nonce within minutes → that message
                return _json(self.messages[self.nonces[(p[1], str(nonce))]])
            mid = self.snowflake()
            m = {"id": mid, "channel_id": p[1], "type": 0, "content": content, "author": BOT,
                 "timestamp": "2026-01-01T00:00:00.000000+00:00", "edited_timestamp": None,
                 "tts": False, "mention_everyone": False, "pinned": False, "embeds": [],
                 "mentions": [], "mention_roles": [], "components": body.get("components") or [],
                 "attachments": [{"id": self.snowflake(), "filename": n, "size": len(d),
                                  "url": f"{self.url}/cdn/{n}", "proxy_url": f"{self.url}/cdn/{n}"}
                                 for n, d in files.items()], "flags": 0, "reactions": []}
            for n, d in files.items():
                self.attachments[n] = d
            if body.get("message_reference"):
                m["message_reference"] = body["message_reference"]
            with self.lock:
                self.messages[mid] = m
                if nonce is not None:
                    m["nonce"] = str(nonce)
                    self.nonces[(p[1], str(nonce))] = mid
            return _json(m)
        if len(p) == 4 and p[0] == "channels" and p[2] == "messages" and verb == "PATCH":
            m = self.messages.get(p[3])
            if m is None:
                return self._error(404)
            stamp = self._stamp()
            with self.lock:
                if "content" in body:
                    m["content"] = body["content"]
                if "components" in body:
                    m["components"] = body["components"]
                m["edited_timestamp"] = stamp
                data = json.loads(json.dumps(m))
            await self._dispatch("MESSAGE_UPDATE", data)  # Discord tells us of our own edits
            return _json(m)
        if len(p) >= 6 and p[0] == "channels" and p[4] == "reactions" and verb == "PUT":
            m = self.messages.get(p[3])
            if m is not None:
                with self.lock:
                    m["reactions"].append(p[5])
            return web.Response(status=204)
        if len(p) == 4 and p[0] == "interactions" and p[3] == "callback":
            self.callbacks.append({"id": p[1], **body})
            data = body.get("data") or {}
            m = self.messages.get(self.clicked.get(p[1], ""))
            if body.get("type") == 7 and m is not None:  # UPDATE_MESSAGE: edit the card
                stamp = self._stamp()
                with self.lock:
                    if data.get("content") is not None:
                        m["content"] = data["content"]
                    m["components"] = data.get("components") or []
                    m["edited_timestamp"] = stamp
                    update = json.loads(json.dumps(m))
                await self._dispatch("MESSAGE_UPDATE", update)
            return web.Response(status=204)
        return _json({"message": "404: Not Found", "code": 0}, 404)

    async def _cdn(self, request: web.Request) -> web.Response:
        data = self.attachments.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")


def edit_key(data: dict[str, Any]) -> str:
    """The inbound id of an edit: `edit<edited_timestamp in µs>:<message id>`."""
    at = datetime.fromisoformat(data["edited_timestamp"])
    micros = (at - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    return f"edit{micros}:{data['id']}"


def _shape(parts: list[str]) -> str:
    """`/channels/{id}/messages`: the route's shape, for injections by method."""
    return "/" + "/".join("{id}" if x.isdigit() or x.startswith("tok") else x for x in parts)
