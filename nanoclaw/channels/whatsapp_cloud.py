"""WhatsApp through Meta's Cloud API (the Graph API), outbound side: the
`channel:whatsapp-cloud` worker POSTs to `{WHATSAPP_API_BASE}/{WHATSAPP_API_VERSION}/
{WHATSAPP_PHONE_NUMBER_ID}/messages` with the access token. What users send arrives
through the webhook door (`whatsapp_cloud_webhook.CloudWebhook`, /webhook/whatsapp-cloud).

Text is WhatsApp-formatted (*bold*, _italic_, ~strike~, ```code```) and split at 4096
characters. A question card with up to 3 options goes out as reply buttons, with 4-10 as
a list message, with more as numbered text that a number sent back answers; the
buttons' and rows' ids are `ncq:<card id>:<index>`, mapped back through the host's card
(as Telegram's). A file is uploaded (`/{phone id}/media`) and sent by its media id.
WhatsApp cannot edit a sent message: an edit fails for good, and so says.

Graph errors, sorted by what the channel worker does next: 130429 (throughput), 131056
(pair rate), 131048 (spam rate), 4/80007 (app rate) and HTTP 429 are waited out
(`RetryAfter`: Retry-After if given, else a pause per code); an expired or invalid
token (190, an OAuthException, HTTP 401) fails the send for good and is logged at ERROR
once, naming WHATSAPP_ACCESS_TOKEN; 131047 (more than 24 hours since the user last
wrote) fails for good saying the user must write first (after sending WHATSAPP_TEMPLATE,
if one is set); other 4xx fail for good, 5xx and network errors are retried.

platform_id `whatsapp-cloud:<wa_id>` (the user's number: the Cloud API has 1:1 chats).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import re
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from nanoclaw.channels.base import Channel, OutboundMessage, RetryAfter, SendError
from nanoclaw.channels.markdown import whatsapp_text
from nanoclaw.channels.text import (
    CALLBACK_PREFIX,
    Question,
    load_files,
    parse_question,
    plain_text,
    reply_target,
    retry_after_header,
)
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

LIMIT = 4096        # characters of a text body
BODY_LIMIT = 1024   # an interactive message's body
BUTTONS, ROWS = 3, 10
BUTTON_TITLE, ROW_TITLE, ROW_DESC = 20, 24, 72
CHOICE_ID = 200     # a list row's id (a button's may be 256)
# pauses (s) when Graph gives no Retry-After: throughput, pair rate, spam, app limits
PAUSE = {130429: 2.0, 131056: 6.0, 131048: 60.0, 4: 60.0, 80007: 60.0, 613: 60.0}
TRANSIENT = {1, 2, 131000, 131016, 133004}  # "something went wrong", service unavailable
TOKEN = {190, 102}
WINDOW_CLOSED = 131047
IMAGES = {"image/jpeg", "image/png"}
def choice_id(question_id: str, index: int) -> str:
    data = f"{CALLBACK_PREFIX}:{question_id}:{index}"
    if len(data) > CHOICE_ID:
        raise SendError(f"card id too long for a WhatsApp button: {question_id!r}",
                        permanent=True)
    return data


# ---- the Graph API (both sides use it) -----------------------------------------------
class GraphError(Exception):
    def __init__(self, status: int, error: dict[str, Any], retry_after: float | None = None):
        self.status, self.retry_after = status, retry_after
        code = error.get("code")
        self.code = code if isinstance(code, int) and not isinstance(code, bool) else None
        self.type = str(error.get("type") or "")
        data = error.get("error_data") if isinstance(error.get("error_data"), dict) else {}
        detail = data.get("details") or error.get("error_user_msg") or ""
        self.message = " ".join(str(x) for x in (error.get("message") or "", detail) if x)[:300]
        super().__init__(f"HTTP {status}, code {self.code}: {self.message}")


class MediaRefused(ValueError):
    """A media URL off the allowlist (WHATSAPP_MEDIA_HOSTS): not fetched."""


class Graph:
    """Just the Graph calls NanoClaw makes, on one aiohttp session opened on first use."""

    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.settings = settings
        self.base = f"{settings.whatsapp_api_base}/{settings.whatsapp_api_version}"
        self.phone_id = settings.whatsapp_phone_number_id
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        api = urlsplit(settings.whatsapp_api_base)
        self.schemes = {"https", api.scheme}  # plain http only where the API base is
        self.hosts = {h.strip().lower() for h in settings.whatsapp_media_hosts.split(",")
                      if h.strip()} | {(api.hostname or "").lower()}

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Authorization": f"Bearer {self.settings.whatsapp_access_token}"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        async with self.session().request(method, f"{self.base}/{path}", **kwargs) as r:
            body = await r.read()
            try:
                obj = json.loads(body) if body else {}
            except ValueError:
                obj = None
            err = obj.get("error") if isinstance(obj, dict) else None
            if r.status >= 400 or isinstance(err, dict):
                raise GraphError(r.status, err if isinstance(err, dict) else {
                    "message": body[:200].decode("utf-8", "replace")},
                    retry_after_header(r.headers))
            if not isinstance(obj, dict):
                raise GraphError(r.status, {"message": "not a JSON object", "code": 2})
            return obj

    async def send(self, to: str, message: dict[str, Any]) -> str:
        """POST one message; its wamid."""
        got = await self.call("POST", f"{self.phone_id}/messages", json={
            "messaging_product": "whatsapp", "recipient_type": "individual", "to": to,
            **message})
        try:
            return str(got["messages"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise GraphError(200, {"message": f"no message id in {str(got)[:100]}",
                                   "code": 2}) from None

    async def mark_read(self, message_id: str, typing: bool = True) -> None:
        await self.call("POST", f"{self.phone_id}/messages", json={
            "messaging_product": "whatsapp", "status": "read", "message_id": message_id,
            **({"typing_indicator": {"type": "text"}} if typing else {})})

    async def upload(self, name: str, data: bytes, mime: str) -> str:
        form = aiohttp.FormData()
        form.add_field("messaging_product", "whatsapp")
        form.add_field("type", mime)
        form.add_field("file", data, filename=name, content_type=mime)
        got = await self.call("POST", f"{self.phone_id}/media", data=form)
        if not isinstance(got.get("id"), str):
            raise GraphError(200, {"message": "no media id", "code": 2})
        return got["id"]

    def allowed(self, url: str) -> bool:
        try:
            u = urlsplit(url)
            host = (u.hostname or "").lower()
        except ValueError:
            return False
        return bool(host) and u.scheme in self.schemes and any(
            host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)

    async def media(self, media_id: str, limit: int) -> tuple[bytes, str | None]:
        """A media object's bytes (and type): its URL from Graph, then the URL itself,
        which must be on the allowlist (MediaRefused) and at most `limit` bytes."""
        meta = await self.call("GET", media_id)
        url = meta.get("url")
        if not isinstance(url, str) or not self.allowed(url):
            raise MediaRefused(f"media URL {str(url)[:80]!r} is not on WHATSAPP_MEDIA_HOSTS")
        size = meta.get("file_size")
        if isinstance(size, int) and size > limit:
            raise ValueError(f"larger than {limit >> 20} MB")
        async with self.session().get(url, allow_redirects=False) as r:
            if r.status != 200:
                raise GraphError(r.status, {"message": "media download failed"})
            data = bytearray()
            async for block in r.content.iter_chunked(1 << 16):
                data += block
                if len(data) > limit:
                    raise ValueError(f"larger than {limit >> 20} MB")
        mime = meta.get("mime_type")
        return bytes(data), mime if isinstance(mime, str) else None


def wa_id(platform_id: str) -> str:
    v = platform_id.removeprefix("whatsapp-cloud:")
    if not v.isdigit() or not 5 <= len(v) <= 20:
        raise SendError(f"not a WhatsApp Cloud chat: {platform_id!r}", permanent=True)
    return v


# ---- the channel ---------------------------------------------------------------------
class WhatsAppCloudChannel(Channel):
    name = "whatsapp-cloud"
    supports_threads = False

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return bool(settings.whatsapp_access_token)

    async def setup(self) -> None:
        if not self.settings.whatsapp_phone_number_id:
            raise ConfigError("WHATSAPP_PHONE_NUMBER_ID is not set (whatsapp-cloud needs it"
                              " with WHATSAPP_ACCESS_TOKEN)")
        self.graph = Graph(self.settings)
        self.token_told = False
        try:  # the token and the number, once: say at start-up what is wrong
            await asyncio.wait_for(self.graph.call("GET", self.graph.phone_id), 15)
        except GraphError as e:
            if self._token_error(e):
                self._tell_token(e)
            else:
                logger.warning("whatsapp-cloud: checking the phone number failed: {}", e)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            logger.warning("whatsapp-cloud: Graph API not reachable yet: {!r}", e)

    async def teardown(self) -> None:
        if getattr(self, "graph", None):
            await self.graph.close()

    # ---- errors -----------------------------------------------------------------------
    @staticmethod
    def _token_error(e: GraphError) -> bool:
        return e.code in TOKEN or e.status == 401

    def _tell_token(self, e: GraphError) -> None:
        if not self.token_told:
            self.token_told = True
            logger.error("whatsapp-cloud: Meta rejected WHATSAPP_ACCESS_TOKEN ({}); set a"
                         " valid (permanent System User) token and restart"
                         " channel:whatsapp-cloud", e.message or e)

    def _mapped(self, e: GraphError) -> Exception:
        if e.status == 429 or e.code in PAUSE:
            return RetryAfter(e.retry_after or PAUSE.get(e.code or 0, 5.0),
                              f"whatsapp-cloud rate limit (code {e.code}): {e.message}")
        if self._token_error(e):
            self._tell_token(e)
            return SendError("WhatsApp refused WHATSAPP_ACCESS_TOKEN (expired or invalid):"
                             " the owner must set a new one", permanent=True)
        if e.code == WINDOW_CLOSED:
            return SendError("outside WhatsApp's 24-hour window: this user last wrote more"
                             " than 24 hours ago, so only a template can reach them; they"
                             " must write first", permanent=True)
        if e.status >= 500 or e.code in TRANSIENT:
            return SendError(f"whatsapp-cloud: {e}")
        return SendError(f"whatsapp-cloud refused: {e}", permanent=True)

    # ---- outbound ---------------------------------------------------------------------
    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        to = wa_id(platform_id)
        try:
            return await self._deliver(to, message)
        except GraphError as e:
            mapped = self._mapped(e)
            if e.code == WINDOW_CLOSED and self.settings.whatsapp_template:
                mapped = await self._template(to, mapped)
            raise mapped from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise SendError(f"whatsapp-cloud: {type(e).__name__}: {e}") from None

    async def _template(self, to: str, error: Exception) -> Exception:
        name, _, lang = self.settings.whatsapp_template.partition(":")
        try:
            await self.graph.send(to, {"type": "template", "template": {
                "name": name, "language": {"code": lang or "en_US"}}})
        except (GraphError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return SendError(f"{error} (the template {name!r} failed too: {e})", permanent=True)
        return SendError(f"{error}; sent the template {name!r} asking them to write",
                         permanent=True)

    async def _deliver(self, to: str, message: OutboundMessage) -> str:
        c = message.content
        op = c.get("operation")
        if op == "reaction":
            mid = str(c.get("messageId") or "")
            if not mid:
                raise SendError("a reaction needs messageId", permanent=True)
            await self.graph.send(to, {"type": "reaction", "reaction": {
                "message_id": mid, "emoji": str(c.get("emoji") or "👍")}})
            return mid
        if op == "edit":
            raise SendError("WhatsApp cannot edit a sent message", permanent=True)
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        parts = self._payloads(c)
        files = load_files(c)  # a bad file is a permanent SendError
        done = message.parts  # resume a half-sent split
        target = reply_target(message.in_reply_to)
        for i, p in enumerate(parts):
            if i < len(done):
                continue
            if i == 0 and target and target.startswith("wamid."):
                p = {**p, "context": {"message_id": target}}
            message.sent(await self.graph.send(to, p))
        for j, f in enumerate(files):
            if len(parts) + j < len(done):
                continue
            mime = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
            media = await self.graph.upload(f.name, f.data, mime)
            kind = "image" if mime in IMAGES else "document"
            message.sent(await self.graph.send(to, {kind: {"id": media, **(
                {"filename": f.name} if kind == "document" else {})}, "type": kind}))
        if not done:
            raise SendError("empty message", permanent=True)
        return done[0]

    def _payloads(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        q = parse_question(c)
        text = plain_text(c)
        if q is not None and len(q.options) > ROWS:  # too many for a list: numbered
            text += "\n\n" + "\n".join(f"{i + 1}. {o['label']}" for i, o in enumerate(q.options))
            text += "\n\nReply with the number."
            q = None
        chunks = whatsapp_text(text, LIMIT)
        if q is None:
            return [_text(t) for t in chunks]
        body = chunks.pop() if chunks and len(chunks[-1]) <= BODY_LIMIT else "Choose one:"
        return [_text(t) for t in chunks] + [{"type": "interactive",
                                              "interactive": _interactive(q, body)}]

    async def set_typing(self, platform_id: str, thread_id: str | None) -> None:
        """Read receipt plus "typing…" on the chat's last message (WhatsApp shows it
        until the reply, at most 25 s). The door shows it when a message arrives."""
        mid = self._last_inbound(platform_id)
        if mid:
            await self.graph.mark_read(mid)

    def _last_inbound(self, platform_id: str) -> str | None:
        mid = self.host.last_message_id(platform_id)
        return mid if isinstance(mid, str) and mid.startswith("wamid.") else None

    async def open_dm(self, handle: str) -> str:
        """`whatsapp-cloud:15551234567`, `+1 555 123 4567` → the DM's platform id."""
        digits = re.sub(r"[\s()+.-]", "", handle.removeprefix("whatsapp-cloud:"))
        return f"whatsapp-cloud:{wa_id(digits)}"


