"""A fake GitHub REST API on 127.0.0.1, and a webhook sender that signs and delivers
events as GitHub does, for the real `github` channel (gidgethub on aiohttp): its
channel worker calls the fake, the sender POSTs to the host's webhook door.

REST, every call with `Authorization: token <GITHUB_TOKEN>` (else 401 "Bad credentials"):
- `GET /user`: the bot account (the channel's start-up check);
- `POST /repos/{o}/{r}/issues` (an issue), `PATCH /repos/{o}/{r}/issues/{n}`,
  `POST /repos/{o}/{r}/issues/{n}/comments`, `PATCH /repos/{o}/{r}/issues/comments/{id}`
  (recorded as "create" and "edit"; a body over 65,536 characters is a 422);
- `POST …/issues/comments/{id}/reactions`, `…/issues/{n}/reactions`,
  `…/pulls/comments/{id}/reactions` ("react", also content creation);
- `GET /repos/{o}/{r}/issues/comments?since=` and `/pulls/comments?since=` ("list"):
  updated at or after `since`, oldest first, with an `ETag`; a matching `If-None-Match`
  answers 304; every answer carries `X-Poll-Interval` (`poll_interval`);
- `GET /user-attachments/files/{id}/{name}`: a file a user attached ("download").
Every answer carries `x-ratelimit-limit/remaining/reset`. Content creation is limited
as GitHub does, 80 a minute and 500 an hour on `clock` (settable: a test's fake clock),
answering 403 "secondary rate limit" with `retry-after` (recorded "limited:403");
`inject` (FakeServer's) scripts other errors, with GitHub's `{"message"}` body.

`HookSender` builds `issue_comment` / `pull_request_review_comment` / `issues` events,
signs the raw body (`X-Hub-Signature-256`, and the SHA-1 `X-Hub-Signature` as GitHub
also sends) and POSTs it **once**: GitHub never retries, so a door that is down loses
the event (`lost`). Comments the bot makes are delivered by webhook too, as GitHub does.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web

from fakes.base import Call, FakeServer, Rule
from fakes.contract import PlatformFake, Sent

TOKEN = "ghp-test-token"
SECRET = "github-webhook-secret-for-tests"
BOT = {"login": "nano-bot", "id": 9000001, "type": "User"}
ANN = {"login": "Ann", "id": 1001, "type": "User"}
LIMIT = 65536


MARKER = re.compile(r"\n\n<!-- nanoclaw:[0-9a-f]{25} -->$")  # what our parts end with


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sign(raw: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


class FakeGitHub(FakeServer, PlatformFake):
    channel = "github"
    limit = LIMIT
    typing = False        # GitHub shows bots no typing indicator
    reply_refs = False    # a comment does not visibly answer another
    threads = True        # issues and PRs
    edit_events = True    # issue_comment "edited"
    bot_edits = True
    top_level = False     # every comment is in an issue or PR: there is no chat outside one
    idempotent_sends = True  # each part's hidden marker is found in the issue's comments
    user = str(ANN["id"])

    def __init__(self, token: str = TOKEN, poll_interval: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.token, self.poll_interval, self.clock = token, poll_interval, clock
        self.issues: dict[str, dict[int, dict[str, Any]]] = {}   # repo → number → issue
        self.comments: dict[str, list[dict[str, Any]]] = {}       # repo → issue comments
        self.review: dict[str, list[dict[str, Any]]] = {}         # repo → review comments
        self.files: dict[str, tuple[bytes, str]] = {}
        self.ids = itertools.count(5000)
        self.created: deque[float] = deque()                      # content creation stamps
        self.per_minute, self.per_hour = 80, 500
        self.remaining = 5000
        self.sender: HookSender | None = None
        self.webhooks = True       # deliver events (False: polling-only, like no webhook)
        self.echo_bot = True       # the bot's own comments come back by webhook

    # ---- state ------------------------------------------------------------------------
    def _issue(self, repo: str, number: int | None = None, user: dict | None = None,
               title: str = "An issue", body: str = "") -> dict[str, Any]:
        issues = self.issues.setdefault(repo, {})
        if number is not None and number in issues:
            return issues[number]
        number = number or (max(issues) + 1 if issues else 1)
        now = iso(time.time())
        issue = {"id": next(self.ids), "number": number, "title": title, "body": body,
                 "user": dict(user or ANN), "created_at": now, "updated_at": now,
                 "reactions": [], "state": "open"}
        issues[number] = issue
        return issue

    def _comment(self, repo: str, number: int, user: dict, body: str,
                 review: bool = False) -> dict[str, Any]:
        self._issue(repo, number)
        now = iso(time.time())
        cid = next(self.ids)
        kind = "pulls" if review else "issues"
        c = {"id": cid, "node_id": f"IC_{cid}", "body": body, "user": dict(user),
             "created_at": now, "updated_at": now, "author_association": "NONE",
             "html_url": f"https://github.com/{repo}/{kind}/{number}#issuecomment-{cid}",
             ("pull_request_url" if review else "issue_url"):
                 f"{self.url}/repos/{repo}/{kind}/{number}",
             "reactions": [], "number": number}
        with self.lock:
            (self.review if review else self.comments).setdefault(repo, []).append(c)
        return c

    @staticmethod
    def _public(c: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k not in ("reactions", "number")}

    # ---- the API ------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 << 20)
        r = app.router
        r.add_get("/user", self._user)
        r.add_post("/repos/{o}/{r}/issues", self._new_issue)
        r.add_patch("/repos/{o}/{r}/issues/{n:[0-9]+}", self._edit_issue)
        r.add_post("/repos/{o}/{r}/issues/{n:[0-9]+}/comments", self._new_comment)
        r.add_patch("/repos/{o}/{r}/issues/comments/{id:[0-9]+}", self._edit_comment)
        r.add_post("/repos/{o}/{r}/issues/comments/{id:[0-9]+}/reactions", self._react)
        r.add_post("/repos/{o}/{r}/issues/{n:[0-9]+}/reactions", self._react)
        r.add_post("/repos/{o}/{r}/pulls/comments/{id:[0-9]+}/reactions", self._react)
        r.add_get("/repos/{o}/{r}/issues/comments", self._list)
        r.add_get("/repos/{o}/{r}/issues/{n:[0-9]+}/comments", self._issue_comments)
        r.add_get("/repos/{o}/{r}/issues", self._list_issues)
        r.add_get("/repos/{o}/{r}/pulls/comments", self._list)
        r.add_get("/user-attachments/files/{id}/{name}", self._download)
        return app

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        self.remaining = max(0, self.remaining - 1)
        return {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": str(self.remaining),
                "x-ratelimit-reset": str(int(time.time()) + 3600),
                "x-ratelimit-resource": "core", **(extra or {})}

    def _error(self, status: int, retry_after: float | None = None,
               description: str | None = None) -> web.Response:
        messages = {401: "Bad credentials", 403: "Forbidden", 404: "Not Found",
                    422: "Validation Failed", 429: "Too Many Requests",
                    500: "Server Error", 502: "Bad Gateway"}
        h = self._headers({"retry-after": str(int(retry_after))} if retry_after else {})
        return web.json_response({"message": description or messages.get(status, "error"),
                                  "documentation_url": "https://docs.github.com/rest"},
                                 status=status, headers=h)

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") in (f"token {self.token}",
                                                        f"Bearer {self.token}")

    async def _begin(self, request: web.Request, method: str, params: dict[str, Any],
                     creates: bool = False) -> web.StreamResponse | None:
        if not self._authorized(request):
            self.record(method, params, "injected:401")
            return self._error(401)
        if (r := await self.misbehave(request, method, params, self._error)) is not None:
            return r
        if creates:
            now = self.clock()
            with self.lock:
                while self.created and self.created[0] <= now - 3600:
                    self.created.popleft()
                minute = sum(1 for s in self.created if s > now - 60)
                limited = minute >= self.per_minute or len(self.created) >= self.per_hour
                if not limited:
                    self.created.append(now)
            if limited:
                self.record(method, params, "limited:403")
                return self._error(403, 60, "You have exceeded a secondary rate limit")
        return None

    async def _user(self, request: web.Request) -> web.StreamResponse:
        if (r := await self._begin(request, "user", {})) is not None:
            return r
        self.record("user", {})
        return web.json_response(BOT, headers=self._headers())

    def _repo(self, request: web.Request) -> str:
        return f"{request.match_info['o']}/{request.match_info['r']}"

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            got = await request.json()
        except ValueError:
            return {}
        return got if isinstance(got, dict) else {}

    async def _new_issue(self, request: web.Request) -> web.StreamResponse:
        repo, data = self._repo(request), await self._body(request)
        params = {"repo": repo, "issue": None, "body": data.get("body")}
        if (r := await self._begin(request, "create", params, creates=True)) is not None:
            return r
        body = str(data.get("body") or "")
        if not data.get("title") or len(body) > LIMIT:
            self.record("create", params, "injected:422")
            return self._error(422)
        with self.lock:
            issue = self._issue(repo, None, BOT, str(data["title"]), body)
        self.record("create", {**params, "id": f"issue:{issue['number']}"})
        return web.json_response({**issue, "reactions": {}}, status=201,
                                 headers=self._headers())

    async def _edit_issue(self, request: web.Request) -> web.StreamResponse:
        repo, data = self._repo(request), await self._body(request)
        n = int(request.match_info["n"])
        params = {"repo": repo, "issue": n}
        if (r := await self._begin(request, "edit", params, creates=True)) is not None:
            return r
        issue = self.issues.get(repo, {}).get(n)
        if issue is None or issue["user"]["id"] != BOT["id"]:
            self.record("edit", params, "injected:404")
            return self._error(404)
        issue["body"] = str(data.get("body") or "")
        issue["updated_at"] = iso(time.time())
        self.record("edit", params)
        return web.json_response({**issue, "reactions": {}}, headers=self._headers())

    async def _new_comment(self, request: web.Request) -> web.StreamResponse:
        repo, data = self._repo(request), await self._body(request)
        n = int(request.match_info["n"])
        params = {"repo": repo, "issue": n, "body": data.get("body")}
        if (r := await self._begin(request, "create", params, creates=True)) is not None:
            return r
        body = data.get("body")
        if not isinstance(body, str) or not body or len(body) > LIMIT:
            self.record("create", params, "injected:422")
            return self._error(422, description="Body is too long (maximum is 65536 characters)")
        if n not in self.issues.get(repo, {}):
            self.record("create", params, "injected:404")
            return self._error(404)
        c = self._comment(repo, n, BOT, body)
        self.record("create", {**params, "id": str(c["id"])})
        if self.echo_bot and self.sender is not None and self.webhooks:
            self.sender.later("issue_comment", self.comment_event(repo, c))
        return web.json_response(self._public(c), status=201, headers=self._headers())

    def _find(self, repo: str, cid: int, review: bool = False) -> dict[str, Any] | None:
        with self.lock:
            return next((c for c in (self.review if review else self.comments).get(repo, [])
                         if c["id"] == cid), None)

    async def _edit_comment(self, request: web.Request) -> web.StreamResponse:
        repo, data = self._repo(request), await self._body(request)
        cid = int(request.match_info["id"])
        params = {"repo": repo, "comment": cid}
        if (r := await self._begin(request, "edit", params, creates=True)) is not None:
            return r
        c = self._find(repo, cid)
        if c is None or c["user"]["id"] != BOT["id"]:
            self.record("edit", params, "injected:404")
            return self._error(404)
        c["body"] = str(data.get("body") or "")
        c["updated_at"] = iso(time.time())
        self.record("edit", params)
        return web.json_response(self._public(c), headers=self._headers())

    async def _react(self, request: web.Request) -> web.StreamResponse:
        repo, data = self._repo(request), await self._body(request)
        m = request.match_info
        params = {"repo": repo, "target": m.get("id") or f"issue:{m.get('n')}",
                  "content": data.get("content")}
        if (r := await self._begin(request, "react", params, creates=True)) is not None:
            return r
        if "n" in m:
            target = self.issues.get(repo, {}).get(int(m["n"]))
        else:
            target = self._find(repo, int(m["id"]), review="/pulls/" in request.path)
        ok = {"+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"}
        if target is None or data.get("content") not in ok:
            self.record("react", params, "injected:422")
            return self._error(422)
        target["reactions"].append(data["content"])
        self.record("react", params)
        return web.json_response({"id": next(self.ids), "content": data["content"],
                                  "user": BOT}, status=201, headers=self._headers())

    async def _list(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        review = "/pulls/" in request.path
        since = request.query.get("since", "")
        params = {"repo": repo, "since": since, "review": review}
        if (r := await self._begin(request, "list", params)) is not None:
            return r
        with self.lock:
            items = [self._public(c) for c in (self.review if review else self.comments).get(
                repo, []) if c["updated_at"] >= since]
        items.sort(key=lambda c: (c["updated_at"], c["id"]))
        items = items[:int(request.query.get("per_page", "30"))]
        raw = json.dumps(items).encode()
        etag = f'W/"{hashlib.sha1(raw).hexdigest()}"'
        extra = {"ETag": etag, "X-Poll-Interval": str(self.poll_interval)}
        if request.headers.get("If-None-Match") == etag:
            self.record("list", {**params, "status": 304, "ids": []})
            return web.Response(status=304, headers={**extra, "x-ratelimit-remaining": str(
                self.remaining)})  # a 304 costs no rate limit
        self.record("list", {**params, "status": 200, "ids": [c["id"] for c in items]})
        return web.Response(body=raw, content_type="application/json",
                            headers=self._headers(extra))

    async def _list_issues(self, request: web.Request) -> web.StreamResponse:
        """`GET /repos/{o}/{r}/issues?creator=&since=`: issues, newest first."""
        repo, q = self._repo(request), request.query
        params = {"repo": repo, "creator": q.get("creator"), "since": q.get("since", "")}
        if (r := await self._begin(request, "list-issues", params)) is not None:
            return r
        with self.lock:
            items = [{k: v for k, v in i.items() if k != "reactions"}
                     for i in self.issues.get(repo, {}).values()
                     if i["updated_at"] >= params["since"] and (
                         not params["creator"] or i["user"]["login"] == params["creator"])]
        items.sort(key=lambda i: i["number"], reverse=True)
        self.record("list-issues", params)
        return web.json_response(items[:int(q.get("per_page", "30"))], headers=self._headers())

    async def _issue_comments(self, request: web.Request) -> web.StreamResponse:
        """`GET /repos/{o}/{r}/issues/{n}/comments?since=`: one issue's comments."""
        repo, number = self._repo(request), int(request.match_info["n"])
        since = request.query.get("since", "")
        params = {"repo": repo, "number": number, "since": since}
        if (r := await self._begin(request, "issue-comments", params)) is not None:
            return r
        with self.lock:
            items = [self._public(c) for c in self.comments.get(repo, [])
                     if c["number"] == number and c["updated_at"] >= since]
        items.sort(key=lambda c: (c["created_at"], c["id"]))
        self.record("issue-comments", params)
        return web.json_response(items[:int(request.query.get("per_page", "30"))],
                                 headers=self._headers())

    async def _download(self, request: web.Request) -> web.StreamResponse:
        params = {"id": request.match_info["id"]}
        if (r := await self._begin(request, "download", params)) is not None:
            return r
        got = self.files.get(request.match_info["id"])
        self.record("download", params)
        if got is None:
            return self._error(404)
        return web.Response(body=got[0], content_type=got[1])

    # ---- events, as GitHub sends them ---------------------------------------------------
    def comment_event(self, repo: str, c: dict[str, Any], action: str = "created",
                      review: bool = False) -> dict[str, Any]:
        where = "pull_request" if review else "issue"
        issue = self.issues.get(repo, {}).get(c["number"], {"number": c["number"]})
        return {"action": action, where: {k: v for k, v in issue.items() if k != "reactions"},
                "comment": self._public(c),
                "repository": {"full_name": repo, "name": repo.split("/")[1],
                               "owner": {"login": repo.split("/")[0]}},
                "sender": c["user"]}

    def attach(self, host: Any) -> "HookSender":
        self.sender = HookSender(lambda: door_url(host))
        return self.sender

    def comment(self, repo: str, number: int, body: str, user: dict | None = None,
                review: bool = False, deliver: bool | None = None) -> dict[str, Any]:
        """A user comments on an issue (or a PR's diff); delivered by webhook unless the
        fake's webhooks are off (or `deliver` says otherwise). The comment."""
        c = self._comment(repo, number, user or ANN, body, review)
        if (self.webhooks if deliver is None else deliver) and self.sender is not None:
            event = "pull_request_review_comment" if review else "issue_comment"
            self.sender.deliver(event, self.comment_event(repo, c, review=review))
        return c

    def edit(self, repo: str, cid: int, body: str, deliver: bool = True) -> dict[str, Any]:
        c = self._find(repo, cid)
        assert c is not None
        created = datetime.strptime(c["created_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=timezone.utc).timestamp()
        c["body"], c["updated_at"] = body, iso(max(time.time(), created + 1))
        if deliver and self.webhooks and self.sender is not None:
            self.sender.deliver("issue_comment", self.comment_event(repo, c, "edited"))
        return c

    def bot_comments(self, repo: str, number: int | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.comments.get(repo, []) if c["user"]["id"] == BOT["id"]
                    and (number is None or c["number"] == number)]

    # ---- PlatformFake ---------------------------------------------------------------------
    def host_env(self) -> dict[str, str]:
        return {"GITHUB_TOKEN": self.token, "GITHUB_WEBHOOK_SECRET": SECRET,
                "GITHUB_BOT_USERNAME": BOT["login"], "GITHUB_API_BASE": self.url,
                "GITHUB_POLL_INTERVAL": "0.5", "NANOCLAW_WEBHOOK_PORT": "0"}

    def connected(self, host: Any) -> bool:
        if self.sender is None:
            self.attach(host)
        return bool(self.calls_of("user")) and door_url(host) is not None

    def chat(self, n: int) -> str:
        return f"octo/contract-{n}"

    def new_thread(self, chat: str) -> str:
        with self.lock:
            return str(self._issue(chat, None, ANN, "A thread")["number"])

    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        number = int(thread) if thread else self._issue(chat, 1)["number"]
        if file:
            fid = str(next(self.ids))
            self.files[fid] = (file[1], file[2])
            text += f"\n\n[{file[0]}]({self.url}/user-attachments/files/{fid}/{file[0]})"
        return str(self.comment(chat, number, text)["id"])

    def user_edits(self, chat: str, message_id: str, text: str) -> str:
        c = self.edit(chat, int(message_id), text)
        return f"{c['id']}:edited:{c['updated_at']}"

    def redeliver_last(self) -> None:
        assert self.sender is not None
        self.sender.redeliver()

    def press(self, chat: str, card: Sent, index: int) -> None:
        assert card.thread is not None
        self.comment(chat, int(card.thread), str(index + 1))

    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        with self.lock:
            items = [(i["created_at"], i["id"], f"issue:{n}", str(n), i)
                     for n, i in self.issues.get(chat, {}).items() if i["user"]["id"] == BOT["id"]]
            items += [(c["created_at"], c["id"], str(c["id"]), str(c["number"]), c)
                      for c in self.comments.get(chat, []) if c["user"]["id"] == BOT["id"]]
        out = []
        for _, _, mid, num, obj in sorted(items, key=lambda x: x[1]):
            if thread is not None and num != thread:
                continue
            body = MARKER.sub("", obj["body"])  # an HTML comment: GitHub does not show it
            buttons = [(line.split(". ", 1)[1], line.split(". ", 1)[0])
                       for line in body.splitlines() if line[:1].isdigit() and ". " in line] \
                if ("Reply with the number." in body or "Chosen:" in body) else []
            files = []
            if body.startswith("<details><summary>"):
                name = body[len("<details><summary>"):body.index("</summary>")]
                inner = body.split("\n", 3)[3] if body.count("\n") >= 3 else ""
                fence = "````" if "\n````\n" in body else "```"
                files = [(name, inner.rsplit(f"\n{fence}", 1)[0].encode())]
            out.append(Sent(mid, body, num, None, buttons, files, list(obj["reactions"]), obj))
        return out

    def send_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("create", None) if c.params.get("repo") == chat]

    def typing_calls(self, chat: str) -> list[Call]:
        return []

    def rate_limit(self, chat: str, seconds: float) -> Rule:
        return self.inject("create", status=429, retry_after=seconds, repo=chat)

    def fail_sends(self, chat: str, count: int) -> Rule:
        return self.inject("create", count=count, status=502, repo=chat)

    def refuse_sends(self, chat: str) -> Rule:
        return self.inject("create", status=404, repo=chat)

    def land_then_stall(self, chat: str) -> Rule:
        return self.inject("create", land_then_stall=True, repo=chat)


def door_url(host: Any) -> str | None:
    try:
        rows = host.q("SELECT value FROM host_state WHERE key='webhook_url'")
    except Exception:
        return None
    return f"{rows[0]['value']}/webhook/github" if rows and rows[0]["value"] else None


class HookSender:
    """GitHub's side of the webhook: one signed POST per event, never retried."""

    def __init__(self, url: Callable[[], str | None], secret: str = SECRET):
        self.url, self.secret = url, secret
        self.last: tuple[str, str, bytes] | None = None   # (event, delivery, raw)
        self.lost: list[str] = []                         # deliveries the door never took
        self.statuses: list[int] = []
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def post(self, event: str, raw: bytes, delivery: str | None = None,
             signature: str | None | bool = True, timeout: float = 10) -> int:
        """One POST as is; the HTTP status (OSError if the door is not there)."""
        url = self.url()
        if url is None:
            raise ConnectionRefusedError("no door")
        h = {"Content-Type": "application/json", "User-Agent": "GitHub-Hookshot/fake",
             "X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
             "X-Hub-Signature": "sha1=" + hmac.new(self.secret.encode(), raw,
                                                   hashlib.sha1).hexdigest()}
        if signature is True:
            h["X-Hub-Signature-256"] = sign(raw, self.secret)
        elif isinstance(signature, str):
            h["X-Hub-Signature-256"] = signature
        req = urllib.request.Request(url, data=raw, method="POST", headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def deliver(self, event: str, payload: dict[str, Any]) -> int | None:
        """Sign and POST once (GitHub does not retry); the status, None if lost."""
        raw = json.dumps(payload, ensure_ascii=False).encode()
        delivery = str(uuid.uuid4())
        self.last = (event, delivery, raw)
        try:
            status = self.post(event, raw, delivery)
        except OSError:
            self.lost.append(delivery)
            return None
        self.statuses.append(status)
        if not 200 <= status < 300:
            self.lost.append(delivery)
        return status

    def redeliver(self) -> int:
        """GitHub's manual redelivery: the same body and X-GitHub-Delivery again."""
        assert self.last is not None
        event, delivery, raw = self.last
        return self.post(event, raw, delivery)

    def later(self, event: str, payload: dict[str, Any]) -> None:
        """Deliver from another thread (an event caused by an API call)."""
        self.queue.put((event, payload))

    def _drain(self) -> None:
        while True:
            event, payload = self.queue.get()
            try:
                raw = json.dumps(payload, ensure_ascii=False).encode()
                self.post(event, raw)
            except Exception:
                pass
