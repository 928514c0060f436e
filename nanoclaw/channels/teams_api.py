"""Microsoft Teams (Bot Framework), the calls both sides make: the check of an inbound
activity's `Authorization` JWT (`Validator`), the bot token (`Tokens`), the Bot
Connector at an activity's `serviceUrl` (`Connector`), and the allowlist every URL we
call or fetch must pass (`allowed`). No botbuilder: aiohttp and PyJWT, as nanobot does.

The JWT check, in order, each failure naming its check (`Rejected.check`): a bearer token
at all; a readable RS256 header; its key (`kid`) among the keys the OpenID metadata's
`jwks_uri` serves (cached a day; an unknown kid refetches them at most once a minute);
the key endorsed for the activity's `channelId`; the signature; `exp`/`nbf` (5 minutes'
leeway); the issuer `https://api.botframework.com`; the audience TEAMS_APP_ID; the
`serviceurl` claim equal to the activity's `serviceUrl`; that URL's host on
TEAMS_SERVICE_URL_ALLOW. The door calls `verify` synchronously, so the keys are fetched
with urllib under a short timeout (once a day in practice).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import jwt

from nanoclaw.channels.text import retry_after_header
from nanoclaw.config import Settings

ISSUER = "https://api.botframework.com"
SCOPE = "https://api.botframework.com/.default"
LEEWAY = 300.0
KEYS_TTL = 86400.0
REFETCH_EVERY = 60.0   # an unknown kid refetches the keys at most this often
FETCH_TIMEOUT = 5.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class Rejected(Exception):
    """An inbound activity's token failed `check` (logged, answered 401)."""

    def __init__(self, check: str, detail: str = ""):
        super().__init__(f"{check}: {detail}" if detail else check)
        self.check = check


class TeamsError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


class NotAllowed(ValueError):
    """A URL off the allowlist: never called."""


def hosts(value: str) -> set[str]:
    return {h.strip().lower() for h in value.split(",") if h.strip()}


def allowed(url: str, allow: set[str]) -> bool:
    """https to a host on `allow` (`*.` for subdomains); plain http only to loopback."""
    try:
        u = urlsplit(url)
        host = (u.hostname or "").lower()
    except ValueError:
        return False
    if not host or u.scheme not in ("https", "http") or (
            u.scheme == "http" and host not in LOOPBACK):
        return False
    return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in allow)


def service_hosts(settings: Settings) -> set[str]:
    return hosts(settings.teams_service_url_allow)


# ---- inbound: the JWT ------------------------------------------------------------------
class Validator:
    def __init__(self, settings: Settings, clock=time.time):
        self.settings, self.clock = settings, clock
        self.allow = service_hosts(settings)
        self.keys: dict[str, dict[str, Any]] = {}
        self.fetched_at = 0.0
        self.tried_at = -REFETCH_EVERY
        self.lock = threading.Lock()

    def _get(self, url: str) -> dict[str, Any]:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as r:  # noqa: S310 (settings)
            body = json.loads(r.read(1 << 20))
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        return body

    def _refresh(self) -> None:
        self.tried_at = self.clock()
        meta = self._get(self.settings.teams_openid_metadata_url)
        uri = meta.get("jwks_uri")
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise ValueError("the OpenID metadata names no jwks_uri")
        keys = self._get(uri).get("keys")
        self.keys = {k["kid"]: k for k in keys if isinstance(k, dict)
                     and isinstance(k.get("kid"), str)} if isinstance(keys, list) else {}
        self.fetched_at = self.clock()

    def prefetch(self) -> None:
        """Fetch the keys in a thread now, so the first activity does not wait for them."""
        def run() -> None:
            with self.lock:
                try:
                    self._refresh()
                except Exception:
                    pass  # fetched again (and the failure named) when an activity comes
        threading.Thread(target=run, name="teams-keys", daemon=True).start()

    def key(self, kid: str) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            stale = now - self.fetched_at > KEYS_TTL
            if stale or (kid not in self.keys and now - self.tried_at >= REFETCH_EVERY):
                try:
                    self._refresh()
                except Exception as e:
                    if not self.keys:
                        raise Rejected("signing keys unavailable", f"{type(e).__name__}: {e}"
                                       ) from None
            if kid not in self.keys:
                raise Rejected("unknown signing key", kid[:40])
            return self.keys[kid]

    def check(self, authorization: str, activity: dict[str, Any]) -> dict[str, Any]:
        """The token's claims if every check holds; Rejected naming the first that fails."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Rejected("no bearer token")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise Rejected("malformed token", str(e)) from None
        if header.get("alg") != "RS256":
            raise Rejected("algorithm", f"{str(header.get('alg'))[:20]} is not RS256")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Rejected("unknown signing key", "no kid")
        jwk = self.key(kid)
        endorse = jwk.get("endorsements")
        channel = activity.get("channelId")
        if isinstance(endorse, list) and isinstance(channel, str) and channel not in endorse:
            raise Rejected("endorsement", f"key not endorsed for channel {channel[:40]!r}")
        try:
            key = jwt.PyJWK(jwk, algorithm="RS256").key
            claims = jwt.decode(token, key, algorithms=["RS256"], leeway=LEEWAY,
                                audience=self.settings.teams_app_id, issuer=ISSUER,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.InvalidSignatureError:
            raise Rejected("signature") from None
        except jwt.ExpiredSignatureError:
            raise Rejected("expired") from None
        except jwt.ImmatureSignatureError:
            raise Rejected("not yet valid") from None
        except jwt.InvalidIssuerError:
            raise Rejected("issuer") from None
        except jwt.InvalidAudienceError:
            raise Rejected("audience") from None
        except jwt.PyJWTError as e:
            raise Rejected("malformed token", str(e)[:100]) from None
        service = activity.get("serviceUrl")
        if not isinstance(service, str) or claims.get("serviceurl") != service:
            raise Rejected("serviceurl", "the token's serviceurl is not the activity's")
        if not allowed(service, self.allow):
            raise Rejected("serviceUrl not allowed",
                           f"{urlsplit(service).hostname!s:.80} is not on TEAMS_SERVICE_URL_ALLOW")
        return claims


# ---- outbound: the bot token and the connector ------------------------------------------
def token_url(settings: Settings) -> str:
    return settings.teams_token_url.replace("{tenant}",
                                            settings.teams_app_tenant_id or "botframework.com")


class Tokens:
    """The bot's access token (client credentials), kept until a minute before expiry."""

    def __init__(self, settings: Settings, clock=time.monotonic):
        self.settings, self.clock = settings, clock
        self.token: str | None = None
        self.until = 0.0
        self.lock = asyncio.Lock()

    def forget(self) -> None:
        self.token = None

    async def get(self, session: aiohttp.ClientSession) -> str:
        async with self.lock:
            if self.token and self.clock() < self.until:
                return self.token
            async with session.post(token_url(self.settings), data={
                    "grant_type": "client_credentials",
                    "client_id": self.settings.teams_app_id,
                    "client_secret": self.settings.teams_app_password, "scope": SCOPE}) as r:
                body = await r.read()
                try:
                    obj = json.loads(body)
                except ValueError:
                    obj = {}
                if r.status != 200 or not isinstance(obj, dict) or not isinstance(
                        obj.get("access_token"), str):
                    why = obj.get("error_description") or obj.get("error") if isinstance(
                        obj, dict) else None
                    raise TeamsError(r.status, f"token endpoint: {str(why or body[:200])[:300]}",
                                     retry_after_header(r.headers))
            ttl = obj.get("expires_in")
            ttl = float(ttl) if isinstance(ttl, (int, float, str)) and str(ttl).isdigit() else 3600
            self.token, self.until = obj["access_token"], self.clock() + max(0.0, ttl - 60)
            return self.token


