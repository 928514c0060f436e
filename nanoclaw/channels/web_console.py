"""The web console: what the owner watches beside the chats, on the same page and behind
the same guard (loopback `Host`, the token on every /api call; `web_api.WebApi._guard`).

Why here, in the web channel's worker: it reads the central DB and `logs/` only, and the
one thing it changes, an approval's decision, it hands to the router as any click on a
card is handed: an inbound `action` event from the owner (`host.inbound`), so the same
checks decide it (`routing.router.Router.click`: offered option, approver or admin).

API (JSON; a mixin of `WebChannel`, like `WebApi`):
  GET  /api/status    → {workers: [{name, state, pid, restarts, last_exit, started_at,
       next_start_at}], sessions: [{id, agent, folder, chat, state, last_active}],
       broker: {url, state}, upstreams: [{name, api, url, local, used_by}]}
  POST /api/upstreams/check {name} → {ok, status, detail}: the broker's own check (one
       cheap request with the upstream's key; `nanoclaw doctor` uses the same).
  GET  /api/usage?days=N (1-90, 14) → {days: [date…], tz, groups: [{id, name, folder,
       budget, tokens: [per day], requests: [per day]}]}: tokens per agent group and day
       (the host's timezone), `budget` the daily budget in effect (null: none).
  GET  /api/approvals → {approvals: [{id, kind, title, question, question_html,
       options: [{label, value, selected}], created_at, expires_at}]}: every open
       approval, its card's question as text and rendered (`markdown_html`).
  POST /api/approvals/answer {id, option} → 202 {ok}: `option` is one of its values;
       the router decides it (404: no such open approval; 400: not one of its options).
  GET  /api/errors?lines=N (1-1000, 200) → {file, lines}: the tail of
       `logs/nanoclaw.error.log`, as text (the page shows it as text, never as markup).
  GET  /api/file?path=<session>/<message>/<name> → a file an agent sent (from
       `data/outfiles/`, which only the host writes), as an attachment.

`markdown_html` renders an agent's reply for the page: markdown-it-py with raw HTML off
(a `<script>` or `<img onerror>` in a reply is text), no images, and only the links
markdown-it's `validateLink` lets through (no `javascript:` or `data:`).
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
from aiohttp import web
from markdown_it import MarkdownIt

from nanoclaw.db.store import Store
from nanoclaw.log import logger
from nanoclaw.util import is_approval_card, is_safe_name, new_id

try:  # the upstreams the broker may forward to (tolerated missing: only the default one)
    from nanoclaw import upstreams as _upstreams
except ImportError:  # pragma: no cover
    _upstreams = None  # type: ignore[assignment]

# The broker's check (nanoclaw/broker/proxy.py holds the same names; the web channel sits
# below the broker's layer, so it names them here; tests/test_web_console.py compares)
CHECK_PATH = "/_nanoclaw/upstream/{name}"
CHECK_HEADER = "x-nanoclaw-check"
CHECK_STATE = "broker_check_token"

ERROR_LINES, MAX_ERROR_LINES = 200, 1000
ERROR_BYTES = 256 * 1024
USAGE_DAYS, MAX_USAGE_DAYS = 14, 90
APPROVAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}\Z")

MD_SAFE = (MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
           .disable(["image"]))


def markdown_html(text: str) -> str:
    """An agent's Markdown as HTML safe to put in the page (see the module docstring)."""
    return MD_SAFE.render(text)


def _bad(msg: str, status: int = 400) -> web.Response:
    return web.json_response({"error": msg}, status=status)


