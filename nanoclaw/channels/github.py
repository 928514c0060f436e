"""GitHub issue and pull-request comments as chat: the `channel:github` worker.

The chat is a repository (`github:<owner>/<repo>`), the thread an issue or PR number.
Outbound (gidgethub on aiohttp, at GITHUB_API_BASE): an answer is a comment on its issue
(split at 65,536 characters); a message to the repository without a thread opens an
issue (its title the first line); edits of the bot's own comments, reactions (👍 👎 😄 😕
❤️ 🎉 🚀 👀); a question card is a numbered list (`numbered.card_body`); a text
file is inlined in a `<details>` block (GitHub's API takes no uploads). Every creation
is paced on our side to GitHub's content-creation limit (80 a minute, 500 an hour): a
send over it waits (`Unavailable`, uncounted) instead of being refused; GitHub's own
403/429 with `retry-after`, and a used-up primary limit, are `RetryAfter`.

Inbound: webhooks at /webhook/github (`github_webhook.py`), plus **the reconcile loop**
here, because GitHub never retries a webhook: every GITHUB_POLL_INTERVAL seconds (or
GitHub's `X-Poll-Interval`, if longer) it lists the comments updated `since` its
cursor on each served repository (the wired ones and GITHUB_REPOS), with conditional
requests (an unchanged list is a 304, free of rate limit), and stores what it finds
exactly as the door does, under the same keys: a comment both saw is one message. The
cursor (host_state `github:since:<repo>:<kind>`) survives restarts, so comments made
while the host was down are found at the next start. Without GITHUB_WEBHOOK_SECRET this
loop is the only inbound (no public URL needed).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any, Callable

import aiohttp
import gidgethub

from nanoclaw.channels.base import Channel, OutboundMessage, SendError, Unavailable
from nanoclaw.channels.github_api import (
    LIMIT,
    REPO,
    Api,
    Pacer,
    mapped,
    number_of,
    poll_interval,
    reaction,
    repo_of,
    retry_after,
    session,
)
from nanoclaw.channels.github_inbound import CHANNEL, Bot, Inbound, parse_listed
from nanoclaw.channels.numbered import card_body
from nanoclaw.channels.text import load_files, parse_question, plain_text, split_text
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

KINDS = (("issues", "repos/{repo}/issues/comments", False),
         ("pulls", "repos/{repo}/pulls/comments", True))
PAGE = 100
MARKER_ROOM = 64  # characters each part leaves for its marker


def marker(message: OutboundMessage, part: int) -> str:
    """What a posted part ends with so `find_sent` can recognise it after a lost answer:
    an HTML comment, which GitHub does not show."""
    return f"\n\n<!-- nanoclaw:{message.part_key(part)} -->"


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class GitHubChannel(Channel):
    name = CHANNEL
    supports_threads = True

    def __init__(self, settings: Settings, host: Any, clock: Callable[[], float] = time.time,
                 pacer: Pacer | None = None):
        super().__init__(settings, host)
        self.clock = clock
        self.pacer = pacer or Pacer()
        self.cache: dict = {}                   # gidgethub's ETag cache (conditional GETs)
        self.task: asyncio.Task | None = None
        self.http: aiohttp.ClientSession | None = None
        self.bot = Bot(settings.github_bot_username)
        self.wait_until = 0.0                   # GitHub asked us to hold off until then

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return bool(settings.github_token)

    # ---- lifecycle ----------------------------------------------------------------------
    async def setup(self, reconcile: bool = True) -> None:
        self.http = session()
        self.api = Api(self.http, self.settings, cache=self.cache)
        self.inbound = Inbound(self.settings, self.host, self.bot, self.http)
        try:  # who the token belongs to: its comments are never fed back
            me = await asyncio.wait_for(self.api.getitem("user"), 15)
            self.bot.user_id = me.get("id") if isinstance(me.get("id"), int) else None
            login = str(me.get("login") or "")
            if self.bot.login and login and login.lower() != self.bot.login.lower():
                logger.warning("github: GITHUB_BOT_USERNAME is {} but GITHUB_TOKEN belongs to"
                               " {}; mentions of @{} engage", self.bot.login, login,
                               self.bot.login)
            self.bot.login = self.bot.login or login
        except gidgethub.HTTPException as e:
            if int(e.status_code) == 401:
                await self.http.close()
                raise ConfigError("GITHUB_TOKEN was refused by GitHub (401): set a valid"
                                  " token of the bot account") from None
            logger.warning("github: asking who GITHUB_TOKEN is failed: {}", e)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            logger.warning("github: GitHub API not reachable yet: {!r}", e)
        if not self.bot.login:
            logger.warning("github: GITHUB_BOT_USERNAME is not set: nothing counts as a"
                           " mention until GitHub says who the token is")
        if reconcile:
            self.task = asyncio.get_running_loop().create_task(self._reconcile_forever())

    async def teardown(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        if self.http is not None:
            await self.http.close()

    # ---- the reconcile loop -----------------------------------------------------------
    async def _reconcile_forever(self) -> None:
        failures = 0
        while True:
            try:
                wait = await self.reconcile(self.clock())
                if failures:
                    logger.info("github: reconcile works again")
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                wait = min(600.0, self.settings.github_poll_interval * 2 ** min(failures, 6))
                (logger.warning if failures == 1 else logger.debug)(
                    "github: reconcile failed ({}: {}); again in {:.0f}s", type(e).__name__,
                    str(e)[:200], wait)
            await asyncio.sleep(wait)

    def repos(self) -> list[str]:
        store = self.host.store
        wired = [c["platform_id"].removeprefix("github:") for c in store.channel_chats(CHANNEL)
                 if c["agents"]]
        listed = [r.strip() for r in self.settings.github_repos.split(",") if r.strip()]
        return [r for r in dict.fromkeys(wired + listed) if REPO.fullmatch(r)]

    async def reconcile(self, now: float) -> float:
        """One pass over every served repository; seconds until the next."""
        if now < self.wait_until:
            return self.wait_until - now
        asked = 0.0
        for repo in self.repos():
            for kind, path, review in KINDS:
                more, asked = await self._list(repo, kind, path, review, now, asked)
                if more:
                    asked = -1.0  # a full page: go on at once
        if asked < 0:
            return 0.0
        return max(self.settings.github_poll_interval, asked)

    async def _list(self, repo: str, kind: str, path: str, review: bool, now: float,
                    asked: float) -> tuple[bool, float]:
        store, key = self.host.store, f"github:since:{repo}:{kind}"
        since = store.get_state(key)
        if not since:  # first sight of this repository: from now on, not its history
            since = stamp(now - 60)
            store.set_state(key, since)
        url = (path.format(repo=repo) + f"?since={since}&sort=updated&direction=asc"
               f"&per_page={PAGE}")
        try:
            items = await asyncio.wait_for(self.api.getitem(url), 30)
        except gidgethub.HTTPException as e:
            status, headers = self.api.last
            if int(e.status_code) in (403, 429):
                wait = retry_after(headers, self.clock()) or 60.0
                self.wait_until = self.clock() + wait
                logger.warning("github: rate limited while reconciling; waiting {:.0f}s", wait)
                return False, max(asked, wait)
            if int(e.status_code) in (404, 410):
                logger.warning("github: {} not visible to GITHUB_TOKEN ({}); skipped", repo,
                               e.status_code)
                return False, asked
            raise
        status, headers = self.api.last
        asked = max(asked, poll_interval(headers))
        if status == 304 or not isinstance(items, list):
            return False, asked
        newest = since
        for item in items:
            c = parse_listed(repo, item, review)
            if c is None:
                continue
            await self.inbound.store(c)
            newest = max(newest, c.updated_at) if c.updated_at else newest
        if newest != since:
            store.set_state(key, newest)
        return len(items) >= PAGE, asked

    # ---- outbound ---------------------------------------------------------------------
    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        repo, number = repo_of(platform_id), number_of(thread_id)
        if getattr(self, "api", None) is None:
            raise Unavailable("not set up yet")
        try:
            return await self._deliver(repo, number, message)
        except (SendError, Unavailable):
            raise
        except (gidgethub.GitHubException, aiohttp.ClientError, asyncio.TimeoutError,
                OSError, ValueError) as e:
            raise mapped(e, self.api.last[1]) from None

    def _pace(self) -> None:
        wait = self.pacer.wait(self.clock())
        if wait > 0:
            raise Unavailable(f"github content-creation limit: next in {wait:.0f}s")
        self.pacer.take(self.clock())

    async def _deliver(self, repo: str, number: int | None, message: OutboundMessage) -> str:
        c = message.content
        op = c.get("operation")
        if op == "reaction":
            return await self._react(repo, number, str(c.get("messageId") or ""), c.get("emoji"))
        if op == "edit":
            mid = str(c.get("messageId") or "")
            text = str(c.get("text") or c.get("markdown") or "")
            if not mid or not text or len(text) > LIMIT:
                raise SendError("an edit needs messageId and a text of at most 65,536"
                                " characters", permanent=True)
            self._pace()
            if mid.startswith("issue:"):
                await self.api.patch(f"repos/{repo}/issues/{int(mid[6:])}", data={"body": text})
            elif mid.isdigit():
                await self.api.patch(f"repos/{repo}/issues/comments/{mid}", data={"body": text})
            else:
                raise SendError(f"cannot edit {mid[:40]!r}: not a comment of ours",
                                permanent=True)
            return mid
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        parts = self._parts(c)
        done = message.parts  # resume a half-sent split (kept by the worker)
        if number is None and done and done[0].startswith("issue:"):
            number = int(done[0][6:])  # the issue this send opened before it was cut off
        for i, body in enumerate(parts):
            if i < len(done):
                continue
            self._pace()
            body += marker(message, i)
            if number is None and i == 0:  # to the repository itself: a new issue
                title = body.strip().splitlines()[0][:200] if body.strip() else "Message"
                got = await self.api.post(f"repos/{repo}/issues",
                                          data={"title": title, "body": body})
                number = int(got["number"])
                message.sent(f"issue:{number}")
            else:
                got = await self.api.post(f"repos/{repo}/issues/{number}/comments",
                                          data={"body": body})
                message.sent(str(got["id"]))
        if not done:
            raise SendError("empty message", permanent=True)
        return done[0]

    async def find_sent(self, platform_id: str, thread_id: str | None,
                        message: OutboundMessage, since: float) -> dict[int, str]:
        """The parts of `message` GitHub shows since `since`, by the marker each carries
        (an HTML comment, which GitHub does not render): none is posted twice. Only the
        comments of an issue are looked at; an issue this send opened is its first part."""
        repo = repo_of(platform_id)
        number = number_of(thread_id)
        if number is None and message.parts and message.parts[0].startswith("issue:"):
            number = int(message.parts[0][6:])
        stamp = datetime.fromtimestamp(since - 5, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        found: dict[int, str] = {}
        if number is None:  # its first part opens an issue: was it opened?
            if not self.bot.login:
                return found
            issues = await asyncio.wait_for(self.api.getitem(
                f"repos/{repo}/issues?creator={self.bot.login}&since={stamp}&state=all"
                f"&per_page={PAGE}"), 30)
            number = next((int(i["number"]) for i in issues if isinstance(i, dict)
                           and str(i.get("body") or "").endswith(marker(message, 0))), None)
            if number is None:
                return found
            found[0] = f"issue:{number}"
        items = await asyncio.wait_for(self.api.getitem(
            f"repos/{repo}/issues/{number}/comments?since={stamp}&per_page={PAGE}"), 30)
        for item in items if isinstance(items, list) else []:
            body = str(item.get("body") or "") if isinstance(item, dict) else ""
            for i in range(len(message.parts) + len(found), len(message.parts) + 64):
                if body.endswith(marker(message, i)):
                    found.setdefault(i, str(item.get("id")))
                    break
        return found

    def _parts(self, c: dict[str, Any]) -> list[str]:
        q = parse_question(c)
        text = card_body(q) if q is not None else plain_text(c)
        parts = split_text(text, LIMIT - MARKER_ROOM) if text.strip() else []
        for f in load_files(c):  # a bad file is a permanent SendError
            try:
                content = f.data.decode("utf-8")
            except UnicodeDecodeError:
                raise SendError(f"file {f.name}: GitHub comments take no uploads, and it is"
                                " not text to show inline", permanent=True) from None
            fence = "````" if "```" in content else "```"
            block = (f"<details><summary>{f.name}</summary>\n\n{fence}\n{content}\n{fence}"
                     "\n\n</details>")
            if len(block) > LIMIT - MARKER_ROOM:
                raise SendError(f"file {f.name} is too long for a comment", permanent=True)
            parts.append(block)
        return parts

    async def _react(self, repo: str, number: int | None, mid: str, emoji: Any) -> str:
        content = reaction(emoji)
        base = mid if mid.startswith("issue:") else mid.split(":")[0]
        if base.startswith("issue:") and base[6:].isdigit():
            target = f"repos/{repo}/issues/{base[6:]}/reactions"
        elif (base.startswith("issue") or not base) and number:  # an opened issue: its number
            target = f"repos/{repo}/issues/{number}/reactions"
        elif base.startswith("rc") and base[2:].isdigit():
            target = f"repos/{repo}/pulls/comments/{base[2:]}/reactions"
        elif base.isdigit():
            target = f"repos/{repo}/issues/comments/{base}/reactions"
        else:
            raise SendError(f"cannot react to {mid[:40]!r}", permanent=True)
        self._pace()
        await self.api.post(target, data={"content": content})
        return mid
