"""Is a channel's token good? One cheap call to the platform, as its adapter would make:
Telegram `getMe`, Discord `users/@me` (what its login asks), Slack `auth.test` (and
`apps.connections.open` for the Socket Mode app token), GitHub `user`, Linear `viewer`.

`nanoclaw setup` checks a token before it writes it; `nanoclaw doctor` checks every
enabled channel's. Each check answers (True, who the token belongs to), (False, why it
was refused) or (None, why we cannot tell: the platform did not answer). Base URLs come
from the settings, so tests point them at the fakes on 127.0.0.1.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

from nanoclaw.config import Settings

Verdict = tuple["bool | None", str]


def _call(url: str, headers: dict[str, str] | None = None, body: bytes | None = None,
          timeout: float = 10.0) -> tuple[int | None, Any]:
    """(HTTP status, parsed JSON or text), or (None, the reason) when nothing answered."""
    req = urllib.request.Request(url, data=body, headers=headers or {},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read(65536)
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read(65536)
    except (OSError, ValueError) as e:
        return None, str(getattr(e, "reason", e))
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode("utf-8", "replace")[:200]


def _field(data: Any, *keys: str) -> str:
    for k in keys:
        data = data.get(k) if isinstance(data, dict) else None
    return str(data) if data is not None else ""


def telegram(token: str, base: str) -> Verdict:
    status, data = _call(f"{base}/bot{token}/getMe")
    if status is None:
        return None, f"Telegram ({base}) did not answer: {data}"
    if status == 200 and _field(data, "ok") == "True":
        return True, f"Telegram bot @{_field(data, 'result', 'username')}"
    return False, f"refused by Telegram (HTTP {status}: {_field(data, 'description') or data})"


def discord(token: str, base: str) -> Verdict:
    status, data = _call(f"{base}/users/@me", {"Authorization": f"Bot {token}"})
    if status is None:
        return None, f"Discord ({base}) did not answer: {data}"
    if status == 200:
        return True, f"Discord bot {_field(data, 'username')}"
    return False, f"refused by Discord (HTTP {status}: {_field(data, 'message') or data})"


def _slack(method: str, token: str, base: str) -> tuple[int | None, Any]:
    return _call(f"{base}{method}", {"Authorization": f"Bearer {token}",
                                     "Content-Type": "application/x-www-form-urlencoded"}, b"")


def slack(token: str, base: str) -> Verdict:
    status, data = _slack("auth.test", token, base)
    if status is None:
        return None, f"Slack ({base}) did not answer: {data}"
    if status == 200 and isinstance(data, dict) and data.get("ok"):
        return True, f"Slack bot {data.get('user')} in {data.get('team')}"
    return False, f"refused by Slack ({_field(data, 'error') or f'HTTP {status}'})"


def slack_app(token: str, base: str) -> Verdict:
    """The app-level token (Socket Mode): only it may open a connection."""
    status, data = _slack("apps.connections.open", token, base)
    if status is None:
        return None, f"Slack ({base}) did not answer: {data}"
    if status == 200 and isinstance(data, dict) and data.get("ok"):
        return True, "Slack app token (Socket Mode)"
    return False, f"refused by Slack ({_field(data, 'error') or f'HTTP {status}'})"


def github(token: str, base: str) -> Verdict:
    status, data = _call(f"{base}/user", {"Authorization": f"Bearer {token}",
                                          "Accept": "application/vnd.github+json"})
    if status is None:
        return None, f"GitHub ({base}) did not answer: {data}"
    if status == 200:
        return True, f"GitHub account {_field(data, 'login')}"
    return False, f"refused by GitHub (HTTP {status}: {_field(data, 'message') or data})"


def linear(key: str, url: str) -> Verdict:
    status, data = _call(url, {"Authorization": key, "Content-Type": "application/json"},
                         json.dumps({"operationName": "Viewer",
                                     "query": "query Viewer { viewer { id name } }"}).encode())
    if status is None:
        return None, f"Linear ({url}) did not answer: {data}"
    if status == 200 and _field(data, "data", "viewer", "id"):
        return True, f"Linear user {_field(data, 'data', 'viewer', 'name')}"
    return False, f"refused by Linear (HTTP {status})"


@dataclass(frozen=True)
class TokenCheck:
    channel: str
    env: str         # the variable that holds the token
    field: str       # its Settings field
    base_field: str  # the Settings field of the API base it is checked against
    check: Callable[[str, str], Verdict]


CHECKS = (
    TokenCheck("telegram", "TELEGRAM_BOT_TOKEN", "telegram_bot_token", "telegram_api_base",
               telegram),
    TokenCheck("discord", "DISCORD_BOT_TOKEN", "discord_bot_token", "discord_api_base", discord),
    TokenCheck("slack", "SLACK_BOT_TOKEN", "slack_bot_token", "slack_api_base", slack),
    TokenCheck("slack", "SLACK_APP_TOKEN", "slack_app_token", "slack_api_base", slack_app),
    TokenCheck("github", "GITHUB_TOKEN", "github_token", "github_api_base", github),
    TokenCheck("linear", "LINEAR_API_KEY", "linear_api_key", "linear_api_url", linear),
)


def check_settings(settings: Settings) -> list[tuple[TokenCheck, bool | None, str]]:
    """Every token that is set, checked against its platform."""
    out = []
    for c in CHECKS:
        token = getattr(settings, c.field, "")
        if token:
            ok, why = c.check(token, getattr(settings, c.base_field))
            out.append((c, ok, why))
    return out
