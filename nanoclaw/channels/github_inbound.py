"""GitHub comments in: the parsers (a webhook body, a REST comment) and the one place a
comment becomes an `inbound_events` row, shared by the webhook door and the channel's
reconcile loop so both store the same comment under the same key (one answer).

A comment is keyed by its id (`<id>` for an issue or PR conversation comment,
`rc<id>` for a PR review comment, `issue<id>` for an opened issue's body); an edit by
`<key>:edited:<updated_at>`, reaching the agent as `[edited] …`. The chat is
`github:<owner>/<repo>`, the thread the issue or PR number.

Never stored: the bot's own comments (GITHUB_BOT_USERNAME, or the account the token
belongs to) and any other bot's (`user.type == "Bot"`): a bot that answers itself loops
forever. A repository seen for the first time becomes a group chat with the `strict`
sender policy: only members, by numeric user id (`github:<id>`), engage the agent;
others are recorded in `unregistered_senders` by the router and, with
GITHUB_MEMBERS_ONLY_REPLY set, answered with that one line. A bare number answers the
chat's open question card (GitHub has no buttons: cards go out as numbered lists), and
the card is edited to show the choice. Files a comment links on GITHUB_ATTACHMENT_HOSTS
are fetched (bounded); other links are left as text.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from dataclasses import dataclass
from typing import Any

import aiohttp

from nanoclaw import jsonin
from nanoclaw.channels.github_api import REPO, Allowlist, attachment_links
from nanoclaw.channels.numbered import number_answer, show_choice
from nanoclaw.channels.text import EDITED, SAFE_FILE, attachment
from nanoclaw.log import logger

CHANNEL = "github"
MAX_BODY = 262_144        # characters of a comment we pass on (GitHub allows 65,536)
MAX_FILE = 10 << 20
FILE_BUDGET = 4.0         # seconds for all the files of one comment
EVENTS = {"issue_comment", "pull_request_review_comment", "issues"}


class NotGitHub(ValueError):
    """A body that is not a GitHub event we read; the message is one line."""


@dataclass
class Comment:
    repo: str          # owner/repo
    number: int        # the issue or PR
    key: str           # the message id it is stored under
    body: str
    user_id: int
    login: str
    user_type: str
    updated_at: str
    edited: bool = False
    base_key: str = ""

    @property
    def platform_id(self) -> str:
        return f"{CHANNEL}:{self.repo}"


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _str(v: Any, limit: int = 200) -> str:
    return v[:limit] if isinstance(v, str) else ""


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**53 else None


def _comment(repo: Any, number: Any, obj: dict[str, Any], prefix: str,
             edited: bool = False) -> Comment | None:
    """A comment (or an issue's body) from its REST object, or None if malformed."""
    user = _dict(obj.get("user"))
    cid, uid, num = _int(obj.get("id")), _int(user.get("id")), _int(number)
    login = _str(user.get("login"), 100)
    if not isinstance(repo, str) or not REPO.fullmatch(repo) or not (cid and uid and num) \
            or not login:
        return None
    body = obj.get("body")
    body = body[:MAX_BODY] if isinstance(body, str) else ""
    updated = _str(obj.get("updated_at"), 40)
    base = f"{prefix}{cid}"
    key = f"{base}:edited:{updated}" if edited else base
    return Comment(repo, num, key, body, uid, login, _str(user.get("type"), 40), updated,
                   edited, base)


def parse_event(event: str, raw: bytes) -> list[Comment]:
    """The comment a webhook body carries (none for events and actions we do not read);
    NotGitHub for a body that is not a GitHub event."""
    try:
        body = jsonin.loads(raw)
    except jsonin.BadJSON as e:
        raise NotGitHub(str(e)) from None
    if not isinstance(body, dict):
        raise NotGitHub("not a GitHub event: not an object")
    if event not in EVENTS:
        return []  # ping, push, …: nothing for the agent
    repo = _dict(body.get("repository")).get("full_name")
    action = body.get("action")
    if event == "issues":
        if action != "opened":
            return []
        issue = _dict(body.get("issue"))
        title, text = _str(issue.get("title"), 1000), issue.get("body")
        issue = {**issue, "body": f"{title}\n\n{text if isinstance(text, str) else ''}"}
        c = _comment(repo, issue.get("number"), issue, "issue")
    elif action not in ("created", "edited"):
        return []
    elif event == "issue_comment":
        c = _comment(repo, _dict(body.get("issue")).get("number"), _dict(body.get("comment")),
                     "", edited=action == "edited")
    else:
        c = _comment(repo, _dict(body.get("pull_request")).get("number"),
                     _dict(body.get("comment")), "rc", edited=action == "edited")
    if c is None:
        raise NotGitHub(f"a {event} event without a valid repository, number, comment or user")
    return [c]


def parse_listed(repo: str, item: Any, review: bool) -> Comment | None:
    """One item of `GET /repos/{repo}/issues/comments` (or `/pulls/comments`), or None.
    A comment updated after it was made comes back as its edit."""
    item = _dict(item)
    url = _str(item.get("pull_request_url" if review else "issue_url"), 1000)
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    number = int(tail) if tail.isdigit() and len(tail) < 10 else None
    created, updated = _str(item.get("created_at"), 40), _str(item.get("updated_at"), 40)
    return _comment(repo, number, item, "rc" if review else "",
                    edited=bool(created and updated and updated != created))


def mentions(body: str, login: str) -> bool:
    if not login:
        return False
    return re.search(rf"(?<![\w/@.-])@{re.escape(login)}(?![\w-])", body, re.I) is not None


class Bot:
    """Who the bot is: its login (GITHUB_BOT_USERNAME, or the token's account once the
    channel asked) and numeric id where known."""

    def __init__(self, login: str, user_id: int | None = None):
        self.login, self.user_id = login.lstrip("@"), user_id

    def wrote(self, c: Comment) -> bool:
        return c.login.lower() == self.login.lower() or c.user_id == self.user_id


class Inbound:
    """Stores comments through a host (the door's `DoorHost` or the channel runner),
    both of which carry the central `store`."""

    def __init__(self, settings: Any, host: Any, bot: Bot,
                 http: aiohttp.ClientSession | None = None):
        self.settings, self.host, self.bot, self.http = settings, host, bot, http
        self.allow = Allowlist(settings)

    async def store(self, c: Comment) -> int:
        """1 if the comment was new and stored, else 0 (the bot's, another bot's, seen)."""
        if self.bot.wrote(c) or c.user_type.lower() == "bot":
            logger.debug("github: comment {} by {} not fed back (a bot's)", c.key, c.login)
            return 0
        store, pid = self.host.store, c.platform_id
        if store.inbound_seen(CHANNEL, pid, c.key):
            return 0  # a redelivery, or the webhook and the reconcile loop both saw it
        self.ensure_chat(pid, c.repo)
        answer = None if c.edited else number_answer(self.host, CHANNEL, pid, c.body)
        if answer is not None:
            card, option = answer
            new = await self.host.inbound(pid, c.key, {
                "question_id": card.question_id, "option": option, "user_id": str(c.user_id)},
                thread_id=str(c.number), kind="action")
            if new:
                show_choice(self.host, CHANNEL, pid, str(c.number), c.key, card, option,
                            f"@{c.login}")
            return int(new)
        text = c.body
        payload: dict[str, Any] = {
            "text": EDITED + text if c.edited else text, "sender_id": str(c.user_id),
            "sender_name": c.login, "is_mention": mentions(c.body, self.bot.login),
            "is_group": True, "attachments": await self._files(c)}
        if c.edited:
            payload.update(edited=True, edit_of=c.base_key)
        if self.settings.github_members_only_reply:
            payload["members_only_reply"] = self.settings.github_members_only_reply[:500]
        return int(await self.host.inbound(pid, c.key, payload, thread_id=str(c.number)))

    def ensure_chat(self, pid: str, repo: str) -> None:
        """A repository seen for the first time is a group chat, `strict` by default."""
        store = self.host.store
        if store.messaging_group(CHANNEL, pid) is None:
            try:
                store.create_messaging_group(CHANNEL, pid, repo, True, policy="strict")
                logger.info("github: new repository chat {} (strict: members only)", pid)
            except sqlite3.IntegrityError:
                pass  # created meanwhile by the other side

    # ---- linked files ---------------------------------------------------------------------
    async def _files(self, c: Comment) -> list[dict[str, Any]]:
        links = attachment_links(c.body)
        if not links:
            return []
        out: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + FILE_BUDGET
        for name, url in links:
            safe = SAFE_FILE.sub("_", name)[:128] or "file"
            if not self.allow.allowed(url):
                continue  # an ordinary link: left in the text, never fetched
            left = deadline - asyncio.get_running_loop().time()
            try:
                if self.http is None or left < 0.1:
                    raise asyncio.TimeoutError()
                data, mime = await asyncio.wait_for(self._fetch(url), left)
                out.append(attachment(safe, mime, data))
            except asyncio.TimeoutError:
                out.append(attachment(safe, None) | {"error": "not fetched in time"})
            except (aiohttp.ClientError, OSError, ValueError) as e:
                logger.warning("github: file {} of comment {} not fetched: {}", safe, c.key,
                               str(e)[:200])
                out.append(attachment(safe, None) | {"error": f"not fetched: {str(e)[:200]}"})
        return out

    async def _fetch(self, url: str) -> tuple[bytes, str | None]:
        assert self.http is not None
        headers = {"Authorization": f"token {self.settings.github_token}",
                   "User-Agent": "nanoclaw"}
        async with self.http.get(url, headers=headers, allow_redirects=False) as r:
            if r.status != 200:
                raise ValueError(f"HTTP {r.status}")
            data = bytearray()
            async for block in r.content.iter_chunked(1 << 16):
                data += block
                if len(data) > MAX_FILE:
                    raise ValueError(f"larger than {MAX_FILE >> 20} MB")
            return bytes(data), (r.content_type or None)

