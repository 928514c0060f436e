"""Resend's REST API (`RESEND_API_URL`, default https://api.resend.com), plain aiohttp:
`POST /emails` to send (with `Idempotency-Key`, so a retried send is never doubled),
`GET /emails/receiving/{id}` for a received mail's content (webhooks carry only its
metadata), `GET /emails/receiving` to poll, and the signed download URLs it hands out
(the raw message, attachments), fetched without our key.

Errors sorted for the channel worker: 429 `RetryAfter` (its `retry-after`), 409 (a
concurrent request with the same key) and 5xx worth retrying, other 4xx (a bad address,
an unverified domain, a refused key) fail the send for good.
"""

from __future__ import annotations

import asyncio
import base64
from email.message import EmailMessage
from email.utils import formataddr
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from nanoclaw.channels.base import RetryAfter, SendError
from nanoclaw.channels.text import OutFile
from nanoclaw.config import Settings

MAX_DOWNLOAD = 30 << 20
DOWNLOAD_HOSTS = (".resend.com", ".resend.app", ".cloudfront.net")


class ResendError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"Resend {status}: {message}"[:300])
        self.status, self.retry_after = status, retry_after


class Resend:
    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.settings = settings
        self.base = settings.resend_api_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, body: Any = None,
                   headers: dict[str, str] | None = None) -> Any:
        h = {"Authorization": f"Bearer {self.settings.resend_api_key}",
             "User-Agent": "nanoclaw", **(headers or {})}
        async with self.session().request(method, self.base + path, json=body,
                                          headers=h) as r:
            text = await r.text()
            if r.status >= 400:
                retry = r.headers.get("retry-after")
                try:
                    message = (await r.json(content_type=None)).get("message") or text
                except Exception:
                    message = text
                raise ResendError(r.status, str(message)[:200],
                                  float(retry) if retry and retry.replace(".", "").isdigit()
                                  else None)
            try:
                return await r.json(content_type=None)
            except ValueError:
                raise ResendError(r.status, "not JSON") from None

    # ---- sending ----------------------------------------------------------------------------
    async def send(self, *, sender: str, sender_name: str, to: str, subject: str, text: str,
                   html: str, headers: dict[str, str], files: list[OutFile], key: str) -> str:
        body: dict[str, Any] = {
            "from": formataddr((sender_name, sender)) if sender_name else sender,
            "to": [to], "subject": subject, "text": text, "html": html, "headers": headers}
        if files:
            body["attachments"] = [{"filename": f.name,
                                    "content": base64.b64encode(f.data).decode()}
                                   for f in files]
        try:
            got = await self.call("POST", "/emails", body, {"Idempotency-Key": key})
        except ResendError as e:
            raise mapped(e) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise SendError(f"Resend: {type(e).__name__}: {e}"[:300]) from None
        mid = got.get("id") if isinstance(got, dict) else None
        if not isinstance(mid, str) or not mid:
            raise SendError("Resend answered without an email id")
        return mid

    # ---- receiving ---------------------------------------------------------------------------
    async def received(self, email_id: str) -> dict[str, Any]:
        got = await self.call("GET", f"/emails/receiving/{email_id}")
        if not isinstance(got, dict):
            raise ResendError(200, "a received email that is not an object")
        return got

    async def received_list(self, limit: int = 50) -> list[dict[str, Any]]:
        got = await self.call("GET", f"/emails/receiving?limit={limit}")
        data = got.get("data") if isinstance(got, dict) else None
        return [d for d in data or [] if isinstance(d, dict)]

    def allowed(self, url: str) -> bool:
        try:
            u, api = urlsplit(url), urlsplit(self.base)
            host = (u.hostname or "").lower()
            same = (host, u.port, u.scheme) == ((api.hostname or "").lower(), api.port,
                                                api.scheme)
        except ValueError:
            return False
        return not u.username and (same or (u.scheme == "https" and host.endswith(
            DOWNLOAD_HOSTS)))

    async def download(self, url: str) -> bytes:
        if not self.allowed(url):
            raise ResendError(0, f"download from an unexpected host refused: {url[:80]}")
        async with self.session().get(url, allow_redirects=False) as r:
            if r.status != 200:
                raise ResendError(r.status, "download failed")
            data = await r.content.read(MAX_DOWNLOAD + 1)
            if len(data) > MAX_DOWNLOAD:
                raise ResendError(r.status, "download too large")
            return data

    async def raw_message(self, email_id: str) -> bytes:
        """The received mail as the receiving server got it (its raw download), else
        rebuilt from the JSON fields and attachment downloads."""
        got = await self.received(email_id)
        raw = got.get("raw") if isinstance(got.get("raw"), dict) else {}
        if isinstance(raw.get("download_url"), str):
            return await self.download(raw["download_url"])
        return rebuild(got, [await self._attachment(email_id, a)
                             for a in (got.get("attachments") or [])[:10]
                             if isinstance(a, dict)])

    async def _attachment(self, email_id: str, a: dict[str, Any]) -> tuple[str, str, bytes]:
        got = await self.call("GET", f"/emails/receiving/{email_id}/attachments/{a.get('id')}")
        url = got.get("download_url") if isinstance(got, dict) else None
        data = await self.download(url) if isinstance(url, str) else b""
        return (str(a.get("filename") or "file"),
                str(a.get("content_type") or "application/octet-stream"), data)


def rebuild(got: dict[str, Any], files: list[tuple[str, str, bytes]]) -> bytes:
    """A received email's JSON (from, subject, headers, text, html) as a message."""
    msg = EmailMessage()
    headers = got.get("headers")
    pairs = headers.items() if isinstance(headers, dict) else [
        (h.get("name"), h.get("value")) for h in headers or [] if isinstance(h, dict)]
    skip = {"content-type", "content-transfer-encoding", "mime-version"}
    for k, v in pairs:
        if isinstance(k, str) and isinstance(v, (str, list)) and k.lower() not in skip:
            for one in v if isinstance(v, list) else [v]:
                try:
                    msg[k] = str(one).replace("\r", " ").replace("\n", " ")
                except Exception:  # a header the stdlib will not take: left out
                    continue
    for name, key in (("From", "from"), ("Subject", "subject"), ("Message-ID", "message_id")):
        if name not in msg and isinstance(got.get(key), str):
            msg[name] = got[key].replace("\r", " ").replace("\n", " ")
    text, html = got.get("text"), got.get("html")
    if isinstance(text, str) and text:
        msg.set_content(text)
        if isinstance(html, str) and html:
            msg.add_alternative(html, subtype="html")
    elif isinstance(html, str) and html:
        msg.set_content(html, subtype="html")
    else:
        msg.set_content("")
    for name, mime, data in files:
        main, _, sub = mime.partition("/")
        msg.add_attachment(data, maintype=main or "application", subtype=sub or "octet-stream",
                           filename=name)
    return msg.as_bytes()


def mapped(e: ResendError) -> Exception:
    if e.status == 429:
        return RetryAfter(e.retry_after or 1.0, str(e))
    if e.status == 409 or e.status >= 500 or e.status == 0:
        return SendError(str(e))
    return SendError(str(e), permanent=True)
