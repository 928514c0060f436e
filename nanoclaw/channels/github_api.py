"""GitHub's REST API as the `github` channel uses it, on gidgethub's aiohttp client: a
client that keeps the last answer's status and headers (the `X-Poll-Interval` and
`retry-after` gidgethub does not surface), conditional GETs through its `cache` (a 304
costs no rate limit), the content-creation pacer and GitHub's errors sorted into the
channel vocabulary (`RetryAfter`, `SendError`).

Limits (reference channels.md §9): content creation 80 a minute and 500 an hour; a
secondary limit answers 403 or 429 with `retry-after`; the primary limit answers 403
with `x-ratelimit-remaining: 0` and `x-ratelimit-reset`; a comment holds 65,536
characters.
"""

from __future__ import annotations

import re
import time
from collections import deque
from typing import Any, Mapping
from urllib.parse import urlsplit

import aiohttp
import gidgethub
from gidgethub.aiohttp import GitHubAPI

from nanoclaw.channels.base import RetryAfter, SendError
from nanoclaw.config import Settings
from nanoclaw.log import logger

LIMIT = 65536              # characters of a comment or issue body
PER_MINUTE, PER_HOUR = 80, 500
REPO = re.compile(r"[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}")
SECONDARY_PAUSE = 60.0     # a secondary limit without retry-after: GitHub says wait a minute
USER_AGENT = "nanoclaw"


class Api(GitHubAPI):
    """gidgethub's aiohttp client; `last` is the latest answer's (status, headers)."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings,
                 cache: dict | None = None):
        super().__init__(session, USER_AGENT, oauth_token=settings.github_token or None,
                         cache=cache, base_url=settings.github_api_base + "/")
        self.last: tuple[int, Mapping[str, str]] = (0, {})

    async def _request(self, method: str, url: str, headers: Mapping[str, str],
                       body: bytes = b"") -> tuple[int, Mapping[str, str], bytes]:
        status, hdrs, data = await super()._request(method, url, headers, body)
        self.last = (status, hdrs)
        return status, hdrs, data


def session(timeout: float = 30.0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))


def repo_of(platform_id: str) -> str:
    """`github:<owner>/<repo>` → `owner/repo` (a permanent SendError for anything else)."""
    repo = platform_id.removeprefix("github:")
    if not platform_id.startswith("github:") or not REPO.fullmatch(repo):
        raise SendError(f"not a GitHub repository chat: {platform_id[:80]!r}", permanent=True)
    return repo


def number_of(thread_id: str | None) -> int | None:
    if thread_id is None:
        return None
    if not str(thread_id).isdigit() or not 0 < int(thread_id) < 10**9:
        raise SendError(f"not an issue number: {str(thread_id)[:40]!r}", permanent=True)
    return int(thread_id)


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds GitHub asked us to wait: `retry-after`, else the primary limit's reset."""
    try:
        v = float(headers.get("retry-after", ""))
        if 0 <= v <= 3600:
            return v
    except (TypeError, ValueError):
        pass
    if headers.get("x-ratelimit-remaining") == "0":
        try:
            reset = float(headers.get("x-ratelimit-reset", ""))
        except (TypeError, ValueError):
            return None
        return min(3600.0, max(1.0, reset - (time.time() if now is None else now)))
    return None


def poll_interval(headers: Mapping[str, str]) -> float:
    try:
        return min(3600.0, max(0.0, float(headers.get("x-poll-interval", "0"))))
    except (TypeError, ValueError):
        return 0.0


