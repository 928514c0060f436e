"""Google Chat, the calls both sides make: the check of the bearer token Google sends
with every event (`Verifier`), and the Chat REST API as the service account (`Chat`).

Two kinds of token reach /webhook/googlechat, and each is checked with google-auth
(`google.auth.jwt.decode`) against certificates we fetch and cache (`Cache-Control`
max-age, at most a day; an unknown key id refetches at most once a minute):
- classic Chat: issuer `chat@system.gserviceaccount.com`, signed by that account's keys
  (GOOGLE_CHAT_CERTS_URL), audience the project number;
- an OIDC ID token (Workspace add-ons, and Chat apps set to the app-URL audience):
  issuer `https://accounts.google.com`, Google's keys (GOOGLE_CHAT_ID_CERTS_URL),
  audience the app's URL, `email` verified and either `chat@system.gserviceaccount.com`
  or a `service-<n>@gcp-sa-gsuiteaddons.iam.gserviceaccount.com` signer.
GOOGLE_CHAT_AUDIENCE lists what is accepted (a number is a project number, a URL an app
URL). A failure raises `Rejected` naming the check.

The service account's token comes from google-auth's `service_account.Credentials`
(its `token_uri` from the key file, so a test key points it at a fake), refreshed in a
thread when it is within five minutes of expiry.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.request
from typing import Any
from urllib.parse import quote

import aiohttp
import google.auth.jwt as gjwt

from nanoclaw.channels.text import retry_after_header
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError

CHAT_ISSUER = "chat@system.gserviceaccount.com"
ID_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
ADDON_SIGNER = re.compile(r"service-[0-9]+@gcp-sa-gsuiteaddons\.iam\.gserviceaccount\.com")
SCOPES = ["https://www.googleapis.com/auth/chat.bot"]
SKEW = 300
FETCH_TIMEOUT = 5.0
REFETCH_EVERY = 60.0


class Rejected(Exception):
    def __init__(self, check: str, detail: str = ""):
        super().__init__(f"{check}: {detail}" if detail else check)
        self.check = check


class ChatError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


def audiences(settings: Settings) -> tuple[list[str], list[str]]:
    """(project numbers, app URLs) from GOOGLE_CHAT_AUDIENCE."""
    items = [a.strip() for a in settings.google_chat_audience.split(",") if a.strip()]
    return [a for a in items if a.isdigit()], [a for a in items if not a.isdigit()]


class Certs:
    """One certificate set ({kid: PEM}), cached as its Cache-Control says."""

    def __init__(self, url: str, clock=time.time):
        self.url, self.clock = url, clock
        self.certs: dict[str, str] = {}
        self.until = 0.0
        self.tried = -REFETCH_EVERY
        self.lock = threading.Lock()

    def prefetch(self) -> None:
        """Fetch the certificates in a thread now, so no event waits for them."""
        def run() -> None:
            try:
                self.get("")
            except Rejected:
                pass
        threading.Thread(target=run, name="gchat-certs", daemon=True).start()

    def get(self, kid: str) -> dict[str, str]:
        with self.lock:
            now = self.clock()
            if now >= self.until or (kid not in self.certs and now - self.tried >= REFETCH_EVERY):
                self.tried = now
                try:
                    with urllib.request.urlopen(self.url, timeout=FETCH_TIMEOUT) as r:  # noqa: S310
                        certs = json.loads(r.read(1 << 20))
                        age = re.search(r"max-age=(\d+)", r.headers.get("Cache-Control", ""))
                    if isinstance(certs, dict):
                        self.certs = {k: v for k, v in certs.items() if isinstance(v, str)}
                        self.until = now + min(86400, int(age.group(1)) if age else 3600)
                except Exception as e:
                    if not self.certs:
                        raise Rejected("certificates unavailable",
                                       f"{type(e).__name__}: {e}") from None
            if kid not in self.certs:
                raise Rejected("unknown signing key", kid[:40])
            return self.certs


class Verifier:
    def __init__(self, settings: Settings):
        self.numbers, self.urls = audiences(settings)
        self.chat_certs = Certs(settings.google_chat_certs_url)
        self.id_certs = Certs(settings.google_chat_id_certs_url)
        for certs in (self.chat_certs, self.id_certs):
            certs.prefetch()

    def check(self, authorization: str) -> dict[str, Any]:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Rejected("no bearer token")
        token = token.strip()
        try:
            header = gjwt.decode_header(token)
            unverified = gjwt.decode(token, verify=False)
        except (ValueError, TypeError) as e:
            raise Rejected("malformed token", str(e)[:100]) from None
        iss = unverified.get("iss")
        if iss == CHAT_ISSUER:
            certs, allowed, kind = self.chat_certs, self.numbers, "project number"
        elif iss in ID_ISSUERS:
            certs, allowed, kind = self.id_certs, self.urls, "app URL"
        else:
            raise Rejected("issuer", f"{str(iss)[:80]!r} is neither Chat nor Google")
        if not allowed:
            raise Rejected("audience", f"GOOGLE_CHAT_AUDIENCE names no {kind} for this token")
        if header.get("alg") != "RS256":
            raise Rejected("algorithm", f"{str(header.get('alg'))[:20]} is not RS256")
        kid = header.get("kid")
        keys = certs.get(kid if isinstance(kid, str) else "")
        try:
            claims = gjwt.decode(token, certs=keys, audience=allowed, clock_skew_in_seconds=SKEW)
        except ValueError as e:
            msg = str(e)
            check = ("expired" if "expired" in msg.lower() else
                     "not yet valid" if "too early" in msg.lower() else
                     "audience" if "audience" in msg.lower() else
                     "signature" if "signature" in msg.lower() else "malformed token")
            raise Rejected(check, msg[:160]) from None
        if iss in ID_ISSUERS:
            email = claims.get("email")
            if claims.get("email_verified") is not True or not isinstance(email, str) or not (
                    email == CHAT_ISSUER or ADDON_SIGNER.fullmatch(email)):
                raise Rejected("signer", f"{str(email)[:80]!r} is not Chat or a Workspace"
                               " add-on")
        return claims


def service_account_info(settings: Settings) -> dict[str, Any]:
    raw = settings.google_chat_credentials
    if not raw and settings.google_chat_service_account_file:
        try:
            with open(settings.google_chat_service_account_file, encoding="utf-8") as fh:
                raw = fh.read()
        except OSError as e:
            raise ConfigError(f"GOOGLE_CHAT_SERVICE_ACCOUNT_FILE: {e.strerror}") from None
    try:
        info = json.loads(raw)
    except ValueError:
        raise ConfigError("GOOGLE_CHAT_CREDENTIALS is not a service account's JSON key"
                          ) from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ConfigError("the Google Chat credentials are not a service account key")
    return info


class Chat:
    """The Chat REST calls NanoClaw makes, as the service account."""

    def __init__(self, settings: Settings, timeout: float = 30.0):
        from google.oauth2 import service_account

        self.base = settings.google_chat_api_base
        try:
            self.creds = service_account.Credentials.from_service_account_info(
                service_account_info(settings), scopes=SCOPES)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"the Google Chat service account key is unusable: {e}"
                              ) from None
        self.timeout = timeout
        self.lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                json_serialize=lambda o: json.dumps(o, ensure_ascii=False))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def token(self) -> str:
        async with self.lock:
            if not self.creds.valid:  # google-auth: no token, or within its refresh margin
                from google.auth.exceptions import RefreshError
                from google.auth.transport.requests import Request

                try:
                    await asyncio.to_thread(self.creds.refresh, Request())
                except RefreshError as e:
                    raise ChatError(401, f"token endpoint: {e}") from None
            return self.creds.token

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None,
                   params: dict[str, str] | None = None, raw: bool = False) -> Any:
        token = await self.token()
        async with self.session().request(
                method, f"{self.base}/v1/{path}", json=body, params=params,
                allow_redirects=False, headers={"Authorization": f"Bearer {token}"}) as r:
            data = await r.read()
            if r.status == 401:
                self.creds.token = None  # refreshed next time
            if r.status >= 400:
                try:
                    err = json.loads(data).get("error") or {}
                    msg = f"{err.get('status', '')} {err.get('message', '')}".strip()
                except (ValueError, AttributeError):
                    msg = data[:200].decode("utf-8", "replace")
                raise ChatError(r.status, msg[:300], retry_after_header(r.headers))
            if raw:
                return data, r.headers.get("Content-Type")
            try:
                obj = json.loads(data) if data else {}
            except ValueError:
                obj = {}
            return obj if isinstance(obj, dict) else {}

    async def create(self, space: str, message: dict[str, Any], request_id: str,
                     thread: str | None) -> str:
        params = {"requestId": request_id}
        if thread:
            message = {**message, "thread": {"name": f"{space}/threads/{thread}"}}
            params["messageReplyOption"] = "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"
        got = await self.call("POST", f"{space}/messages", message, params)
        if not isinstance(got.get("name"), str):
            raise ChatError(200, "no message name in the answer")
        return got["name"]

    async def update(self, name: str, message: dict[str, Any], mask: str) -> None:
        await self.call("PATCH", name, message, {"updateMask": mask})

    async def find_dm(self, user: str) -> str:
        got = await self.call("GET", "spaces:findDirectMessage", params={"name": user})
        if not isinstance(got.get("name"), str):
            raise ChatError(404, "no direct message space with that user")
        return got["name"]

    async def download(self, resource: str, limit: int) -> tuple[bytes, str | None]:
        data, mime = await self.call("GET", f"media/{quote(resource, safe='')}",
                                     params={"alt": "media"}, raw=True)
        if len(data) > limit:
            raise ValueError(f"larger than {limit >> 20} MB")
        return data, mime
