"""A fake Telegram Bot API on 127.0.0.1, driven by the real python-telegram-bot client.

`/bot<token>/<method>` (form, multipart or JSON bodies, as PTB sends them) for getMe,
getUpdates (long polling with offsets: an update stays until a later offset confirms
it), sendMessage, editMessageText, sendChatAction, answerCallbackQuery,
setMessageReaction, sendDocument, getFile; `/file/bot<token>/<path>` serves files.
Tests queue user messages, their edits and button clicks, read what the bot sent, and
inject 429s, 5xx, stalls and dropped connections per method (see `FakeServer.inject`).

`parse_mode=HTML` is parsed as Telegram does (supported tags only, properly nested,
entities `&lt; &gt; &amp; &quot; &#N;`; stricter than Telegram in refusing a bare `&`):
what fails answers 400 "can't parse entities", what parses is stored as plain `text`
plus `entities`, and the 4096 limit applies to the parsed text. `redeliver(update_id)`
sends an update again after it was confirmed, as an at-least-once platform may.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from typing import Any

from aiohttp import web

from fakes.base import Call, FakeServer, Rule
from fakes.contract import PlatformFake, Sent

BOT = {"id": 777000, "is_bot": True, "first_name": "Andy", "username": "andy_test_bot",
       "can_join_groups": True, "can_read_all_group_messages": False,
       "supports_inline_queries": False}
RAW_FIELDS = ("text", "caption", "callback_query_id", "file_id", "action")
HTML_TAGS = {"b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline",
             "ins": "underline", "s": "strikethrough", "strike": "strikethrough",
             "del": "strikethrough", "code": "code", "pre": "pre", "a": "text_link",
             "tg-spoiler": "spoiler", "span": "spoiler", "blockquote": "blockquote",
             "tg-emoji": "custom_emoji"}
TAG = re.compile(r'<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s+[a-zA-Z-]+(?:="[^"<>]*")?)*)\s*>')
ATTR = re.compile(r'([a-zA-Z-]+)="([^"<>]*)"')
ENTITY = re.compile(r"&(lt|gt|amp|quot|#[0-9]{1,7}|#x[0-9a-fA-F]{1,6});")


def parse_html(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Telegram's parse_mode HTML: (plain text, entities); ValueError says what is wrong."""
    plain: list[str] = []
    stack: list[tuple[str, int, dict[str, str]]] = []
    entities: list[dict[str, Any]] = []
    at = 0

    def where() -> str:
        return f"byte offset {len(text[:at].encode())}"

    def offset() -> int:
        return len("".join(plain).encode("utf-16-le")) // 2

    while at < len(text):
        ch = text[at]
        if ch == "<":
            m = TAG.match(text, at)
            if m is None:
                raise ValueError(f"Unclosed start tag at {where()}")
            name = m.group(2).lower()
            if m.group(1):
                if not stack or stack[-1][0] != name:
                    want = f'"</{stack[-1][0]}>"' if stack else "nothing"
                    raise ValueError(f'Unmatched end tag at {where()}, expected {want}, '
                                     f'found "</{name}>"')
                tag, start, attrs = stack.pop()
                ent: dict[str, Any] = {"type": HTML_TAGS[tag], "offset": start,
                                       "length": offset() - start}
                if tag == "a":
                    ent["url"] = attrs["href"]
                if ent["length"]:
                    entities.append(ent)
            else:
                if name not in HTML_TAGS:
                    raise ValueError(f'Unsupported start tag "{name}" at {where()}')
                if stack and stack[-1][0] in ("code", "pre") and not (
                        stack[-1][0] == "pre" and name == "code"):
                    raise ValueError(f'Entities can\'t be nested in "{stack[-1][0]}" at {where()}')
                attrs = dict(ATTR.findall(m.group(3)))
                if name == "a" and not attrs.get("href"):
                    raise ValueError(f"Can't find href of a link at {where()}")
                stack.append((name, offset(), {k: html.unescape(v) for k, v in attrs.items()}))
            at = m.end()
        elif ch == "&":
            m = ENTITY.match(text, at)
            if m is None:
                raise ValueError(f"Character entity expected at {where()}")
            plain.append(html.unescape(m.group()))
            at = m.end()
        elif ch == ">":
            raise ValueError(f"Unexpected end tag at {where()}")
        else:
            plain.append(ch)
            at += 1
    if stack:
        raise ValueError(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return "".join(plain), entities


def _value(key: str, v: str) -> Any:
    if key in RAW_FIELDS:
        return v
    try:
        return json.loads(v)
    except ValueError:
        return v


class FakeTelegram(FakeServer, PlatformFake):
    channel, limit, typing, reply_refs, user = "telegram", 4096, True, True, "9"

    def __init__(self, token: str = "123:TEST") -> None:
        super().__init__()
        self.token = token
        self.updates: list[dict[str, Any]] = []
        self.next_update = 1
        self.next_message = 1000
        self.messages: dict[int, dict[str, Any]] = {}  # every message, by id
        self.delivered: dict[int, dict[str, Any]] = {}  # every update, by id
        self.replays: list[dict[str, Any]] = []  # confirmed updates to send again
        self.files: dict[str, tuple[str, bytes]] = {}  # file_id → (path, data)
        self.changed: asyncio.Condition | None = None
        self.last_update: int | None = None

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

    def edit_message(self, message_id: int, text: str) -> int:
        """The user edits a message they sent; returns the `edited_message` update id."""
        with self.lock:
            m = dict(self.messages[message_id], edit_date=int(time.time()))
            m["caption" if "document" in m else "text"] = text
            self.messages[message_id] = m
        return self.push({"edited_message": m})

    def redeliver(self, update_id: int) -> None:
        """Send an update again on the next poll, even though it was confirmed."""
        async def _replay() -> None:
            assert self.changed is not None
            async with self.changed:
                self.replays.append(self.delivered[update_id])
                self.changed.notify_all()
        self.run(_replay())

    def click(self, chat_id: int, message_id: int, data: str,
                     user_id: int | None = None) -> str:
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
        self.last_update = uid
        self.run(self._push({"update_id": uid, **body}))
        return uid

    async def _push(self, update: dict[str, Any]) -> None:
        assert self.changed is not None
        async with self.changed:
            self.updates.append(update)
            self.delivered[update["update_id"]] = update
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

    # ---- PlatformFake (tests/fakes/contract.py) ---------------------------------------
    def host_env(self) -> dict[str, str]:
        return {"TELEGRAM_BOT_TOKEN": self.token, "TELEGRAM_API_BASE": self.url,
                "NANOCLAW_TELEGRAM_POLL_TIMEOUT": "1"}

    def connected(self, host: Any) -> bool:
        return bool(self.calls_of("getUpdates"))

    def chat(self, n: int) -> str:
        return str(600 + n)  # a private chat: its id is the user's

    def new_thread(self, chat: str) -> str:
        return str(self._mid())  # a forum topic

    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        return str(self.user_message(int(chat), text, document=file,
                                     thread_id=None if thread is None else int(thread)))

    def user_edits(self, chat: str, message_id: str, text: str) -> str:
        return f"edit{self.edit_message(int(message_id), text)}:{message_id}"

    def redeliver_last(self) -> None:
        assert self.last_update is not None
        self.redeliver(self.last_update)

    def press(self, chat: str, card: Sent, index: int) -> None:
        self.click(int(chat), int(card.id), card.buttons[index][1], int(self.user))

    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        out = []
        for m in self.sent(int(chat)):
            t = None if m.get("message_thread_id") is None else str(m["message_thread_id"])
            if thread is not None and t != thread:
                continue
            rows = (m.get("reply_markup") or {}).get("inline_keyboard") or []
            doc = m.get("document")
            out.append(Sent(
                str(m["message_id"]), m.get("text") or "", t,
                None if m.get("reply_to_message_id") is None else str(m["reply_to_message_id"]),
                [(b["text"], b["callback_data"]) for row in rows for b in row],
                [(doc["file_name"], self.files[doc["file_id"]][1])] if doc else [],
                [r.get("emoji", "") for r in m.get("reactions") or []], m))
        return out

    def send_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("sendMessage", None)
                if str(c.params.get("chat_id")) == chat]

    def typing_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("sendChatAction") if str(c.params.get("chat_id")) == chat]

    def land_then_stall(self, chat: str) -> Rule:
        return self.inject("sendMessage", land_then_stall=True, chat_id=chat)

    def rate_limit(self, chat: str, seconds: float) -> Rule:
        return self.inject("sendMessage", status=429, retry_after=seconds, chat_id=chat)

    def fail_sends(self, chat: str, count: int) -> Rule:
        return self.inject("sendMessage", count=count, status=502, chat_id=chat)

    def refuse_sends(self, chat: str) -> Rule:
        return self.inject("sendMessage", status=403, chat_id=chat)

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
            if not self.updates and not self.replays and timeout > 0:
                try:
                    await asyncio.wait_for(self.changed.wait_for(
                        lambda: bool(self.updates or self.replays)), timeout)
                except asyncio.TimeoutError:
                    pass
            batch = self.replays + list(self.updates[: int(p.get("limit") or 100)])
            self.replays = []
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

    def _text(self, p: dict) -> tuple[str, dict[str, Any]] | web.Response:
        """The text to store (parsed if HTML) and its entities, or the 400 to answer."""
        text, extra = str(p.get("text") or ""), {}
        if p.get("parse_mode") == "HTML":
            try:
                text, ents = parse_html(text)
            except ValueError as e:
                return self._error(400, description=f"Bad Request: can't parse entities: {e}")
            extra = {"entities": ents} if ents else {}
        elif p.get("parse_mode"):
            return self._error(400, description="Bad Request: unsupported parse_mode")
        if not text.strip():
            return self._error(400, description="Bad Request: message text is empty")
        if len(text.encode("utf-16-le")) // 2 > 4096:
            return self._error(400, description="Bad Request: message is too long")
        return text, extra

    async def _m_sendMessage(self, p: dict, f: dict) -> web.Response:
        parsed = self._text(p)
        if isinstance(parsed, web.Response):
            return parsed
        text, extra = parsed
        return self._ok(self._bot_message(p, text=text, **extra))

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
        parsed = self._text(p)
        if isinstance(parsed, web.Response):
            return parsed
        text, extra = parsed
        if m.get("text") == text and "reply_markup" not in p:
            return self._error(400, description="Bad Request: message is not modified")
        with self.lock:
            m["text"] = text
            m.pop("entities", None)
            m.update(extra)
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
