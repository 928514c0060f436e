"""Model upstreams: where the broker may forward a model call, in which API, with which key.

Two are built in: `anthropic` (the Messages API at `ANTHROPIC_BASE_URL`, key
`ANTHROPIC_API_KEY` or `CLAUDE_CODE_OAUTH_TOKEN`) and `openai` (any OpenAI-compatible
Chat Completions server at `OPENAI_BASE_URL`, key `OPENAI_API_KEY`). Further ones are
named in `NANOCLAW_UPSTREAMS`, a JSON object:

    {"ollama": {"url": "http://127.0.0.1:11434/v1"},
     "openrouter": {"url": "https://openrouter.ai/api/v1", "key_env": "OPENROUTER_API_KEY"},
     "claude-eu": {"url": "https://eu.example/anthropic", "api": "anthropic",
                   "key_env": "CLAUDE_EU_KEY"}}

`api` is `openai` (default) or `anthropic`; `key_env` names the environment variable
holding the key (none: a local server that needs no key). Those variables are secrets
like the built-in ones: scrubbed from every process but the broker
(`config.secret_names`). A URL is the base the API's own clients take (`…/v1` for
OpenAI-style, the host for Anthropic's).

An agent group uses one upstream (`container_configs.upstream`, else the default of its
provider) and may fall back to one more (`fallback_upstream`); the broker forwards a
group's calls to those two only. An agent reaches upstream NAME at
`<broker>/up/NAME/...` (the path its client would use below the upstream's base URL);
the bare `/v1/messages` of the Claude CLI is the `anthropic` upstream.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanoclaw.config import Settings

APIS = ("anthropic", "openai")
BUILTIN = ("anthropic", "openai")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}\Z")
# the API each provider speaks, and so its default upstream
PROVIDER_API = {"claude": "anthropic", "anthropic": "anthropic", "openai": "openai",
                "opencode": "openai"}


@dataclass(frozen=True)
class Upstream:
    name: str
    api: str  # "anthropic" (x-api-key) or "openai" (Authorization: Bearer)
    url: str
    key_env: str = ""  # the environment variable with its key; "" for none

    @property
    def local(self) -> bool:
        host = re.sub(r"^https?://", "", self.url).split("/", 1)[0].rsplit(":", 1)[0]
        return host in ("127.0.0.1", "localhost", "[::1]") or host.startswith("127.")


def check_named(raw: Any) -> dict[str, dict[str, str]]:
    """NANOCLAW_UPSTREAMS, checked: raises ValueError with one line naming the problem."""
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object of name: {url, api?, key_env?}")
    out = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"upstream name {name!r} must be lower-case letters, digits, - or _")
        if name in BUILTIN:
            raise ValueError(f"upstream {name!r} is built in (set its *_BASE_URL instead)")
        if not isinstance(spec, dict):
            raise ValueError(f"upstream {name!r} must be an object with a url")
        extra = set(spec) - {"url", "api", "key_env"}
        if extra:
            raise ValueError(f"upstream {name!r}: unknown key(s) {', '.join(sorted(extra))}")
        url = spec.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"upstream {name!r}: url must start with http:// or https://")
        api = spec.get("api", "openai")
        if api not in APIS:
            raise ValueError(f"upstream {name!r}: api must be one of {', '.join(APIS)}")
        key_env = spec.get("key_env", "")
        if key_env and (not isinstance(key_env, str) or not ENV_NAME.match(key_env)):
            raise ValueError(f"upstream {name!r}: key_env must be an environment variable name")
        out[name] = {"url": url.rstrip("/"), "api": api, **({"key_env": key_env}
                                                          if key_env else {})}
    return out


def key_envs(raw: str) -> tuple[str, ...]:
    """The `key_env` names in NANOCLAW_UPSTREAMS as given (leniently: a bad value is
    reported by the settings, not here)."""
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return ()
    if not isinstance(data, dict):
        return ()
    return tuple(str(s["key_env"]) for s in data.values()
                 if isinstance(s, dict) and isinstance(s.get("key_env"), str)
                 and ENV_NAME.match(s["key_env"]))


def configured(settings: Settings) -> dict[str, Upstream]:
    """Every upstream, built-in ones first."""
    out = {"anthropic": Upstream("anthropic", "anthropic", settings.anthropic_base_url,
                                 "ANTHROPIC_API_KEY"),
           "openai": Upstream("openai", "openai", settings.openai_base_url, "OPENAI_API_KEY")}
    for name, spec in settings.named_upstreams.items():
        out[name] = Upstream(name, spec["api"], spec["url"], spec.get("key_env", ""))
    return out


def default_for(provider: str) -> str:
    """A provider's upstream when its group names none."""
    return PROVIDER_API.get((provider or "").strip().lower(), "anthropic")


def credential_headers(up: Upstream, settings: Settings) -> dict[str, str]:
    """The headers that carry `up`'s key: `x-api-key` (or the OAuth bearer) for
    Anthropic-style, `Authorization: Bearer` for OpenAI-style; none without a key."""
    if up.name == "anthropic":
        if settings.anthropic_api_key:
            return {"x-api-key": settings.anthropic_api_key}
        if settings.claude_code_oauth_token:
            return {"authorization": f"Bearer {settings.claude_code_oauth_token}"}
        return {}
    key = settings.openai_api_key if up.name == "openai" else settings.upstream_key(up.key_env)
    if not key:
        return {}
    return {"x-api-key": key} if up.api == "anthropic" else {"authorization": f"Bearer {key}"}


def group_upstreams(provider: str, cfg: dict[str, Any], settings: Settings
                    ) -> tuple[str, str | None]:
    """A group's upstream and fallback upstream (None: same as the upstream)."""
    up = (cfg.get("upstream") or "").strip() or default_for(provider)
    fb = (cfg.get("fallback_upstream") or "").strip() or settings.fallback_upstream or None
    return up, (fb if fb and fb != up else None)


def group_provider(session: dict[str, Any] | None, cfg: dict[str, Any], ag: dict[str, Any],
                   default: str = "claude") -> str:
    """The provider a session's agent runs: the session's own, its group's config's,
    the group's, else the default."""
    return ((session or {}).get("agent_provider") or cfg.get("provider")
            or ag.get("agent_provider") or default or "claude").strip().lower() or "claude"
