"""A fake Linear GraphQL API on 127.0.0.1, and a webhook sender that signs and delivers
Comment events as Linear does, for the real `linear` channel: its worker POSTs GraphQL
to the fake (plain aiohttp), the sender POSTs to the host's webhook door.

`POST /graphql`, dispatched on `operationName`, with `Authorization: <LINEAR_API_KEY>`:
`Viewer`, `Teams` (by key), `Comment` (its parent), `CommentCreate` (a `parentId` must be
a top-level comment of the same issue, as Linear nests one level), `IssueCreate`,
`CommentUpdate` / `IssueUpdate` (only the viewer's own), `ReactionCreate`. Creations
are recorded as "create" (with the team), edits as "edit", reactions as "react". Every
answer carries `X-RateLimit-Requests-Limit/Remaining/Reset`; `inject(..., status=429)`
answers as Linear does when limited: HTTP 400, a GraphQL error with
`extensions.code: "RATELIMITED"` and the reset (epoch ms) in the headers. `GET
/uploads/{id}/{name}` serves a file a user attached (with the key).

`LinearSender` signs the raw body (`Linear-Signature`, hex HMAC-SHA256) with a
`webhookTimestamp` (settable, for stale ones) and POSTs until the door answers 2xx.
Comments the bot makes are delivered by webhook too, as Linear does.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web

from fakes.base import Call, FakeServer, Rule
from fakes.contract import PlatformFake, Sent

KEY = "lin_api_test_key"
SECRET = "linear-webhook-secret-for-tests"
VIEWER = {"id": "user-bot", "name": "Andy Bot"}
ANN = {"id": "user-ann", "name": "Ann"}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def sign(raw: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


class FakeLinear(FakeServer, PlatformFake):
    channel = "linear"
    limit = 65536
    typing = False
    reply_refs = True      # an answer is a threaded reply under the comment
    threads = True
    edit_events = True     # Comment "update"
    bot_edits = True
    top_level = False      # every comment is on an issue
    user = ANN["id"]

    def __init__(self, key: str = KEY) -> None:
        super().__init__()
        self.key = key
        self.teams: dict[str, str] = {}                   # key → id
        self.issues: dict[str, dict[str, Any]] = {}
        self.comments: list[dict[str, Any]] = []
        self.files: dict[str, tuple[bytes, str]] = {}
        self.ids = itertools.count(1)
        self.remaining = 2500
        self.sender: LinearSender | None = None
        self.echo_bot = True

    # ---- state ------------------------------------------------------------------------
    def team(self, key: str) -> str:
        return self.teams.setdefault(key, f"team-{key}")

    def issue(self, team: str, user: dict | None = None, title: str = "An issue",
              description: str = "") -> dict[str, Any]:
        self.team(team)
        n = next(self.ids)
        i = {"id": f"iss-{n}", "identifier": f"{team}-{n}", "title": title,
             "description": description, "team": team, "user": dict(user or ANN),
             "reactions": [], "createdAt": iso(time.time())}
        with self.lock:
            self.issues[i["id"]] = i
        return i

    def _add_comment(self, issue_id: str, user: dict, body: str,
                     parent: str | None = None) -> dict[str, Any]:
        now = iso(time.time())
        c = {"id": f"com-{next(self.ids)}", "body": body, "issueId": issue_id,
             "parentId": parent, "userId": user["id"], "user": dict(user), "createdAt": now,
             "updatedAt": now, "reactions": []}
        with self.lock:
            self.comments.append(c)
        return c

    def _comment(self, cid: str) -> dict[str, Any] | None:
        with self.lock:
            return next((c for c in self.comments if c["id"] == cid), None)

    # ---- the API ------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 << 20)
        app.router.add_post("/graphql", self._graphql)
        app.router.add_get("/uploads/{id}/{name}", self._download)
        return app

    def _headers(self) -> dict[str, str]:
        self.remaining = max(0, self.remaining - 1)
        return {"X-RateLimit-Requests-Limit": "2500",
                "X-RateLimit-Requests-Remaining": str(self.remaining),
                "X-RateLimit-Requests-Reset": str(int((time.time() + 3600) * 1000))}

    def _gql_error(self, code: str, message: str, status: int = 400,
                   headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"errors": [{"message": message, "extensions": {
            "code": code, "userPresentableMessage": message}}]}, status=status,
            headers={**self._headers(), **(headers or {})})

    def _error(self, status: int, retry_after: float | None = None,
               description: str | None = None) -> web.Response:
        if status == 429:  # as Linear answers a limited request
            reset = str(int((time.time() + (retry_after or 60)) * 1000))
            return self._gql_error("RATELIMITED", "Rate limit exceeded", 400, {
                "X-RateLimit-Requests-Remaining": "0", "X-RateLimit-Requests-Reset": reset})
        if status == 401:
            return self._gql_error("AUTHENTICATION_ERROR", "Authentication required", 401)
        if status < 500:
            return self._gql_error("INVALID_INPUT", description or "Entity not found", 400)
        return web.Response(status=status, text="upstream error")

    async def _graphql(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return self._gql_error("GRAPHQL_PARSE_FAILED", "bad JSON")
        op, v = body.get("operationName"), body.get("variables") or {}
        inp = v.get("input") or {}
        method, params = {"Viewer": ("viewer", {}), "Teams": ("teams", {"key": v.get("key")}),
                          "Comment": ("comment", {"id": v.get("id")})}.get(op, (None, {}))
        if op in ("CommentCreate", "IssueCreate"):
            issue = self.issues.get(str(inp.get("issueId")), {})
            team = issue.get("team") or next((k for k, i in self.teams.items()
                                              if i == inp.get("teamId")), None)
            method, params = "create", {"team": team, "op": op, **inp}
        elif op in ("CommentUpdate", "IssueUpdate"):
            method, params = "edit", {"id": v.get("id"), **inp}
        elif op == "ReactionCreate":
            method, params = "react", dict(inp)
        if method is None:
            return self._gql_error("GRAPHQL_VALIDATION_FAILED", f"unknown operation {op!r}")
        if request.headers.get("Authorization") != self.key:
            self.record(method, params, "injected:401")
            return self._error(401)
        if (r := await self.misbehave(request, method, params, self._error)) is not None:
            return r
        data, problem = self._do(op, v, inp)
        if problem:
            self.record(method, params, "injected:400")
            return self._gql_error("INVALID_INPUT", problem)
        self.record(method, {**params, "result": data})
        return web.json_response({"data": data}, headers=self._headers())

    def _do(self, op: str, v: dict[str, Any], inp: dict[str, Any]) -> tuple[Any, str | None]:
        if op == "Viewer":
            return {"viewer": VIEWER}, None
        if op == "Teams":
            tid = self.teams.get(str(v.get("key")))
            return {"teams": {"nodes": [{"id": tid, "key": v.get("key")}] if tid else []}}, None
        if op == "Comment":
            c = self._comment(str(v.get("id")))
            if c is None:
                return None, "Entity not found: Comment"
            return {"comment": {"id": c["id"], "parent": {"id": c["parentId"]}
                                if c["parentId"] else None}}, None
        if op == "CommentCreate":
            issue = self.issues.get(str(inp.get("issueId")))
            body = inp.get("body")
            if issue is None or not isinstance(body, str) or not body:
                return None, "Entity not found: Issue"
            parent = inp.get("parentId")
            if parent is not None:
                p = self._comment(parent)
                if p is None or p["parentId"] or p["issueId"] != issue["id"]:
                    return None, "Parent comment must be a top-level comment of this issue"
            c = self._add_comment(issue["id"], VIEWER, body, parent)
            if self.echo_bot and self.sender is not None:
                self.sender.later(self.event(c))
            return {"commentCreate": {"success": True, "comment": {"id": c["id"]}}}, None
        if op == "IssueCreate":
            team = next((k for k, i in self.teams.items() if i == inp.get("teamId")), None)
            if team is None or not inp.get("title"):
                return None, "Entity not found: Team"
            i = self.issue(team, VIEWER, str(inp["title"]), str(inp.get("description") or ""))
            return {"issueCreate": {"success": True, "issue": {
                "id": i["id"], "identifier": i["identifier"]}}}, None
        if op == "CommentUpdate":
            c = self._comment(str(v.get("id")))
            if c is None or c["userId"] != VIEWER["id"]:
                return None, "Entity not found: Comment"
            c["body"], c["updatedAt"] = str(inp.get("body") or ""), iso(time.time())
            return {"commentUpdate": {"success": True}}, None
        if op == "IssueUpdate":
            i = self.issues.get(str(v.get("id")))
            if i is None or i["user"]["id"] != VIEWER["id"]:
                return None, "Entity not found: Issue"
            i["description"] = str(inp.get("description") or "")
            return {"issueUpdate": {"success": True}}, None
        target = self._comment(str(inp.get("commentId"))) if inp.get("commentId") else \
            self.issues.get(str(inp.get("issueId")))
        if target is None or not inp.get("emoji"):
            return None, "Entity not found"
        target["reactions"].append(inp["emoji"])
        return {"reactionCreate": {"success": True}}, None

    async def _download(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != self.key:
            return web.Response(status=401)
        got = self.files.get(request.match_info["id"])
        self.record("download", {"id": request.match_info["id"]})
        if got is None:
            return web.Response(status=404)
        return web.Response(body=got[0], content_type=got[1])

    # ---- events, as Linear sends them ---------------------------------------------------
    def event(self, c: dict[str, Any], action: str = "create",
              at: float | None = None) -> dict[str, Any]:
        issue = self.issues[c["issueId"]]
        return {"action": action, "type": "Comment", "createdAt": c["updatedAt"],
                "actor": {"id": c["userId"], "name": c["user"]["name"], "type": "user"},
                "data": {k: v for k, v in c.items() if k != "reactions"} | {"issue": {
                    "id": issue["id"], "identifier": issue["identifier"],
                    "title": issue["title"], "teamId": self.team(issue["team"]),
                    "team": {"id": self.team(issue["team"]), "key": issue["team"]}}},
                "url": f"https://linear.app/x/issue/{issue['identifier']}",
                "organizationId": "org-1", "webhookId": "wh-1",
                "webhookTimestamp": int((time.time() if at is None else at) * 1000)}

    def attach(self, host: Any) -> "LinearSender":
        self.sender = LinearSender(lambda: door_url(host))
        return self.sender

    def comment(self, issue_id: str, body: str, user: dict | None = None,
                parent: str | None = None) -> dict[str, Any]:
        c = self._add_comment(issue_id, user or ANN, body, parent)
        assert self.sender is not None
        self.sender.deliver(self.event(c))
        return c

    # ---- PlatformFake ---------------------------------------------------------------------
    def host_env(self) -> dict[str, str]:
        return {"LINEAR_API_KEY": self.key, "LINEAR_WEBHOOK_SECRET": SECRET,
                "LINEAR_API_URL": f"{self.url}/graphql", "NANOCLAW_WEBHOOK_PORT": "0"}

    def connected(self, host: Any) -> bool:
        if self.sender is None:
            self.attach(host)
        return bool(self.calls_of("viewer")) and door_url(host) is not None

    def chat(self, n: int) -> str:
        self.team(f"CT{n}")
        return f"CT{n}"

    def _default_issue(self, chat: str) -> str:
        with self.lock:
            got = next((i["id"] for i in self.issues.values() if i["team"] == chat
                        and i["user"]["id"] == ANN["id"]), None)
        return got or self.issue(chat)["id"]

    def new_thread(self, chat: str) -> str:
        return self.issue(chat)["id"]

    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        if file:
            fid = str(next(self.ids))
            self.files[fid] = (file[1], file[2])
            text += f"\n\n[{file[0]}]({self.url}/uploads/{fid}/{file[0]})"
        return self.comment(thread or self._default_issue(chat), text)["id"]

    def user_edits(self, chat: str, message_id: str, text: str) -> str:
        c = self._comment(message_id)
        assert c is not None
        time.sleep(0.002)  # a later millisecond than the comment's own
        c["body"], c["updatedAt"] = text, iso(time.time())
        assert self.sender is not None
        self.sender.deliver(self.event(c, "update"))
        return f"{c['id']}:edited:{c['updatedAt']}"

    def redeliver_last(self) -> None:
        assert self.sender is not None and self.sender.last is not None
        self.sender.post(self.sender.last)

    def press(self, chat: str, card: Sent, index: int) -> None:
        assert card.thread is not None
        self.comment(card.thread, str(index + 1))

    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        with self.lock:
            items = [(i["createdAt"], f"issue:{i['id']}", i["id"], None, i["description"], i)
                     for i in self.issues.values() if i["team"] == chat
                     and i["user"]["id"] == VIEWER["id"]]
            items += [(c["createdAt"], c["id"], c["issueId"], c["parentId"], c["body"], c)
                      for c in self.comments if c["userId"] == VIEWER["id"]
                      and self.issues[c["issueId"]]["team"] == chat]
        out = []
        for _, mid, issue, parent, body, obj in sorted(items, key=lambda x: (
                x[0], int(x[1].split("-")[-1])) if x[1].startswith("com-") else (x[0], 0)):
            if thread is not None and issue != thread:
                continue
            buttons = [(line.split(". ", 1)[1], line.split(". ", 1)[0])
                       for line in body.splitlines() if line[:1].isdigit() and ". " in line] \
                if ("Reply with the number." in body or "Chosen:" in body) else []
            files = []
            if body.startswith("**") and "\n```" in body:
                name = body[2:body.index("**", 2)]
                fence = "````" if "\n````\n" in body else "```"
                files = [(name, body.split(f"{fence}\n", 1)[1].rsplit(f"\n{fence}", 1)[0]
                          .encode())]
            out.append(Sent(mid, body, issue, parent, buttons, files, list(obj["reactions"]),
                            obj))
        return out

    def send_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("create", None) if c.params.get("team") == chat]

    def typing_calls(self, chat: str) -> list[Call]:
        return []

    def rate_limit(self, chat: str, seconds: float) -> Rule:
        return self.inject("create", status=429, retry_after=seconds, team=chat)

    def fail_sends(self, chat: str, count: int) -> Rule:
        return self.inject("create", count=count, status=502, team=chat)

    def refuse_sends(self, chat: str) -> Rule:
        return self.inject("create", status=404, team=chat)

    def land_then_stall(self, chat: str) -> Rule:
        return self.inject("create", land_then_stall=True, team=chat)


def door_url(host: Any) -> str | None:
    try:
        rows = host.q("SELECT value FROM host_state WHERE key='webhook_url'")
    except Exception:
        return None
    return f"{rows[0]['value']}/webhook/linear" if rows and rows[0]["value"] else None


class LinearSender:
    """Linear's side of the webhook: signed bodies, retried until the door takes them."""

    def __init__(self, url: Callable[[], str | None], secret: str = SECRET):
        self.url, self.secret = url, secret
        self.last: bytes | None = None
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def post(self, raw: bytes, signature: str | None | bool = True, timeout: float = 10) -> int:
        url = self.url()
        if url is None:
            raise ConnectionRefusedError("no door")
        h = {"Content-Type": "application/json; charset=utf-8", "Linear-Event": "Comment",
             "Linear-Delivery": str(uuid.uuid4()), "User-Agent": "Linear-Webhook"}
        if signature is True:
            h["Linear-Signature"] = sign(raw, self.secret)
        elif isinstance(signature, str):
            h["Linear-Signature"] = signature
        req = urllib.request.Request(url, data=raw, method="POST", headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def deliver(self, event: dict[str, Any], deadline: float = 60) -> int:
        raw = json.dumps(event, ensure_ascii=False).encode()
        self.last = raw
        end = time.time() + deadline
        while True:
            try:
                status = self.post(raw)
                if 200 <= status < 300:
                    return status
            except OSError:
                pass
            if time.time() > end:
                raise AssertionError("the door never took the event")
            time.sleep(0.05)

    def later(self, event: dict[str, Any]) -> None:
        self.queue.put(event)

    def _drain(self) -> None:
        while True:
            event = self.queue.get()
            try:
                self.post(json.dumps(event, ensure_ascii=False).encode())
            except Exception:
                pass