class Connector:
    """The Bot Connector calls NanoClaw makes, each to an allow-listed serviceUrl."""

    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.settings = settings
        self.allow = service_hosts(settings)
        self.files = self.allow | hosts(settings.teams_attachment_hosts)
        self.tokens = Tokens(settings)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(  # UTF-8 as is: \u escapes triple a text
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                json_serialize=lambda o: json.dumps(o, ensure_ascii=False))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, service: str, path: str,
                   body: dict[str, Any] | None = None) -> dict[str, Any]:
        if not allowed(service, self.allow):
            raise NotAllowed(f"serviceUrl host {urlsplit(service).hostname!s:.80} is not on"
                             " TEAMS_SERVICE_URL_ALLOW")
        session = self.session()
        token = await self.tokens.get(session)
        url = service.rstrip("/") + path
        async with session.request(method, url, json=body, allow_redirects=False,
                                   headers={"Authorization": f"Bearer {token}"}) as r:
            raw = await r.read()
            if r.status == 401:
                self.tokens.forget()  # fetched afresh next time
            if r.status >= 400:
                try:
                    err = json.loads(raw).get("error") or {}
                    msg = f"{err.get('code', '')} {err.get('message', '')}".strip()
                except (ValueError, AttributeError):
                    msg = raw[:200].decode("utf-8", "replace")
                raise TeamsError(r.status, msg[:300] or r.reason or "",
                                 retry_after_header(r.headers))
            try:
                obj = json.loads(raw) if raw else {}
            except ValueError:
                obj = {}
            return obj if isinstance(obj, dict) else {}

    async def send(self, service: str, conversation: str, activity: dict[str, Any]) -> str:
        got = await self.call("POST", service, f"/v3/conversations/{quote(conversation, safe='')}"
                              "/activities", activity)
        if not isinstance(got.get("id"), str) or not got["id"]:
            raise TeamsError(200, "no activity id in the answer")
        return got["id"]

    async def update(self, service: str, conversation: str, activity_id: str,
                     activity: dict[str, Any]) -> None:
        await self.call("PUT", service, f"/v3/conversations/{quote(conversation, safe='')}"
                        f"/activities/{quote(activity_id, safe='')}", activity)

    async def create_dm(self, service: str, user: str, tenant: str | None) -> str:
        body: dict[str, Any] = {"isGroup": False, "members": [{"id": user}],
                                "bot": {"id": f"28:{self.settings.teams_app_id}"}}
        if tenant:
            body["tenantId"] = tenant
            body["channelData"] = {"tenant": {"id": tenant}}
        got = await self.call("POST", service, "/v3/conversations", body)
        if not isinstance(got.get("id"), str):
            raise TeamsError(200, "no conversation id in the answer")
        return got["id"]

    async def fetch(self, url: str, limit: int) -> tuple[bytes, str | None]:
        """A file an activity links: only from an allow-listed host, with the bot token
        only for the connector's own hosts, at most `limit` bytes."""
        if not allowed(url, self.files):
            raise NotAllowed(f"{urlsplit(url).hostname!s:.80} is not on TEAMS_ATTACHMENT_HOSTS"
                             " or TEAMS_SERVICE_URL_ALLOW")
        session = self.session()
        headers = {}
        if allowed(url, self.allow):
            headers["Authorization"] = f"Bearer {await self.tokens.get(session)}"
        async with session.get(url, headers=headers, allow_redirects=False) as r:
            if r.status != 200:
                raise TeamsError(r.status, "download failed")
            data = bytearray()
            async for block in r.content.iter_chunked(1 << 16):
                data += block
                if len(data) > limit:
                    raise ValueError(f"larger than {limit >> 20} MB")
            return bytes(data), r.headers.get("Content-Type")
