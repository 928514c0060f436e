"""A fake Telegram Bot API on 127.0.0.1, driven by the real python-telegram-bot client.

`/bot<token>/<method>` (form, multipart or JSON bodies, as PTB sends them) for getMe,
getUpdates (long polling with offsets: an update stays until a later offset confirms
it), sendMessage, editMessageText, sendChatAction, answerCallbackQuery,
setMessageReaction, sendDocument, getFile; `/file/bot<token>/<path>` serves files.
Tests queue user messages and button clicks, read what the bot sent, and inject 429s,
5xx, stalls and dropped connections per method (see `FakeServer.inject`).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from fakes.base import FakeServer

BOT = {"id": 777000, "is_bot": True, "first_name": "Andy", "username": "andy_test_bot",
       "can_join_groups": True, "can_read_all_group_messages": False,
       "supports_inline_queries": False}
RAW_FIELDS = ("text", "caption", "callback_query_id", "file_id", "action")


def _value(key: str, v: str) -> Any:
    if key in RAW_FIELDS:
        return v
    try:
        return json.loads(v)
    except ValueError:
        return v


class FakeTelegram(FakeServer):
    def __init__(self, token: str = "123:TEST") -> None:
        super().__init__()
        self.token = token
        self.updates: list[dict[str, Any]] = []
        self.next_update = 1
        self.next_message = 1000
        self.messages: dict[int, dict[str, Any]] = {}  # every message, by id
        self.files: dict[str, tuple[str, bytes]] = {}  # file_id → (path, data)
        self.changed: asyncio.Condition | None = None

    def app(self) -> web.Application:
        self.changed = asyncio.Condition()
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.*}", self._file)
        return app

    @property
    def api_base(self) -> str:
        return self.url

    # ---- test side --------------------------------------------------------------------
    def user_message(self, chat_id: int, text: str = "", *, user_id: int | None = None,
                     first_name: str = "Ann", chat_type: str = "private",
                     thread_id: int | None = None, reply_to: int | None = None,
                     document: tuple[str, bytes, str] | None = None,
                     raw: dict[str, Any] | None = None) -> int:
        """Queue a message from a user; returns its message id."""
        mid = self._mid()
        user = {"id": user_id or chat_id, "is_bot": False, "first_name": first_name}
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type != "private":
            chat["title"] = "Group"
        m: dict[str, Any] = {"message_id": mid, "from": user, "chat": chat,
                             "date": int(time.time())}
        if text:
            m["caption" if document else "text"] = text
            ents = []
            at = f"@{BOT['username']}"
            if at in text:
                ents.append({"type": "mention", "offset": text.index(at), "length": len(at)})
            if ents:
                m["caption_entities" if document else "entities"] = ents
        if thread_id is not None:
            m["message_thread_id"], m["is_topic_message"] = thread_id, True
        if reply_to is not None and reply_to in self.messages:
            m["reply_to_message"] = self.messages[reply_to]
        if document:
            name, data, mime = document
            fid = f"file{mid}"
            self.files[fid] = (f"documents/{name}", data)
            m["document"] = {"file_id": fid, "file_unique_id": f"u{fid}", "file_name": name,
                             "mime_type": mime, "file_size": len(data)}
        self.messages[mid] = m
        self.push({"message": m})
        return mid

    def click(self, chat_id: int, message_id: int, data: str, user_id: int | None = None) -> str:
        """Queue a button click on a message the bot sent; returns the callback query id."""
        cqid = f"cq{self._mid()}"
        msg = self.messages.get(message_id) or {"message_id": message_id,
                                                 "chat": {"id": chat_id, "type": "private"},
                                                 "date": int(time.time())}
        self.push({"callback_query": {
            "id": cqid, "from": {"id": user_id or chat_id, "is_bot": False, "first_name": "Ann"},
            "chat_instance": "ci", "message": msg, "data": data}})
        return cqid

    def push(self, body: dict[str, Any]) -> int:
        """Queue one raw update (anything: fuzz tests send garbage); returns its id."""
        uid = self.next_update
        self.next_update += 1
        self.run(self._push({"update_id": uid, **body}))
        return uid

    async def _push(self, update: dict[str, Any]) -> None:
        assert self.changed is not None
        async with self.changed:
            self.updates.append(update)
            self.changed.notify_all()

    def sent(self, chat_id: int) -> list[dict[str, Any]]:
        """Messages the bot sent to a chat, in order (edits applied)."""
        with self.lock:
            return [m for m in self.messages.values()
                    if m["chat"]["id"] == chat_id and m.get("from", {}).get("id") == BOT["id"]]

    def _mid(self) -> int:
        with self.lock:
            self.next_message += 1
            return self.next_message

    # ---- the API ----------------------------------------------------------------------
    def _ok(self, result: Any) -> web.Response:
        return web.Response(text=json.dumps({"ok": True, "result": result}),
                            content_type="application/json")

    def _error(self, status: int, retry_after: float | None = None,
               description: str | None = None) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": status,
                                "description": description or {
                                    429: "Too Many Requests: retry later", 400: "Bad Request",
                                    401: "Unauthorized", 403: "Forbidden: bot was blocked",
                                    502: "Bad Gateway"}.get(
                                    status, "Internal Server Error")}
        if retry_after is not None:
            body["parameters"] = {"retry_after": int(retry_after)}
        return web.Response(status=status, text=json.dumps(body), content_type="application/json")

    async def _params(self, request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        params: dict[str, Any] = dict(request.query)
        files: dict[str, bytes] = {}
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.can_read_body:
            form = await request.post()
            for k, v in form.items():
                if hasattr(v, "file"):
                    files[k] = v.file.read()  # type: ignore[union-attr]
                    params[k] = getattr(v, "filename", k)
                else:
                    params[k] = _value(k, str(v))
        return params, files

    async def _api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            self.record(method, {}, "unauthorized")
            return self._error(401)
        params, files = await self._params(request)
        bad = await self.misbehave(request, method, params, self._error)
        if bad is not None:
            return bad
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            self.record(method, params, "unknown")
            return self._error(404, description="Not Found: method not found")
        if method != "getUpdates":
            self.record(method, params)
        return await handler(params, files)

    async def _m_getMe(self, p: dict, f: dict) -> web.Response:
        return self._ok(BOT)

    async def _m_getUpdates(self, p: dict, f: dict) -> web.Response:
        assert self.changed is not None
        offset = p.get("offset")
        timeout = float(p.get("timeout") or 0)
        async with self.changed:
            if isinstance(offset, int):
                self.updates = [u for u in self.updates if u["update_id"] >= offset]
            if not self.updates and timeout > 0:
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: bool(self.updates)),
                                           timeout)
                except asyncio.TimeoutError:
                    pass
            batch = list(self.updates[: int(p.get("limit") or 100)])
        self.record("getUpdates", {**p, "returned": [u["update_id"] for u in batch]})
        return self._ok(batch)

    def _bot_message(self, p: dict, **extra: Any) -> dict[str, Any]:
        mid = self._mid()
        m: dict[str, Any] = {"message_id": mid, "from": BOT, "date": int(time.time()),
                             "chat": {"id": int(p["chat_id"]), "type": "private"}, **extra}
        if p.get("message_thread_id") is not None:
            m["message_thread_id"] = p["message_thread_id"]
        rp = p.get("reply_parameters")
        if isinstance(rp, dict) and rp.get("message_id"):
            m["reply_to_message_id"] = rp["message_id"]
        if p.get("reply_markup"):
            m["reply_markup"] = p["reply_markup"]
        with self.lock:
            self.messages[mid] = m
        return m

    async def _m_sendMessage(self, p: dict, f: dict) -> web.Response:
        text = str(p.get("text") or "")
        if not text.strip():
            return self._error(400, description="Bad Request: message text is empty")
        if len(text) > 4096:
            return self._error(400, description="Bad Request: message is too long")
        return self._ok(self._bot_message(p, text=text))

    async def _m_sendDocument(self, p: dict, f: dict) -> web.Response:
        data = f.get("document", b"")
        fid = f"file{self._mid()}"
        self.files[fid] = (f"documents/{p.get('document')}", data)
        return self._ok(self._bot_message(p, document={
            "file_id": fid, "file_unique_id": "u" + fid, "file_name": p.get("document"),
            "file_size": len(data)}))

    async def _m_editMessageText(self, p: dict, f: dict) -> web.Response:
        m = self.messages.get(int(p.get("message_id") or 0))
        if m is None:
            return self._error(400, description="Bad Request: message to edit not found")
        if m.get("text") == p.get("text") and "reply_markup" not in p:
            return self._error(400, description="Bad Request: message is not modified")
        with self.lock:
            m["text"] = p.get("text")
            m["edit_date"] = int(time.time())
            if p.get("reply_markup"):
                m["reply_markup"] = p["reply_markup"]
            else:
                m.pop("reply_markup", None)
        return self._ok(m)

    async def _m_setMessageReaction(self, p: dict, f: dict) -> web.Response:
        m = self.messages.get(int(p.get("message_id") or 0))
        if m is not None:
            with self.lock:
                m["reactions"] = p.get("reaction")
        return self._ok(True)

    async def _m_sendChatAction(self, p: dict, f: dict) -> web.Response:
        return self._ok(True)

    async def _m_answerCallbackQuery(self, p: dict, f: dict) -> web.Response:
        return self._ok(True)

    async def _m_getFile(self, p: dict, f: dict) -> web.Response:
        fid = str(p.get("file_id"))
        if fid not in self.files:
            return self._error(400, description="Bad Request: invalid file_id")
        path, data = self.files[fid]
        return self._ok({"file_id": fid, "file_unique_id": "u" + fid, "file_size": len(data),
                         "file_path": path})

    async def _file(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        self.record("file", {"path": path})
        for p, data in self.files.values():
            if p == path:
                return web.Response(body=data, content_type="application/octet-stream")
        return web.Response(status=404)