def mapped(e: Exception, headers: Mapping[str, str]) -> Exception:
    """A gidgethub or network error as the channel runner's vocabulary."""
    if isinstance(e, gidgethub.RateLimitExceeded):
        return RetryAfter(retry_after(headers) or SECONDARY_PAUSE, "github: rate limit used up")
    if isinstance(e, gidgethub.HTTPException):
        status = int(e.status_code)
        if status in (403, 429):
            wait = retry_after(headers)
            if wait is not None or status == 429 or "rate limit" in str(e).lower():
                return RetryAfter(wait if wait is not None else SECONDARY_PAUSE,
                                  f"github: secondary rate limit ({status})")
        if status == 401:
            logger.error("github: GitHub rejected GITHUB_TOKEN (401); set a valid token of"
                         " the bot account and restart channel:github")
            return SendError("GitHub refused GITHUB_TOKEN", permanent=True)
        if status >= 500:
            return SendError(f"github: HTTP {status}: {str(e)[:200]}")
        return SendError(f"github refused: HTTP {status}: {str(e)[:200]}", permanent=True)
    if isinstance(e, gidgethub.GitHubException):
        return SendError(f"github: {str(e)[:200]}")
    return SendError(f"github: {type(e).__name__}: {str(e)[:200]}")


class Pacer:
    """GitHub's content-creation limit, kept on our side (80 a minute, 500 an hour), on
    the clock it is given: `wait(now)` is 0 when a creation may go now, else seconds."""

    def __init__(self, per_minute: int = PER_MINUTE, per_hour: int = PER_HOUR):
        self.per_minute, self.per_hour = per_minute, per_hour
        self.stamps: deque[float] = deque()

    def wait(self, now: float) -> float:
        while self.stamps and self.stamps[0] <= now - 3600:
            self.stamps.popleft()
        wait = 0.0
        minute = [s for s in self.stamps if s > now - 60]
        if len(minute) >= self.per_minute:
            wait = max(wait, minute[-self.per_minute] + 60 - now)
        if len(self.stamps) >= self.per_hour:
            wait = max(wait, self.stamps[-self.per_hour] + 3600 - now)
        return wait

    def take(self, now: float) -> None:
        self.stamps.append(now)


class Allowlist:
    """Hosts an attachment link may point at (GITHUB_ATTACHMENT_HOSTS, `*.` for
    subdomains; the API base's host always may), and only on their attachment paths."""

    PATHS = ("/user-attachments/", "/files/")

    def __init__(self, settings: Settings):
        api = urlsplit(settings.github_api_base)
        self.api = ((api.hostname or "").lower(), api.port, api.scheme)
        self.hosts = {h.strip().lower() for h in settings.github_attachment_hosts.split(",")
                      if h.strip()} | {self.api[0]}

    def allowed(self, url: str) -> bool:
        try:
            u = urlsplit(url)
            host, port = (u.hostname or "").lower(), u.port
        except ValueError:
            return False
        # plain http only to the API base itself (GitHub Enterprise, tests); else https
        scheme_ok = u.scheme == "https" or (host, port, u.scheme) == self.api
        return bool(host) and scheme_ok and not u.username and any(
            host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts) \
            and any(p in u.path for p in self.PATHS) and ".." not in u.path


REACTIONS = {"👍": "+1", "👎": "-1", "😄": "laugh", "😕": "confused", "❤️": "heart",
             "❤": "heart", "🎉": "hooray", "🚀": "rocket", "👀": "eyes",
             "+1": "+1", "-1": "-1", "laugh": "laugh", "confused": "confused",
             "heart": "heart", "hooray": "hooray", "rocket": "rocket", "eyes": "eyes"}


def reaction(emoji: Any) -> str:
    got = REACTIONS.get(str(emoji or "👍").strip())
    if got is None:
        raise SendError(f"GitHub has no reaction {str(emoji)[:20]!r} (it has 👍 👎 😄 😕 ❤️"
                        " 🎉 🚀 👀)", permanent=True)
    return got


def attachment_links(body: str) -> list[tuple[str, str]]:
    """(name, url) of the files a comment links (`[name](url)`, as GitHub's upload writes)."""
    return [(m.group(1), m.group(2)) for m in
            re.finditer(r"!?\[([^\]\n]{1,200})\]\((https?://[^)\s]{1,2000})\)", body)][:8]