def _text(body: str) -> dict[str, Any]:
    return {"type": "text", "text": {"body": body, "preview_url": "://" in body}}


def _titles(q: Question, limit: int) -> list[str]:
    """Option labels cut to `limit`, made unique (WhatsApp refuses equal titles)."""
    out: list[str] = []
    for i, o in enumerate(q.options):
        t = o["label"] if len(o["label"]) <= limit else o["label"][:limit - 1] + "…"
        if t in out:
            t = f"{t[:limit - len(str(i + 1)) - 1]} {i + 1}"
        out.append(t)
    return out


def _interactive(q: Question, body: str) -> dict[str, Any]:
    if len(q.options) <= BUTTONS:
        return {"type": "button", "body": {"text": body}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": choice_id(q.question_id, i), "title": t}}
            for i, t in enumerate(_titles(q, BUTTON_TITLE))]}}
    rows = []
    for i, t in enumerate(_titles(q, ROW_TITLE)):
        row = {"id": choice_id(q.question_id, i), "title": t}
        if t != q.options[i]["label"]:
            row["description"] = q.options[i]["label"][:ROW_DESC]
        rows.append(row)
    return {"type": "list", "body": {"text": body},
            "action": {"button": "Choose", "sections": [{"title": "Options", "rows": rows}]}}
