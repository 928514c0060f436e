"""Linear's GraphQL API as the `linear` channel uses it: plain aiohttp POSTs to
LINEAR_API_URL (no official Python SDK), with the errors sorted into the channel
vocabulary. Auth: a personal API key (`lin_api_…`) is sent as is, anything else as an
OAuth `Bearer` token.

Rate limits (a leaky bucket; reference channels.md §8): a limited request answers a
GraphQL error with `extensions.code: "RATELIMITED"` (HTTP 400 or 429), and the headers
`X-RateLimit-Requests-Remaining` / `X-RateLimit-Requests-Reset` (epoch milliseconds)
say until when: `RetryAfter`. `AUTHENTICATION_ERROR` (or HTTP 401) is the key: a
permanent failure, logged once at ERROR; `INVALID_INPUT` and other GraphQL errors are
permanent; 5xx and network errors are retried.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import aiohttp

from nanoclaw.channels.base import RetryAfter, SendError
from nanoclaw.config import Settings
from nanoclaw.log import logger

LIMIT = 65536          # characters of a comment we post in one piece (none documented)
TEAM = r"[A-Za-z0-9_]{1,10}"


class LinearError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str]):
        super().__init__(f"HTTP {status} {code}: {message}"[:300])
        self.status, self.code, self.message, self.headers = status, code, message, headers


def auth_header(key: str) -> str:
    return key if key.startswith(("lin_api_", "Bearer ")) else f"Bearer {key}"


class Linear:
    """The GraphQL calls the channel makes, on one aiohttp session opened on first use."""

    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.settings, self.timeout = settings, timeout
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Authorization": auth_header(self.settings.linear_api_key)})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, operation: str, query: str, variables: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
        body = {"operationName": operation, "query": query, "variables": variables or {}}
        async with self.session().post(self.settings.linear_api_url, json=body) as r:
            raw = await r.read()
            try:
                obj = await r.json(content_type=None) if raw else {}
            except ValueError:
                obj = None
            errors = obj.get("errors") if isinstance(obj, dict) else None
            if r.status >= 400 or errors:
                first = errors[0] if isinstance(errors, list) and errors and isinstance(
                    errors[0], dict) else {}
                ext = first.get("extensions") if isinstance(first.get("extensions"), dict) else {}
                raise LinearError(r.status, str(ext.get("code") or ""),
                                  str(first.get("message") or raw[:200].decode("utf-8", "replace")),
                                  r.headers)
            data = obj.get("data") if isinstance(obj, dict) else None
            if not isinstance(data, dict):
                raise LinearError(r.status, "", "no data in the answer", r.headers)
            return data


def reset_in(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds until the rate limit resets, from Linear's headers (or retry-after)."""
    now = time.time() if now is None else now
    for name in ("X-RateLimit-Requests-Reset", "X-RateLimit-Complexity-Reset",
                 "X-RateLimit-Endpoint-Requests-Reset"):
        try:
            ms = float(headers.get(name, ""))
        except (TypeError, ValueError):
            continue
        return min(3600.0, max(0.5, ms / 1000.0 - now))
    try:
        v = float(headers.get("Retry-After", ""))
        return v if 0 <= v <= 3600 else None
    except (TypeError, ValueError):
        return None


class Mapper:
    """Errors as the runner's vocabulary; a refused key is logged at ERROR once."""

    def __init__(self) -> None:
        self.key_told = False

    def __call__(self, e: Exception) -> Exception:
        if isinstance(e, LinearError):
            if e.code == "RATELIMITED" or e.status == 429:
                return RetryAfter(reset_in(e.headers) or 60.0, f"linear: rate limited: {e}")
            if e.code == "AUTHENTICATION_ERROR" or e.status == 401:
                if not self.key_told:
                    self.key_told = True
                    logger.error("linear: Linear rejected LINEAR_API_KEY ({}); set a valid key"
                                 " and restart channel:linear", e.message[:200])
                return SendError("Linear refused LINEAR_API_KEY", permanent=True)
            if e.status >= 500:
                return SendError(f"linear: {e}")
            return SendError(f"linear refused: {e}", permanent=True)
        return SendError(f"linear: {type(e).__name__}: {str(e)[:200]}")
