"""Linear, inbound side at the webhook door: the Comment webhooks Linear POSTs to
/webhook/linear (the outbound side is `linear.py`).

A POST must carry `Linear-Signature: <hex HMAC-SHA256(LINEAR_WEBHOOK_SECRET, raw body)>`
and a `webhookTimestamp` (epoch milliseconds) within NANOCLAW_LINEAR_WEBHOOK_TOLERANCE
seconds of now: a replayed or stale body is refused like a forged one (401, nothing
stored). Read: `type: "Comment"` with action `create` (and `update`, an edit, reaching
the agent as `[edited] …`); everything else is answered 200 and stored nowhere.

The chat is the team (`linear:<team key>`, from the issue's team or its identifier),
the thread the issue (its id). Every comment is forwarded (Linear users cannot mention
an API-key bot), so `is_mention` is true and the wiring decides. Never stored: the
account's own comments (the key's `viewer`, asked once) and comments by apps or bots
(`botActor`, or an actor that is not a user). A bare number answers the team's open
question card (`numbered.py`). Files linked on uploads.linear.app are fetched with the
key (bounded); other links stay text.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import aiohttp

from nanoclaw import jsonin
from nanoclaw.channels.linear_api import TEAM, Linear, LinearError, auth_header
from nanoclaw.channels.numbered import number_answer, show_choice
from nanoclaw.channels.text import EDITED, SAFE_FILE, attachment
from nanoclaw.channels.webhook import BadPayload, Webhook
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

CHANNEL = "linear"
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
UPLOADS = ("uploads.linear.app",)
MAX_BODY, MAX_FILE, FILE_BUDGET = 262_144, 10 << 20, 4.0


@dataclass
class Comment:
    team: str
    issue_id: str
    id: str
    key: str
    body: str
    user_id: str
    name: str
    edited: bool

    @property
    def platform_id(self) -> str:
        return f"{CHANNEL}:{self.team}"


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _id(v: Any) -> str | None:
    return v if isinstance(v, str) and ID.fullmatch(v) else None


def parse(body: Any) -> Comment | None:
    """The comment of a verified webhook body, or None (another type or action, a bot's);
    BadPayload for a Comment event without its fields."""
    if not isinstance(body, dict):
        raise BadPayload("not a Linear webhook: not an object")
    if body.get("type") != "Comment" or body.get("action") not in ("create", "update"):
        return None
    data, actor = _dict(body.get("data")), _dict(body.get("actor"))
    if data.get("botActor") or actor.get("type") not in (None, "user"):
        return None  # an app's or integration's comment: never fed back
    issue = _dict(data.get("issue"))
    team = _dict(issue.get("team")).get("key")
    if not isinstance(team, str):
        ident = issue.get("identifier")
        team = ident.rsplit("-", 1)[0] if isinstance(ident, str) and "-" in ident else None
    cid, issue_id = _id(data.get("id")), _id(data.get("issueId") or issue.get("id"))
    user_id = _id(data.get("userId") or _dict(data.get("user")).get("id"))
    if not (cid and issue_id and user_id and isinstance(team, str) and re.fullmatch(TEAM, team)):
        raise BadPayload("a Comment event without a valid id, issue, team or user")
    text = data.get("body")
    text = text[:MAX_BODY] if isinstance(text, str) else ""
    edited = body.get("action") == "update"
    updated = str(data.get("updatedAt") or data.get("editedAt") or "")[:40]
    name = _dict(data.get("user")).get("name") or actor.get("name") or ""
    return Comment(team.upper(), issue_id, cid, f"{cid}:edited:{updated}" if edited else cid,
                   text, user_id, str(name)[:100], edited)


class LinearWebhook(Webhook):
    name = "linear"

    def __init__(self, settings, host, clock: Callable[[], float] = time.time):
        super().__init__(settings, host)
        if not settings.linear_webhook_secret:
            raise ConfigError("LINEAR_WEBHOOK_SECRET is not set (linear needs it with"
                              " LINEAR_API_KEY)")
        self.secret = settings.linear_webhook_secret.encode()
        self.clock = clock
        self.api = Linear(settings, timeout=3.0)
        self.viewer: str | None = None
        api = urlsplit(settings.linear_api_url)
        self.api_host = ((api.hostname or "").lower(), api.port, api.scheme)

    def verify(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        sig = headers.get("Linear-Signature", "").strip().lower().encode("utf-8", "replace")
        want = hmac.new(self.secret, raw, hashlib.sha256).hexdigest().encode()
        if not sig or not hmac.compare_digest(sig, want):
            return False
        try:
            ts = jsonin.loads(raw).get("webhookTimestamp")
        except (jsonin.BadJSON, AttributeError):
            return True  # signed but unreadable: answered 400 by receive
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or \
                abs(self.clock() * 1000 - ts) > self.settings.linear_webhook_tolerance * 1000:
            logger.warning("linear: a webhook outside the {:.0f}s replay tolerance refused",
                           self.settings.linear_webhook_tolerance)
            return False
        return True

    async def receive(self, raw: bytes, headers: Mapping[str, str]) -> int:
        try:
            c = parse(jsonin.loads(raw))
        except jsonin.BadJSON as e:
            raise BadPayload(str(e)) from None
        if c is None:
            return 0
        if c.user_id == await self._viewer():
            logger.debug("linear: our own comment {} not fed back", c.id)
            return 0
        store, pid = self.host.store, c.platform_id
        if store.inbound_seen(CHANNEL, pid, c.key):
            return 0
        answer = None if c.edited else number_answer(self.host, CHANNEL, pid, c.body)
        if answer is not None:
            card, option = answer
            new = await self.host.inbound(pid, c.key, {
                "question_id": card.question_id, "option": option, "user_id": c.user_id},
                thread_id=c.issue_id, kind="action")
            if new:
                show_choice(self.host, CHANNEL, pid, c.issue_id, c.key, card, option, c.name)
            return int(new)
        payload: dict[str, Any] = {
            "text": EDITED + c.body if c.edited else c.body, "sender_id": c.user_id,
            "sender_name": c.name, "is_mention": True, "is_group": True,
            "attachments": await self._files(c)}
        if c.edited:
            payload.update(edited=True, edit_of=c.id)
        return int(await self.host.inbound(pid, c.key, payload, thread_id=c.issue_id))

    async def close(self) -> None:
        await self.api.close()

    async def _viewer(self) -> str | None:
        """The account LINEAR_API_KEY belongs to (its comments are ours), asked once."""
        if self.viewer is None:
            try:
                got = await asyncio.wait_for(self.api.call(
                    "Viewer", "query Viewer { viewer { id name } }"), 3)
                self.viewer = str(_dict(got.get("viewer")).get("id") or "") or None
            except (LinearError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                logger.warning("linear: asking who LINEAR_API_KEY is failed: {}", e)
        return self.viewer

    def allowed(self, url: str) -> bool:
        try:
            u = urlsplit(url)
            host, port = (u.hostname or "").lower(), u.port
        except ValueError:
            return False
        return not u.username and ".." not in u.path and (
            (u.scheme == "https" and host in UPLOADS) or (host, port, u.scheme) == self.api_host)

    async def _files(self, c: Comment) -> list[dict[str, Any]]:
        links = [(m.group(1), m.group(2)) for m in re.finditer(
            r"!?\[([^\]\n]{1,200})\]\((https?://[^)\s]{1,2000})\)", c.body)][:8]
        out: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + FILE_BUDGET
        for name, url in links:
            if not self.allowed(url):
                continue  # an ordinary link: left in the text, never fetched
            safe = SAFE_FILE.sub("_", name)[:128] or "file"
            try:
                left = deadline - asyncio.get_running_loop().time()
                data, mime = await asyncio.wait_for(self._fetch(url), max(0.01, left))
                out.append(attachment(safe, mime, data))
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
                logger.warning("linear: file {} of comment {} not fetched: {!r}", safe, c.id, e)
                out.append(attachment(safe, None) | {"error": "not fetched"})
        return out

    async def _fetch(self, url: str) -> tuple[bytes, str | None]:
        headers = {"Authorization": auth_header(self.settings.linear_api_key)}
        async with self.api.session().get(url, headers=headers, allow_redirects=False) as r:
            if r.status != 200:
                raise ValueError(f"HTTP {r.status}")
            data = await r.content.read(MAX_FILE + 1)
            if len(data) > MAX_FILE:
                raise ValueError(f"larger than {MAX_FILE >> 20} MB")
            return data, r.content_type or None
