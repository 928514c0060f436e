"""Linear issue comments as chat: the `channel:linear` worker (outbound; what users write
arrives through the webhook door, `linear_webhook.py`, since Linear punishes polling).

The chat is a team (`linear:<team key>`), the thread an issue (its id). An answer is a
threaded comment (`commentCreate` with `parentId`: the top-level comment of the message
it answers, looked up once, as Linear nests one level); a message to the team without
an issue opens one (`issueCreate`, its title the first line). Edits of our own comments
(`commentUpdate`, `issueUpdate`), reactions (`reactionCreate`), a question card as a
numbered list (`numbered.py`), a text file inlined as a code block (files are not
uploaded). Long text is split at 65,536 characters. Rate limits (`RATELIMITED`, the
`X-RateLimit-*-Reset` headers) are `RetryAfter`; see `linear_api.py`.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp

from nanoclaw.channels.base import Channel, OutboundMessage, SendError, Unavailable
from nanoclaw.channels.linear_api import LIMIT, TEAM, Linear, LinearError, Mapper
from nanoclaw.channels.numbered import card_body
from nanoclaw.channels.text import load_files, parse_question, plain_text, reply_target, split_text
from nanoclaw.config import Settings
from nanoclaw.errors import ConfigError
from nanoclaw.log import logger

ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
VIEWER = "query Viewer { viewer { id name } }"
TEAMS = "query Teams($key: String!) { teams(filter: {key: {eq: $key}}) { nodes { id key } } }"
PARENT = "query Comment($id: String!) { comment(id: $id) { id parent { id } } }"
COMMENT = ("mutation CommentCreate($input: CommentCreateInput!) { commentCreate(input: $input)"
           " { success comment { id } } }")
ISSUE = ("mutation IssueCreate($input: IssueCreateInput!) { issueCreate(input: $input)"
         " { success issue { id identifier } } }")
EDIT = ("mutation CommentUpdate($id: String!, $input: CommentUpdateInput!) {"
        " commentUpdate(id: $id, input: $input) { success } }")
EDIT_ISSUE = ("mutation IssueUpdate($id: String!, $input: IssueUpdateInput!) {"
              " issueUpdate(id: $id, input: $input) { success } }")
REACT = ("mutation ReactionCreate($input: ReactionCreateInput!) {"
         " reactionCreate(input: $input) { success } }")


def team_of(platform_id: str) -> str:
    team = platform_id.removeprefix("linear:")
    if not platform_id.startswith("linear:") or not re.fullmatch(TEAM, team):
        raise SendError(f"not a Linear team chat: {platform_id[:80]!r}", permanent=True)
    return team


def _id(v: str | None, what: str) -> str:
    if not v or not ID.fullmatch(v):
        raise SendError(f"not a Linear {what} id: {str(v)[:40]!r}", permanent=True)
    return v


class LinearChannel(Channel):
    name = "linear"
    supports_threads = True

    def __init__(self, settings: Settings, host: Any):
        super().__init__(settings, host)
        self.api: Linear | None = None
        self.mapped = Mapper()
        self.teams: dict[str, str] = {}     # key → id
        self.parents: dict[str, str] = {}   # comment id → its thread's top-level comment

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return bool(settings.linear_api_key)

    async def setup(self) -> None:
        self.api = Linear(self.settings)
        try:
            me = await asyncio.wait_for(self.api.call("Viewer", VIEWER), 15)
            logger.info("linear: answering as {}", (me.get("viewer") or {}).get("name"))
        except LinearError as e:
            if e.code == "AUTHENTICATION_ERROR" or e.status == 401:
                await self.api.close()
                raise ConfigError("LINEAR_API_KEY was refused by Linear: set a valid key"
                                  ) from None
            logger.warning("linear: asking who LINEAR_API_KEY is failed: {}", e)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            logger.warning("linear: Linear API not reachable yet: {!r}", e)

    async def teardown(self) -> None:
        if self.api is not None:
            await self.api.close()

    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        team = team_of(platform_id)
        if self.api is None:
            raise Unavailable("not set up yet")
        try:
            return await self._deliver(team, thread_id, message)
        except (SendError, Unavailable):
            raise
        except (LinearError, aiohttp.ClientError, asyncio.TimeoutError, OSError,
                ValueError) as e:
            raise self.mapped(e) from None

    async def _deliver(self, team: str, issue: str | None, message: OutboundMessage) -> str:
        assert self.api is not None
        c, op = message.content, message.content.get("operation")
        mid = str(c.get("messageId") or "")
        if op == "reaction":
            target = ({"issueId": _id(mid[6:], "issue")} if mid.startswith("issue:")
                      else {"commentId": _id(mid.split(":")[0], "comment")})
            await self.api.call("ReactionCreate", REACT, {"input": {
                **target, "emoji": str(c.get("emoji") or "👍")}})
            return mid
        if op == "edit":
            text = str(c.get("text") or c.get("markdown") or "")
            if not text or len(text) > LIMIT:
                raise SendError("an edit needs a text of at most 65,536 characters",
                                permanent=True)
            if mid.startswith("issue:"):
                await self.api.call("IssueUpdate", EDIT_ISSUE, {
                    "id": _id(mid[6:], "issue"), "input": {"description": text}})
            else:
                await self.api.call("CommentUpdate", EDIT, {
                    "id": _id(mid, "comment"), "input": {"body": text}})
            return mid
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        parts = self._parts(c)
        done = message.parts  # resume a half-sent split (kept by the worker)
        if issue is None and done and done[0].startswith("issue:"):
            issue = done[0][6:]  # the issue this send opened before it was cut off
        parent = await self._parent(reply_target(message.in_reply_to)) if issue else None
        for i, body in enumerate(parts):
            if i < len(done):
                continue
            if issue is None:  # to the team itself: a new issue
                title = body.strip().splitlines()[0][:200] if body.strip() else "Message"
                got = await self.api.call("IssueCreate", ISSUE, {"input": {
                    "teamId": await self._team_id(team), "title": title, "description": body}})
                issue = _id(str(((got.get("issueCreate") or {}).get("issue") or {}).get("id")),
                            "issue")
                message.sent(f"issue:{issue}")
                continue
            got = await self.api.call("CommentCreate", COMMENT, {"input": {
                "issueId": _id(issue, "issue"), "body": body,
                **({"parentId": parent} if parent else {})}})
            message.sent(_id(str(((got.get("commentCreate") or {}).get("comment") or {}).get(
                "id")), "comment"))
        if not done:
            raise SendError("empty message", permanent=True)
        return done[0]

    def _parts(self, c: dict[str, Any]) -> list[str]:
        q = parse_question(c)
        text = card_body(q) if q is not None else plain_text(c)
        parts = split_text(text, LIMIT) if text.strip() else []
        for f in load_files(c):
            try:
                content = f.data.decode("utf-8")
            except UnicodeDecodeError:
                raise SendError(f"file {f.name}: not text to show inline (files are not"
                                " uploaded to Linear)", permanent=True) from None
            fence = "````" if "```" in content else "```"
            parts.append(f"**{f.name}**\n{fence}\n{content}\n{fence}")
        return parts

    async def _parent(self, target: str | None) -> str | None:
        """The top-level comment of the thread the answered comment is in."""
        if not target:
            return None
        cid = target.split(":")[0]  # an edit's key is `<id>:edited:<at>`
        if not ID.fullmatch(cid):
            return None
        if cid not in self.parents:
            assert self.api is not None
            got = await self.api.call("Comment", PARENT, {"id": cid})
            comment = got.get("comment") or {}
            parent = (comment.get("parent") or {}).get("id")
            self.parents[cid] = str(parent or comment.get("id") or cid)
        return self.parents[cid]

    async def _team_id(self, key: str) -> str:
        if key not in self.teams:
            assert self.api is not None
            got = await self.api.call("Teams", TEAMS, {"key": key})
            nodes = (got.get("teams") or {}).get("nodes") or []
            if not nodes:
                raise SendError(f"no Linear team {key!r} visible to LINEAR_API_KEY",
                                permanent=True)
            self.teams[key] = str(nodes[0]["id"])
        return self.teams[key]
