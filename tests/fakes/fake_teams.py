"""A fake Bot Framework on 127.0.0.1 for the real `teams` channel: the OpenID metadata
and JWKS (the fake's own RSA key), the token endpoint, a Bot Connector at the
`serviceUrl` it puts in activities (`<url>/svc`), and `BotFrameworkSender`, which signs
activities with the fake's key as the Bot Framework does and POSTs them to the host's
webhook door, retrying until 2xx as Teams does.

Routes (calls are recorded under the names in brackets):
- `GET /openid` [openid], `GET /keys` [keys];
- `POST /{tenant}/oauth2/v2.0/token` [token]: client credentials; a wrong id or secret
  answers 401 `invalid_client`; the token lasts `expires_in` (default an hour);
- `POST /svc/v3/conversations` [create] makes a personal chat;
- `POST /svc/v3/conversations/{conversation}/activities` [activities, or typing for a
  typing activity]: a message (text and/or attachments; over 28 KB in all: 413
  MessageSizeTooBig); in a channel without `;messageid=` it starts a reply chain;
- `PUT /svc/v3/conversations/{conversation}/activities/{id}` [update];
- `GET /svc/files/{id}` [download]: a file a user attached.
Every connector call wants `Authorization: Bearer <a token the endpoint issued>` (else
401). Errors have the connector's shape `{"error": {"code", "message"}}`; `inject`
(FakeServer's) scripts a status with Retry-After, a stall or a dropped connection.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable
from urllib.parse import unquote

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from fakes.base import Call, FakeServer, Rule
from fakes.contract import PlatformFake, Sent

APP_ID = "00000000-aaaa-bbbb-cccc-000000000001"
PASSWORD = "teams-app-password"
TENANT = "tenant-0001"
BOT = f"28:{APP_ID}"
ISSUER = "https://api.botframework.com"
KID = "fake-key-1"
MAX_ACTIVITY = 28_000


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEY = new_key()


def jwk_of(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "endorsements": ["msteams"]}


class FakeTeams(FakeServer, PlatformFake):
    channel = "teams"
    limit = 24_000
    typing = True
    reply_refs = False    # a reply chain, not a quote of the message answered
    threads = True
    top_level = False     # a channel post is the root of its own reply chain
    edit_events = True    # messageUpdate
    bot_edits = True
    bot_reactions = False  # the Bot Framework has no reaction API for bots
    user = "teams:29:ann"  # as the host names the user (`from.id` is 29:ann)

    def __init__(self) -> None:
        super().__init__()
        self.tokens: set[str] = set()
        self.expires_in = 3599
        self.expired = False
        self.sent: list[dict[str, Any]] = []   # activities the bot posted, with id, chat
        self.files: dict[str, tuple[str, bytes, str]] = {}
        self.ids = itertools.count(1)
        self.sender: BotFrameworkSender | None = None

    @property
    def service(self) -> str:
        return f"{self.url}/svc"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/openid", self._openid)
        app.router.add_get("/keys", self._keys)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        app.router.add_post("/svc/v3/conversations", self._create)
        app.router.add_post("/svc/v3/conversations/{conv}/activities", self._post)
        app.router.add_post("/svc/v3/conversations/{conv}/activities/{reply}", self._post)
        app.router.add_put("/svc/v3/conversations/{conv}/activities/{aid}", self._put)
        app.router.add_get("/svc/files/{fid}", self._download)
        return app

    def _error(self, status: int, retry_after: float | None = None,
               description: str | None = None) -> web.Response:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return web.json_response({"error": {"code": {429: "Throttled", 403: "BotNotInConversationRoster",
                                                     413: "MessageSizeTooBig"}.get(
            status, "ServiceError"), "message": description or "scripted"}},
            status=status, headers=headers)

    # ---- identity -----------------------------------------------------------------------
    async def _openid(self, request: web.Request) -> web.Response:
        self.record("openid", {})
        return web.json_response({"issuer": ISSUER, "jwks_uri": f"{self.url}/keys",
                                  "id_token_signing_alg_values_supported": ["RS256"]})

    async def _keys(self, request: web.Request) -> web.Response:
        if (r := await self.misbehave(request, "keys", {}, self._error)) is not None:
            return r
        self.record("keys", {})
        return web.json_response({"keys": [jwk_of(KEY, KID)]})

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        params = {"tenant": request.match_info["tenant"], "client_id": form.get("client_id"),
                  "scope": form.get("scope"), "grant_type": form.get("grant_type")}
        if (r := await self.misbehave(request, "token", params, self._error)) is not None:
            return r
        if form.get("client_id") != APP_ID or form.get("client_secret") != PASSWORD or \
                form.get("grant_type") != "client_credentials":
            self.record("token", params, "injected:401")
            return web.json_response({"error": "invalid_client",
                                      "error_description": "AADSTS7000215: Invalid client"
                                      " secret provided."}, status=401)
        token = f"bot-token-{next(self.ids)}"
        self.tokens.add(token)
        self.record("token", params)
        return web.json_response({"token_type": "Bearer", "expires_in": self.expires_in,
                                  "ext_expires_in": self.expires_in, "access_token": token})

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        return not self.expired and auth.startswith("Bearer ") and auth[7:] in self.tokens

    # ---- the connector --------------------------------------------------------------------
    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        params = {"user": ((body.get("members") or [{}])[0]).get("id"),
                  "tenant": body.get("tenantId")}
        if not self._authorized(request):
            self.record("create", params, "injected:401")
            return self._error(401)
        if (r := await self.misbehave(request, "create", params, self._error)) is not None:
            return r
        conv = f"a:dm-{params['user']}"
        self.record("create", {**params, "id": conv})
        return web.json_response({"id": conv})

    async def _post(self, request: web.Request) -> web.Response:
        raw = await request.read()
        conv = unquote(request.match_info["conv"])
        chat, _, thread = conv.partition(";messageid=")
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400)
        method = "typing" if body.get("type") == "typing" else "activities"
        params = {"conv": conv, "chat": chat, "thread": thread or None,
                  "type": body.get("type"), "text": body.get("text")}
        if not self._authorized(request):
            self.record(method, params, "injected:401")
            return self._error(401)
        if (r := await self.misbehave(request, method, params, self._error)) is not None:
            return r
        if len(raw) > MAX_ACTIVITY:
            self.record(method, params, "injected:413")
            return self._error(413, description="Message size too big")
        aid = f"{int(time.time() * 1000)}{next(self.ids):04d}"
        if method == "activities":
            if not thread and chat.startswith("19:") and "@thread.tacv2" in chat:
                thread = aid  # a new channel post is the root of its chain
            with self.lock:
                self.sent.append({**body, "id": aid, "chat": chat, "thread": thread or None,
                                  "at": time.time()})
        self.record(method, {**params, "id": aid})
        return web.json_response({"id": aid})

    async def _put(self, request: web.Request) -> web.Response:
        body = await request.json()
        conv, aid = unquote(request.match_info["conv"]), request.match_info["aid"]
        params = {"chat": conv.partition(";")[0], "id": aid}
        if not self._authorized(request):
            self.record("update", params, "injected:401")
            return self._error(401)
        if (r := await self.misbehave(request, "update", params, self._error)) is not None:
            return r
        with self.lock:
            m = next((m for m in self.sent if m["id"] == aid), None)
            if m is None:
                self.record("update", params, "injected:404")
                return self._error(404)
            m.pop("attachments", None)
            m.update({k: v for k, v in body.items() if k != "id"})
        self.record("update", params)
        return web.json_response({"id": aid})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        fid = request.match_info["fid"]
        if (r := await self.misbehave(request, "download", {"fid": fid}, self._error)):
            return r
        self.record("download", {"fid": fid, "auth": self._authorized(request)})
        if fid not in self.files:
            return web.Response(status=404)
        name, data, mime = self.files[fid]
        return web.Response(body=data, content_type=mime)

    # ---- users (through the sender) ---------------------------------------------------------
    def attach(self, host: Any) -> "BotFrameworkSender":
        if self.sender is None:
            self.sender = BotFrameworkSender(lambda: door_url(host), self.service)
        return self.sender

    def activity(self, conv: str, text: str = "", *, kind: str = "message",
                 user: str | None = None, name: str = "Ann", mention: bool = False,
                 mid: str | None = None, **extra: Any) -> dict[str, Any]:
        """An activity as the Bot Framework delivers it; `conv` may carry `;messageid=`."""
        mid = mid or f"{int(time.time() * 1000)}{next(self.ids):04d}"
        base = conv.partition(";")[0]
        ctype = "personal" if base.startswith("a:") else (
            "channel" if "@thread.tacv2" in base else "groupChat")
        if ctype == "channel" and ";messageid=" not in conv:
            conv = f"{conv};messageid={mid}"  # a root post names its own chain
        entities = []
        if mention:
            text = f"<at>Claw</at> {text}"
            entities.append({"type": "mention", "text": "<at>Claw</at>",
                             "mentioned": {"id": BOT, "name": "Claw"}})
        return {"type": kind, "id": mid, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                                                                     time.gmtime()),
                "serviceUrl": self.service, "channelId": "msteams",
                "from": {"id": user or "29:ann", "name": name, "aadObjectId": "aad-ann"},
                "conversation": {"id": conv, "conversationType": ctype, "tenantId": TENANT,
                                 **({"isGroup": True} if ctype != "personal" else {})},
                "recipient": {"id": BOT, "name": "Claw"}, "text": text, "textFormat": "plain",
                "entities": entities, "channelData": {"tenant": {"id": TENANT}}, **extra}

    def file_attachment(self, name: str, data: bytes, mime: str) -> dict[str, Any]:
        fid = str(next(self.ids))
        self.files[fid] = (name, data, mime)
        return {"contentType": "application/vnd.microsoft.teams.file.download.info",
                "name": name, "contentUrl": f"{self.service}/files/{fid}",
                "content": {"downloadUrl": f"{self.service}/files/{fid}", "uniqueId": fid,
                            "fileType": name.rpartition(".")[2]}}

    def click(self, chat: str, sent: dict[str, Any], index: int, user: str | None = None
              ) -> dict[str, Any]:
        card = sent["attachments"][0]["content"]
        data = card["actions"][index]["data"]
        conv = f"{chat};messageid={sent['thread']}" if sent.get("thread") else chat
        return self.activity(conv, "", user=user, replyToId=sent["id"], value=data)

    # ---- PlatformFake -----------------------------------------------------------------------
    def host_env(self) -> dict[str, str]:
        return {"TEAMS_APP_ID": APP_ID, "TEAMS_APP_PASSWORD": PASSWORD,
                "TEAMS_OPENID_METADATA_URL": f"{self.url}/openid",
                "TEAMS_TOKEN_URL": f"{self.url}/{{tenant}}/oauth2/v2.0/token",
                "TEAMS_SERVICE_URL_ALLOW": "127.0.0.1", "TEAMS_SERVICE_URL": self.service,
                "TEAMS_ATTACHMENT_HOSTS": "127.0.0.1", "NANOCLAW_WEBHOOK_PORT": "0"}

    def connected(self, host: Any) -> bool:
        self.attach(host)
        return bool(self.calls_of("token")) and door_url(host) is not None

    def chat(self, n: int) -> str:
        return f"19:c{n}@thread.tacv2"

    def dm(self, n: int) -> str:
        return f"a:dm{n}"

    def new_thread(self, chat: str) -> str:
        return f"{int(time.time() * 1000)}{next(self.ids):04d}"  # someone's root post

    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None) -> str:
        conv = f"{chat};messageid={thread}" if thread else chat
        act = self.activity(conv, text, attachments=[self.file_attachment(*file)] if file
                            else [])
        assert self.sender is not None
        self.sender.deliver(act)
        return act["id"]

    def user_edits(self, chat: str, message_id: str, text: str) -> str:
        time.sleep(0.002)
        act = self.activity(f"{chat};messageid={message_id}", text, kind="messageUpdate",
                            mid=message_id, channelData={"eventType": "editMessage"})
        assert self.sender is not None
        self.sender.deliver(act)
        return f"{message_id}:edited:{act['timestamp']}"

    def redeliver_last(self) -> None:
        assert self.sender is not None and self.sender.last is not None
        self.sender.post(self.sender.last)

    def press(self, chat: str, card: Sent, index: int) -> None:
        assert self.sender is not None
        self.sender.deliver(self.click(chat, card.raw, index))

    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        with self.lock:
            mine = [dict(m) for m in self.sent if m["chat"] == chat
                    and (thread is None or m["thread"] == thread)]
        out = []
        for m in mine:
            text, buttons, files = m.get("text") or "", [], []
            for a in m.get("attachments") or []:
                if a.get("contentType") == "application/vnd.microsoft.card.adaptive":
                    c = a["content"]
                    text = "\n\n".join(b["text"] for b in c["body"] if b.get("text"))
                    buttons = [(x["title"], x["data"]["ncq"]) for x in c.get("actions", [])]
                elif str(a.get("contentUrl", "")).startswith("data:"):
                    files.append((a["name"], base64.b64decode(a["contentUrl"].split(",", 1)[1])))
            out.append(Sent(m["id"], text, m["thread"], None, buttons, files, [], m))
        return out

    def send_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("activities", None) if c.params.get("chat") == chat]

    def typing_calls(self, chat: str) -> list[Call]:
        return [c for c in self.calls_of("typing") if c.params.get("chat") == chat]

    def rate_limit(self, chat: str, seconds: float) -> Rule:
        return self.inject("activities", status=429, retry_after=seconds, chat=chat)

    def fail_sends(self, chat: str, count: int) -> Rule:
        return self.inject("activities", count=count, status=502, chat=chat)

    def refuse_sends(self, chat: str) -> Rule:
        return self.inject("activities", status=403, chat=chat,
                           description="The bot is not part of the conversation roster.")

    def land_then_stall(self, chat: str) -> Rule:
        return self.inject("activities", land_then_stall=True, chat=chat)


def door_url(host: Any) -> str | None:
    try:
        rows = host.q("SELECT value FROM host_state WHERE key='webhook_url'")
    except Exception:
        return None
    return f"{rows[0]['value']}/webhook/teams" if rows and rows[0]["value"] else None


def sign(activity: dict[str, Any], *, key: rsa.RSAPrivateKey = KEY, kid: str = KID,
         aud: str = APP_ID, iss: str = ISSUER, serviceurl: str | None = None,
         exp: float | None = None, alg: str = "RS256") -> str:
    now = time.time()
    claims = {"iss": iss, "aud": aud, "nbf": int(now - 5),
              "exp": int(exp if exp is not None else now + 3600),
              "serviceurl": serviceurl if serviceurl is not None else activity["serviceUrl"]}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


class BotFrameworkSender:
    """The Bot Framework's side: signed activities, retried until the door takes them."""

    def __init__(self, url: Callable[[], str | None], service: str):
        self.url, self.service = url, service
        self.last: tuple[bytes, str] | None = None
        self.retries = 0
        self.lock = threading.Lock()

    def post_raw(self, raw: bytes, authorization: str | None, timeout: float = 10) -> int:
        url = self.url()
        if url is None:
            raise ConnectionRefusedError("no door yet")
        h = {"Content-Type": "application/json"}
        if authorization is not None:
            h["Authorization"] = authorization
        req = urllib.request.Request(url, data=raw, method="POST", headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def post(self, last: tuple[bytes, str]) -> int:
        return self.post_raw(last[0], f"Bearer {last[1]}")

    def deliver(self, activity: dict[str, Any], deadline: float = 60, **signing: Any) -> int:
        raw = json.dumps(activity, ensure_ascii=False).encode()
        token = sign(activity, **signing)
        with self.lock:
            self.last = (raw, token)
        end, attempts = time.time() + deadline, 0
        while True:
            attempts += 1
            try:
                if 200 <= self.post((raw, token)) < 300:
                    return attempts
            except OSError:
                pass
            if attempts == 1:
                with self.lock:
                    self.retries += 1
            if time.time() > end:
                raise AssertionError(f"the door never took the activity after {attempts}"
                                     " tries")
            time.sleep(0.05)
