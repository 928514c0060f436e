"""Is there a model credential, and does the model API accept it?

What `make run` (a banner on the first screen), `nanoclaw send` (its one error line),
`nanoclaw doctor` and `nanoclaw setup` all need to say when the key is missing or
refused, in the same words. `missing` is pure (settings and an environment in, one line
out); `check_key` makes one cheap request (the model list) straight to the upstream.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Mapping

from nanoclaw.config import Settings
from nanoclaw.upstreams import Upstream

# the variables that carry an Anthropic-style credential (any one will do)
ANTHROPIC_KEYS = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN")
WAYS_ON = ("put your key in .env (`nanoclaw setup` does it and checks it),"
           " or see every part work offline with: make demo")


def key_name(settings: Settings) -> str:
    """The variable the user should set for the default provider."""
    return "OPENAI_API_KEY" if settings.provider == "openai" else "ANTHROPIC_API_KEY"


def is_loopback(url: str) -> bool:
    return Upstream("x", "openai", url).local


def missing(settings: Settings, environ: Mapping[str, str] | None = None) -> str | None:
    """One line naming the credential the default provider lacks, or None. A model API
    on this machine (a loopback base URL: a local server, the fake model) may need none."""
    env = os.environ if environ is None else environ
    if settings.provider == "openai":
        if settings.openai_api_key or env.get("OPENAI_API_KEY") \
                or is_loopback(settings.openai_base_url):
            return None
        return "no OPENAI_API_KEY is set (NANOCLAW_PROVIDER=openai needs it)"
    if settings.anthropic_api_key or settings.claude_code_oauth_token \
            or any(env.get(k) for k in ANTHROPIC_KEYS) or is_loopback(settings.anthropic_base_url):
        return None
    return "no ANTHROPIC_API_KEY (or CLAUDE_CODE_OAUTH_TOKEN) is set"


def banner(problem: str) -> str:
    """The block `make run` prints before anything else when there is no credential."""
    lines = [f"NO MODEL CREDENTIAL: {problem}.",
             "The host starts, but every message will fail until you do one of:",
             "  1. put your key in .env, e.g.  ANTHROPIC_API_KEY=sk-ant-...",
             "     (or run `nanoclaw setup`, which asks for it and checks it), then make run",
             "  2. try everything offline first, with canned answers:  make demo"]
    width = max(map(len, lines)) + 4
    bar = "!" * width
    return "\n".join([bar, *(f"! {line.ljust(width - 4)} !" for line in lines), bar])


def auth_headers(api: str, key: str, name: str = "") -> dict[str, str]:
    """How `key` travels: an OAuth token as a bearer, an Anthropic key as `x-api-key`,
    an OpenAI-style key as a bearer."""
    if api == "anthropic":
        if name == "CLAUDE_CODE_OAUTH_TOKEN":
            return {"authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return {"authorization": f"Bearer {key}"}


def check_key(api: str, base_url: str, key: str, name: str = "",
              timeout: float = 10.0) -> tuple[bool | None, str]:
    """One cheap request (the model list) with `key`: (True, …) accepted, (False, …)
    refused or failed, (None, …) the API could not be reached (so we cannot tell)."""
    url = base_url.rstrip("/") + ("/v1/models" if api == "anthropic" else "/models")
    req = urllib.request.Request(url, headers=auth_headers(api, key, name))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read(2000)
            return True, f"accepted by {base_url}"
    except urllib.error.HTTPError as e:
        detail = _detail(e)
        if e.code in (401, 403):
            return False, f"refused by {base_url} (HTTP {e.code}{': ' + detail if detail else ''})"
        return False, f"{base_url} answered HTTP {e.code}{': ' + detail if detail else ''}"
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return None, f"cannot reach {base_url} ({reason})"


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(2000) or b"{}")
    except (OSError, ValueError):
        return ""
    err = body.get("error") if isinstance(body, dict) else None
    msg = err.get("message") if isinstance(err, dict) else None
    return str(msg)[:120] if msg else ""