class ConsoleApi:
    """The console's handlers; the state they use (store, settings, host…) is the
    channel's."""

    store: Store
    settings: Any
    host: Any
    token: str
    owner: str
    events: dict[str, list[dict[str, Any]]]

    def _push(self, chat: str, event: dict[str, Any]) -> dict[str, Any]: ...  # the channel's

    async def _notify(self) -> None: ...  # the channel's

    async def _body(self, request: web.Request) -> dict[str, Any]: ...  # WebApi's

    def console_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/status", self._status)
        app.router.add_post("/api/upstreams/check", self._check_upstream)
        app.router.add_get("/api/usage", self._usage)
        app.router.add_get("/api/approvals", self._approvals)
        app.router.add_post("/api/approvals/answer", self._answer_approval)
        app.router.add_get("/api/errors", self._errors)
        app.router.add_get("/api/file", self._file)

    # ---- status -----------------------------------------------------------------------
    async def _status(self, request: web.Request) -> web.Response:
        workers = [{k: w.get(k) for k in ("name", "state", "pid", "restarts", "last_exit",
                                          "started_at", "next_start_at")}
                   for w in self.store.workers()]
        sessions = [{"id": s["id"], "agent": s["agent_name"], "folder": s["folder"],
                     "chat": f"{s['channel_type']}:{s['platform_id']}" if s["channel_type"]
                     else None, "thread": s["thread_id"], "state": s["container_status"],
                     "last_active": s["last_active"]}
                    for s in self.store.sessions_overview()]
        broker = next((w for w in workers if w["name"] == "broker"), None)
        return web.json_response({
            "workers": workers, "sessions": sessions, "upstreams": self._upstream_list(),
            "broker": {"url": self.store.get_state("broker_url"),
                       "state": broker["state"] if broker else None}})

    def _upstream_list(self) -> list[dict[str, Any]]:
        """The upstreams the broker may forward to and which groups use them (no keys:
        this worker never holds one)."""
        s = self.settings
        if _upstreams is None:
            return [{"name": "anthropic", "api": "anthropic", "url": s.anthropic_base_url,
                     "local": False, "used_by": [g["folder"] for g in
                                                 self.store.groups_overview()]}]
        users: dict[str, list[str]] = {}
        for g in self.store.groups_overview():
            up, fb = _upstreams.group_upstreams(g["provider"] or s.provider, g, s)
            users.setdefault(up, []).append(g["folder"])
            if fb:
                users.setdefault(fb, []).append(f"{g['folder']} (fallback)")
        return [{"name": u.name, "api": u.api, "url": u.url, "local": u.local,
                 "used_by": users.get(u.name, [])}
                for u in _upstreams.configured(s).values()]

    async def _check_upstream(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = body.get("name")
        if not isinstance(name, str) or name not in {u["name"] for u in self._upstream_list()}:
            return _bad("name must be one of the upstreams GET /api/status lists", 404)
        url, token = self.store.get_state("broker_url"), self.store.get_state(CHECK_STATE)
        if not (url and token):
            return web.json_response({"ok": False, "status": None,
                                      "detail": "the broker is not running"})
        try:
            async with aiohttp.ClientSession() as http, http.get(
                    url + CHECK_PATH.format(name=name), headers={CHECK_HEADER: token},
                    timeout=aiohttp.ClientTimeout(total=20)) as resp:
                found = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            return web.json_response({"ok": False, "status": None,
                                      "detail": f"the broker did not answer: {e}"[:300]})
        if not isinstance(found, dict):
            found = {}
        return web.json_response({"ok": bool(found.get("ok")), "status": found.get("status"),
                                  "detail": str(found.get("detail") or "")[:300]})

    # ---- usage ------------------------------------------------------------------------
    async def _usage(self, request: web.Request) -> web.Response:
        try:
            n = int(request.query.get("days", USAGE_DAYS))
        except ValueError:
            return _bad(f"days must be a whole number from 1 to {MAX_USAGE_DAYS}")
        if not 1 <= n <= MAX_USAGE_DAYS:
            return _bad(f"days must be a whole number from 1 to {MAX_USAGE_DAYS}")
        tz = self.settings.tz
        today = datetime.now(ZoneInfo(tz)).date()
        days = [(today - timedelta(days=n - 1 - i)).isoformat() for i in range(n)]
        return web.json_response({"days": days, "tz": tz,
                                  "groups": usage_groups(self.store, self.settings, days)})

    # ---- approvals --------------------------------------------------------------------
    def _open_approvals(self) -> list[dict[str, Any]]:
        out = [{"id": r["approval_id"], "kind": r["action"], "title": r["title"],
                "options_json": r["options_json"], "created_at": r["created_at"],
                "expires_at": r["expires_at"]} for r in self.store.open_requests()]
        out += [{"id": r["id"], "kind": "sender", "title": r["title"],
                 "options_json": r["options_json"], "created_at": r["created_at"],
                 "expires_at": None} for r in self.store.open_sender_approvals()]
        out += [{"id": f"chan-{r['messaging_group_id']}", "kind": "channel",
                 "title": r["title"], "options_json": r["options_json"],
                 "created_at": r["created_at"], "expires_at": None}
                for r in self.store.open_channel_approvals()]
        for a in out:
            card = self.store.approval_card(a["id"]) or {}
            a["question"] = str(card.get("question") or "")
            a["question_html"] = markdown_html(a["question"])  # the card's own Markdown
            a["title"] = a["title"] or str(card.get("title") or "Approval")
            a["options"] = _options(a.pop("options_json"), card)
        return sorted(out, key=lambda a: a["created_at"] or "")

    async def _approvals(self, request: web.Request) -> web.Response:
        return web.json_response({"approvals": self._open_approvals()})

    async def _answer_approval(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        aid, option = body.get("id"), body.get("option")
        if not isinstance(aid, str) or not APPROVAL_ID.match(aid) or not is_approval_card(aid):
            return _bad("id must be an approval's id (GET /api/approvals lists them)")
        if not isinstance(option, str):
            return _bad("option must be one of the approval's option values")
        found = next((a for a in self._open_approvals() if a["id"] == aid), None)
        if found is None:
            return _bad(f"no open approval {aid!r} (decided or expired already?)", 404)
        chosen = next((o for o in found["options"] if o["value"] == option), None)
        if chosen is None:
            return _bad(f"{option[:60]!r} is not an option of {aid}")
        # the router decides it, as it decides a click on the card in any chat
        await self.host.inbound("local", new_id("console"), {
            "question_id": aid, "option": option, "user_id": self.owner}, kind="action")
        logger.info("approval {} answered {!r} on the web console", aid, option)
        shown = False
        for chat, buf in list(self.events.items()):
            if any(e["type"] == "card" and e.get("question_id") == aid for e in buf):
                self._push(chat, {"type": "answered", "question_id": aid,
                                  "label": chosen.get("selected") or chosen["label"]})
                shown = True
        if shown:
            await self._notify()
        return web.json_response({"ok": True}, status=202)

    # ---- errors -----------------------------------------------------------------------
    async def _errors(self, request: web.Request) -> web.Response:
        try:
            n = int(request.query.get("lines", ERROR_LINES))
        except ValueError:
            return _bad(f"lines must be a whole number from 1 to {MAX_ERROR_LINES}")
        if not 1 <= n <= MAX_ERROR_LINES:
            return _bad(f"lines must be a whole number from 1 to {MAX_ERROR_LINES}")
        path = self.settings.logs_dir / "nanoclaw.error.log"
        lines = tail(path, n)
        tok = getattr(self, "token", "")
        if tok:  # never logged (H4); should one ever be, it is not shown again here
            lines = [ln.replace(tok, "[web token]") for ln in lines]
        return web.json_response({"file": str(path), "lines": lines})

    # ---- files an agent sent ----------------------------------------------------------
    async def _file(self, request: web.Request) -> web.StreamResponse:
        parts = request.query.get("path", "").split("/")
        if len(parts) != 3 or not all(is_safe_name(p) for p in parts):
            return _bad("path must be <session>/<message>/<file name>")
        path = self.settings.data_dir / "outfiles" / parts[0] / parts[1] / parts[2]
        if path.is_symlink() or not path.is_file():
            return _bad("no such file", 404)
        return web.FileResponse(path, headers={
            "Content-Type": "application/octet-stream", "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="{parts[2]}"'})


def file_ref(settings: Any, f: dict[str, Any]) -> dict[str, Any] | None:
    """A reply's file as the page shows it: inline data, or a download from `outfiles/`."""
    name = str(f.get("name") or "file")
    if f.get("data"):
        return {"name": name, "data": f["data"]}
    path = str(f.get("path") or "")
    root = str(settings.data_dir / "outfiles") + "/"
    if path.startswith(root):
        rel = path[len(root):]
        if len(rel.split("/")) == 3 and all(is_safe_name(p) for p in rel.split("/")):
            return {"name": name, "url": "/api/file?path=" + rel}
    return None


def usage_groups(store: Store, settings: Any, days: list[str]) -> list[dict[str, Any]]:
    """Per agent group: tokens and requests for each of `days`, and its daily budget."""
    rows = store.usage_by_day(days[0])
    index = {d: i for i, d in enumerate(days)}
    groups = {g["folder"]: {"id": g["id"], "name": g["name"], "folder": g["folder"],
                            "budget": (g["daily_token_budget"]
                                       if g["daily_token_budget"] is not None
                                       else settings.daily_token_budget) or None,
                            "tokens": [0] * len(days), "requests": [0] * len(days)}
              for g in store.groups_overview()}
    for r in rows:
        i = index.get(r["day"])
        if i is None:
            continue
        g = groups.setdefault(r["grp"], {"id": None, "name": r["grp"], "folder": r["grp"],
                                         "budget": settings.daily_token_budget or None,
                                         "tokens": [0] * len(days),
                                         "requests": [0] * len(days)})
        g["tokens"][i] += int(r["input"] + r["output"] + r["cache_write"] + r["cache_read"])
        g["requests"][i] += int(r["requests"])
    return list(groups.values())


def tail(path: Any, n: int) -> list[str]:
    """The last `n` lines of a text file (at most its last ERROR_BYTES); [] when absent."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - ERROR_BYTES))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if size > ERROR_BYTES and lines:
        lines = lines[1:]  # the first one is cut
    return lines[-n:]


def _options(options_json: str | None, card: dict[str, Any]) -> list[dict[str, str]]:
    try:
        opts = json.loads(options_json) if options_json else card.get("options")
    except ValueError:
        opts = card.get("options")
    out = []
    for o in opts if isinstance(opts, list) else []:
        if isinstance(o, dict) and o.get("value") is not None:
            out.append({"label": str(o.get("label") or o["value"]), "value": str(o["value"]),
                        "selected": str(o.get("selectedLabel") or o.get("label") or "")})
    return out
