"""Settings, from the environment and `.env` (prefix `NANOCLAW_`; platforms' own names
for their tokens). A wrong value stops start-up with one line naming the setting.

The credential fields are read here only so that the orchestrator can hand them to the
broker; every other process starts with an environment scrubbed of them.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nanoclaw.errors import ConfigError

# Environment names that carry a secret: removed from every child's environment.
SECRET_ENV = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN",
              "OPENAI_API_KEY")


class SettingsError(ConfigError):
    """A setting is wrong; the message is one line naming it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NANOCLAW_", env_file=".env", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Path("data")
    logs_dir: Path = Path("logs")
    groups_dir: Path = Path("groups")
    runtime: Literal["auto", "docker", "bwrap", "process"] = "auto"
    provider: Literal["claude", "anthropic", "openai", "opencode"] = "claude"
    model: str = "claude-sonnet-4-5"
    fallback_model: str = ""  # for groups without their own: used while `model` is overloaded
    assistant_name: str = "Andy"
    timezone: str = Field(default="", validation_alias=AliasChoices("NANOCLAW_TIMEZONE", "TZ"))
    log_level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # logs/ stays small (nanoclaw/logfiles.py): each host log rotates past this size,
    # keeping log_keep old copies; container logs are kept this many days, this much in all
    log_rotate_mb: float = Field(default=20.0, gt=0, le=10240)
    log_keep: int = Field(default=5, ge=0, le=100)
    container_log_days: float = Field(default=14.0, gt=0, le=3650)
    container_logs_mb: float = Field(default=500.0, gt=0)

    # Credentials: only the broker uses them.
    anthropic_api_key: str = Field(default="", validation_alias="ANTHROPIC_API_KEY")
    claude_code_oauth_token: str = Field(default="", validation_alias="CLAUDE_CODE_OAUTH_TOKEN")
    anthropic_base_url: str = Field(
        default="https://api.anthropic.com", validation_alias="ANTHROPIC_BASE_URL"
    )
    # The default OpenAI-compatible upstream (NANOCLAW_PROVIDER=openai); further named
    # upstreams (local ones need no key) in NANOCLAW_UPSTREAMS (nanoclaw/upstreams.py).
    openai_api_key: str = Field(default="", validation_alias="OPENAI_API_KEY")
    openai_base_url: str = Field(default="https://api.openai.com/v1",
                                 validation_alias="OPENAI_BASE_URL")
    upstreams: str = ""  # JSON: {name: {url, api?, key_env?}}
    fallback_upstream: str = ""  # for groups without their own fallback upstream
    broker_port: int = Field(default=0, ge=0, le=65535)
    daily_token_budget: int = Field(default=0, ge=0)  # per agent group; 0: no budget
    # The egress door (nanoclaw/broker/egress.py): with network `none`, a sandbox reaches
    # the web only through it, as its agent group's policy allows (`groups update --web`).
    egress_enabled: bool = True
    egress_ports: str = Field(default="80,443", pattern=r"^\s*\d{1,5}(\s*,\s*\d{1,5})*\s*$")
    egress_daily_mb: float = Field(default=1024.0, ge=0)  # per agent group and day; 0: none
    egress_connections: int = Field(default=16, ge=1, le=4096)  # at once, per agent group
    # TESTS ONLY: `host:port` pairs, the host exactly as a request writes it, that the
    # door lets through to whatever address they are (a test's own server on 127.0.0.1)
    egress_test_allow: str = Field(default="", pattern=r"^([^,:\s]+:\d{1,5}(,[^,:\s]+:\d{1,5})*)?$")

    # Sandboxes (docker and bwrap runtimes).
    image: str = "nanoclaw-agent:latest"
    # Chinese, Japanese and Korean fonts in the agent image (`make image` reads it), for
    # the browser's screenshots and PDFs; about 100 MB more. `nanoclaw doctor` suggests it.
    cjk_fonts: bool = False
    container_network: Literal["none", "host"] = "none"  # none: the broker socket only
    container_memory: str = "1g"
    container_pids: int = Field(default=512, ge=0)
    container_cpus: float = Field(default=2.0, ge=0)
    warm_pool: int = Field(default=1, ge=0, le=16)  # agents started ahead (bwrap, docker, process)
    zygote: bool = True  # process runtime: agents forked from one that imported the runner
    # the sandbox user when the host runs as root: a uid no local account has (H5)
    agent_uid: int = Field(default=61000, ge=1, le=2**31 - 2)
    mount_allowlist: Path = Path("~/.config/nanoclaw/mount-allowlist.json")

    # Channels.
    cli_enabled: bool = True
    web_enabled: bool = True
    web_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port, kept in data/web.json
    web_host: str = "127.0.0.1"  # the local chat page stays off public interfaces by default
    telegram_bot_token: str = Field(default="", validation_alias="TELEGRAM_BOT_TOKEN")
    telegram_api_base: str = Field(default="https://api.telegram.org",
                                   validation_alias="TELEGRAM_API_BASE")
    telegram_poll_timeout: float = Field(default=25.0, gt=0, le=60)  # long poll, seconds
    discord_bot_token: str = Field(default="", validation_alias="DISCORD_BOT_TOKEN")
    discord_api_base: str = Field(default="https://discord.com/api/v10",
                                  validation_alias="DISCORD_API_BASE")
    discord_gateway_url: str = Field(default="wss://gateway.discord.gg",
                                     validation_alias="DISCORD_GATEWAY_URL")
    discord_heartbeat_timeout: float = Field(default=60.0, gt=0, le=600)
    discord_reconnects: int = Field(default=5, ge=0, le=100)  # in-process, per 10 minutes
    slack_bot_token: str = Field(default="", validation_alias="SLACK_BOT_TOKEN")
    slack_app_token: str = Field(default="", validation_alias="SLACK_APP_TOKEN")
    slack_api_base: str = Field(default="https://slack.com/api/", validation_alias="SLACK_API_BASE")
    # The webhook door (the `webhooks` worker), started only when a webhook channel is on:
    # platforms POST to http://HOST:PORT/webhook/<channel>; publish just that path.
    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(default=8790, ge=0, le=65535)  # 0: any free port
    webhook_max_bytes: int = Field(default=1024 * 1024, ge=1024)
    webhook_rate: int = Field(default=600, ge=1)  # requests a minute from one address
    # WhatsApp Cloud API (Meta Graph): outbound through the Graph API, inbound through the
    # webhook door at /webhook/whatsapp-cloud. Enabled by the access token.
    whatsapp_access_token: str = Field(default="", validation_alias="WHATSAPP_ACCESS_TOKEN")
    whatsapp_phone_number_id: str = Field(default="",
                                          validation_alias="WHATSAPP_PHONE_NUMBER_ID")
    whatsapp_app_secret: str = Field(default="", validation_alias="WHATSAPP_APP_SECRET")
    whatsapp_verify_token: str = Field(default="", validation_alias="WHATSAPP_VERIFY_TOKEN")
    whatsapp_api_base: str = Field(default="https://graph.facebook.com",
                                   validation_alias="WHATSAPP_API_BASE")
    whatsapp_api_version: str = Field(default="v23.0", pattern=r"^v[0-9]+\.[0-9]+$",
                                      validation_alias="WHATSAPP_API_VERSION")
    # hosts media URLs may point at (comma-separated, `*.` for subdomains); the API base's
    # host is always allowed
    whatsapp_media_hosts: str = Field(default="lookaside.fbsbx.com,*.fbcdn.net",
                                      validation_alias="WHATSAPP_MEDIA_HOSTS")
    # an approved template (`name` or `name:language`) sent when a reply falls outside
    # the 24-hour window, asking the user to write again
    whatsapp_template: str = Field(default="", validation_alias="WHATSAPP_TEMPLATE")
    # GitHub: issue and PR comments as chat (channels/github.py). Enabled by a bot
    # account's token; /webhook/github is served only with GITHUB_WEBHOOK_SECRET, and
    # without it the reconcile poll alone brings comments in (no public URL needed).
    github_token: str = Field(default="", validation_alias="GITHUB_TOKEN")
    github_webhook_secret: str = Field(default="", validation_alias="GITHUB_WEBHOOK_SECRET")
    github_bot_username: str = Field(default="", validation_alias="GITHUB_BOT_USERNAME")
    github_api_base: str = Field(default="https://api.github.com",
                                 validation_alias="GITHUB_API_BASE")
    github_repos: str = Field(default="", validation_alias="GITHUB_REPOS")  # owner/repo,…
    github_poll_interval: float = Field(default=60.0, ge=0.05, le=3600,
                                        validation_alias="GITHUB_POLL_INTERVAL")
    github_attachment_hosts: str = Field(
        default="github.com,user-images.githubusercontent.com,"
        "private-user-images.githubusercontent.com,objects.githubusercontent.com",
        validation_alias="GITHUB_ATTACHMENT_HOSTS")
    github_members_only_reply: str = Field(default="",
                                           validation_alias="GITHUB_MEMBERS_ONLY_REPLY")
    # Linear: issue comments as chat (channels/linear.py), through /webhook/linear.
    linear_api_key: str = Field(default="", validation_alias="LINEAR_API_KEY")
    linear_webhook_secret: str = Field(default="", validation_alias="LINEAR_WEBHOOK_SECRET")
    linear_api_url: str = Field(default="https://api.linear.app/graphql",
                                validation_alias="LINEAR_API_URL")
    linear_webhook_tolerance: float = Field(default=60.0, gt=0, le=3600)  # replay, seconds
    # Microsoft Teams (Bot Framework): activities through /webhook/teams (channels/teams.py).
    teams_app_id: str = Field(default="", validation_alias="TEAMS_APP_ID")
    teams_app_password: str = Field(default="", validation_alias="TEAMS_APP_PASSWORD")
    teams_app_tenant_id: str = Field(default="", validation_alias="TEAMS_APP_TENANT_ID")
    teams_app_type: str = Field(default="MultiTenant", validation_alias="TEAMS_APP_TYPE",
                                pattern=r"(?i)^(multi|single)(tenant)?$")
    teams_openid_metadata_url: str = Field(
        default="https://login.botframework.com/v1/.well-known/openidconfiguration",
        validation_alias="TEAMS_OPENID_METADATA_URL")
    teams_token_url: str = Field(  # `{tenant}`: TEAMS_APP_TENANT_ID, else botframework.com
        default="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        validation_alias="TEAMS_TOKEN_URL")
    teams_service_url_allow: str = Field(
        default="smba.trafficmanager.net,smba.infra.gcc.teams.microsoft.com,"
        "smba.infra.gov.teams.microsoft.us,smba.infra.dod.teams.microsoft.us",
        validation_alias="TEAMS_SERVICE_URL_ALLOW")
    teams_service_url: str = Field(default="https://smba.trafficmanager.net/teams",
                                   validation_alias="TEAMS_SERVICE_URL")
    teams_attachment_hosts: str = Field(default="*.sharepoint.com",
                                        validation_alias="TEAMS_ATTACHMENT_HOSTS")
    # Google Chat: HTTP endpoint events through /webhook/googlechat (channels/googlechat.py),
    # replies through the Chat REST API as the service account.
    google_chat_service_account_file: str = Field(
        default="", validation_alias="GOOGLE_CHAT_SERVICE_ACCOUNT_FILE")
    google_chat_credentials: str = Field(default="", validation_alias="GOOGLE_CHAT_CREDENTIALS")
    google_chat_api_base: str = Field(default="https://chat.googleapis.com",
                                      validation_alias="GOOGLE_CHAT_API_BASE")
    # who may call /webhook/googlechat: the project number (classic Chat tokens) and/or
    # the app's URL (add-on ID tokens), comma-separated
    google_chat_audience: str = Field(default="", validation_alias="GOOGLE_CHAT_AUDIENCE")
    google_chat_certs_url: str = Field(
        default="https://www.googleapis.com/service_accounts/v1/metadata/x509/"
        "chat@system.gserviceaccount.com", validation_alias="GOOGLE_CHAT_CERTS_URL")
    google_chat_id_certs_url: str = Field(default="https://www.googleapis.com/oauth2/v1/certs",
                                          validation_alias="GOOGLE_CHAT_ID_CERTS_URL")
    # Webex: a bot (channels/webex.py); messages through the device WebSocket by default
    # (no public URL), or through /webhook/webex with WEBEX_MODE=webhook.
    webex_bot_token: str = Field(default="", validation_alias="WEBEX_BOT_TOKEN")
    webex_api_base: str = Field(default="https://webexapis.com/v1",
                                validation_alias="WEBEX_API_BASE")
    webex_device_url: str = Field(default="https://wdm-a.wbx2.com/wdm/api/v1/devices",
                                  validation_alias="WEBEX_DEVICE_URL")
    webex_mode: str = Field(default="websocket", pattern=r"^(websocket|webhook)$",
                            validation_alias="WEBEX_MODE")
    webex_webhook_secret: str = Field(default="", validation_alias="WEBEX_WEBHOOK_SECRET")
    # iMessage through a BlueBubbles Server on a Mac (channels/imessage.py): polled by
    # default (no public URL); with BLUEBUBBLES_WEBHOOK_SECRET also through /webhook/imessage.
    bluebubbles_url: str = Field(default="", validation_alias="BLUEBUBBLES_URL")
    bluebubbles_password: str = Field(default="", validation_alias="BLUEBUBBLES_PASSWORD")
    bluebubbles_webhook_secret: str = Field(default="",
                                            validation_alias="BLUEBUBBLES_WEBHOOK_SECRET")
    bluebubbles_poll_interval: float = Field(default=2.0, ge=0.05, le=600,
                                             validation_alias="BLUEBUBBLES_POLL_INTERVAL")
    bluebubbles_send_method: str = Field(default="apple-script",
                                         pattern=r"^(apple-script|private-api)$",
                                         validation_alias="BLUEBUBBLES_SEND_METHOD")
    bluebubbles_attachment_wait: float = Field(default=120.0, ge=0, le=86400,
                                               validation_alias="BLUEBUBBLES_ATTACHMENT_WAIT")
    # Email (channels/email_channel.py): IMAP (IDLE) + SMTP with any mailbox, or Resend
    # (its API to send; /webhook/resend or polling to receive). A chat is an address.
    email_imap_host: str = Field(default="", validation_alias="EMAIL_IMAP_HOST")
    email_imap_port: int = Field(default=993, ge=1, le=65535, validation_alias="EMAIL_IMAP_PORT")
    email_imap_tls: str = Field(default="tls", pattern=r"^(tls|none)$",
                                validation_alias="EMAIL_IMAP_TLS")
    email_imap_folder: str = Field(default="INBOX", validation_alias="EMAIL_IMAP_FOLDER")
    email_smtp_host: str = Field(default="", validation_alias="EMAIL_SMTP_HOST")
    email_smtp_port: int = Field(default=587, ge=1, le=65535, validation_alias="EMAIL_SMTP_PORT")
    email_smtp_tls: str = Field(default="starttls", pattern=r"^(starttls|tls|none)$",
                                validation_alias="EMAIL_SMTP_TLS")
    email_username: str = Field(default="", validation_alias="EMAIL_USERNAME")
    email_password: str = Field(default="", validation_alias="EMAIL_PASSWORD")
    email_address: str = Field(default="", validation_alias=AliasChoices(
        "EMAIL_ADDRESS", "RESEND_FROM_ADDRESS"))
    email_from_name: str = Field(default="", validation_alias=AliasChoices(
        "EMAIL_FROM_NAME", "RESEND_FROM_NAME"))
    email_ca_file: str = Field(default="", validation_alias="EMAIL_CA_FILE")
    email_authserv_id: str = Field(default="", validation_alias="EMAIL_AUTHSERV_ID")
    email_require_auth: str = Field(default="dkim_or_spf",
                                    pattern=r"^(dkim|spf|dkim_or_spf|none)$",
                                    validation_alias="EMAIL_REQUIRE_AUTH")
    email_poll_interval: float = Field(default=60.0, ge=0.05, le=3600,
                                       validation_alias="EMAIL_POLL_INTERVAL")
    resend_api_key: str = Field(default="", validation_alias="RESEND_API_KEY")
    resend_api_url: str = Field(default="https://api.resend.com",
                                validation_alias="RESEND_API_URL")
    resend_webhook_secret: str = Field(default="", validation_alias="RESEND_WEBHOOK_SECRET")
    # Matrix: a bot account (channels/matrix.py), messages by /sync long poll (no public
    # URL). MATRIX_ACCESS_TOKEN, or MATRIX_USER_ID + MATRIX_PASSWORD (logs in once; the
    # session is kept in data/channels/matrix/, with the E2EE keys when MATRIX_E2EE=1).
    matrix_homeserver: str = Field(default="", validation_alias="MATRIX_HOMESERVER")
    matrix_access_token: str = Field(default="", validation_alias="MATRIX_ACCESS_TOKEN")
    matrix_user_id: str = Field(default="", validation_alias="MATRIX_USER_ID")
    matrix_password: str = Field(default="", validation_alias="MATRIX_PASSWORD")
    matrix_device_id: str = Field(default="", validation_alias="MATRIX_DEVICE_ID")
    matrix_e2ee: bool = Field(default=False, validation_alias="MATRIX_E2EE")
    matrix_sync_timeout: float = Field(default=30.0, ge=0.5, le=300,
                                       validation_alias="MATRIX_SYNC_TIMEOUT")
    # WhatsApp Web, as a linked device: `nanoclaw channels login whatsapp` links it (QR, or
    # a pairing code for WHATSAPP_PHONE_NUMBER); its keys stay in data/channels/whatsapp/.
    whatsapp_enabled: bool = False
    whatsapp_phone_number: str = Field(default="", validation_alias="WHATSAPP_PHONE_NUMBER")
    whatsapp_silence: float = Field(default=3600.0, gt=0, le=86400)  # connected but deaf
    # A platform adapter that has had no successful round trip for this long exits
    # non-zero, so the orchestrator restarts it under the crash-loop breaker.
    channel_liveness: float = Field(default=120.0, gt=0, le=3600)
    channel_ping: float = Field(default=30.0, gt=0, le=600)  # cheap liveness call interval

    # Timing (seconds). Polls back off from the short interval to the long one when idle;
    # a worker that writers can nudge (nanoclaw/nudge.py) backs off to poll_idle instead.
    poll_min: float = Field(default=0.004, gt=0, le=1)
    poll_max: float = Field(default=0.1, gt=0, le=5)
    poll_idle: float = Field(default=1.0, gt=0, le=60)
    sweep_interval: float = Field(default=5.0, gt=0)
    stop_grace: float = Field(default=5.0, gt=0, le=60)
    # A worker whose heartbeat (data/run/heartbeat/<worker>) is this old is killed and
    # restarted; far above any legitimate pass (a healthy worker beats every tenth of it).
    worker_hung_after: float = Field(default=60.0, ge=1, le=3600)
    idle_ceiling: float = Field(default=1800.0, gt=0)
    claim_tolerance: float = Field(default=60.0, gt=0)
    send_attempts: int = Field(default=5, ge=1, le=50)
    # A platform call (one send, all its parts) that has not answered in this long is
    # given up and retried: a stalled platform holds a channel's queue no longer.
    send_timeout: float = Field(default=120.0, ge=1, le=3600)
    # A model call whose answer goes silent this long mid-stream is given up and retried
    # by the agent (its normal retry path), never waited on for good.
    model_stall_timeout: float = Field(default=120.0, ge=0.5, le=3600)
    # A `claude` agent closes its Claude Code CLI after this long without a query (0:
    # never); the next message starts it again, resuming the conversation.
    claude_idle_s: float = Field(default=300.0, ge=0, le=86400)
    agent_pair_limit: int = Field(default=10, ge=1, le=1000)  # agent→agent msgs per minute
    retry_base: float = Field(default=5.0, gt=0, le=600)  # agent retries: retry_base·2^tries

    @field_validator("anthropic_base_url", "openai_base_url", "telegram_api_base",
                     "discord_api_base", "whatsapp_api_base", "github_api_base",
                     "linear_api_url", "teams_openid_metadata_url", "teams_token_url",
                     "teams_service_url", "google_chat_api_base", "google_chat_certs_url",
                     "google_chat_id_certs_url", "webex_api_base", "webex_device_url",
                     "resend_api_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("matrix_homeserver", "bluebubbles_url")
    @classmethod
    def _optional_url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("upstreams")
    @classmethod
    def _upstreams(cls, v: str) -> str:
        from nanoclaw.upstreams import check_named

        if not v.strip():
            return ""
        try:
            data = json.loads(v)
        except ValueError:
            raise ValueError("must be a JSON object of name: {url, api?, key_env?}") from None
        return json.dumps(check_named(data))

    @property
    def named_upstreams(self) -> dict[str, dict[str, str]]:
        """NANOCLAW_UPSTREAMS, parsed (checked when the settings were read)."""
        return json.loads(self.upstreams) if self.upstreams else {}

    _upstream_keys: dict[str, str] = PrivateAttr(default_factory=dict)

    def upstream_key(self, env_name: str) -> str:
        """A named upstream's key (the broker's copy only; see `with_upstream_keys`)."""
        return self._upstream_keys.get(env_name, "")

    def with_upstream_keys(self, keys: dict[str, str]) -> "Settings":
        """A copy holding the named upstreams' keys, by environment name (the broker's)."""
        out = self.model_copy()
        out._upstream_keys = dict(keys)
        return out

    @field_validator("slack_api_base")
    @classmethod
    def _slack_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") + "/"

    @field_validator("discord_gateway_url")
    @classmethod
    def _ws_url(cls, v: str) -> str:
        if not v.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        if not v:
            return ""
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v.lstrip(":"))
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r}") from None
        return v.lstrip(":")

    # Derived paths.
    @property
    def db_path(self) -> Path:
        return self.data_dir / "nanoclaw.db"

    @property
    def sessions_dir(self) -> Path:
        return self.data_dir / "sessions"

    @property
    def cli_socket(self) -> Path:
        return self.data_dir / "cli.sock"

    @property
    def broker_socket(self) -> Path:
        """The broker's unix socket; its folder is mounted into every sandbox."""
        return self.data_dir / "broker" / "broker.sock"

    @property
    def egress_socket(self) -> Path:
        """The egress door's unix socket, beside the broker's (the same folder is
        mounted into every sandbox with network `none`)."""
        return self.data_dir / "broker" / "egress.sock"

    @property
    def breaker_file(self) -> Path:
        return self.data_dir / "circuit-breaker.json"

    @property
    def tz(self) -> str:
        return self.timezone or _system_tz()

    def session_dir(self, agent_group_id: str, session_id: str) -> Path:
        return self.sessions_dir / agent_group_id / session_id

    def group_dir(self, folder: str) -> Path:
        return self.groups_dir / folder

    def agent_uid_problem(self) -> str | None:
        """Why `agent_uid` must not be used, or None. A uid that belongs to a local
        account would let that user own every agent folder and read every sandbox's
        memory (its broker token), so a root host refuses to start with one."""
        if os.geteuid() != 0:
            return None  # sandboxes run as the host's own user
        import pwd

        try:
            account = pwd.getpwuid(self.agent_uid)
        except KeyError:
            return None
        return (f"agent uid {self.agent_uid} belongs to the local account"
                f" {account.pw_name!r}, which would own every agent's files; set"
                f" NANOCLAW_AGENT_UID to a uid no account has (the default is"
                f" {type(self).model_fields['agent_uid'].default})")

    def agent_owner(self) -> tuple[int, int] | None:
        """Who the agent's folders belong to: `agent_uid` when the host is root (it
        runs sandboxes as that user), else None (the host's own user)."""
        return (self.agent_uid, self.agent_uid) if os.geteuid() == 0 else None


def _env_name(loc: str) -> str:
    """The environment name the user actually set for a field (aliases included)."""
    field = Settings.model_fields.get(loc)
    for f in Settings.model_fields.values():  # pydantic may report the alias instead
        a = f.validation_alias
        if (isinstance(a, str) and a == loc) or (isinstance(a, AliasChoices) and loc in a.choices):
            field = f
    names = [f"NANOCLAW_{loc.upper()}"]
    alias = field.validation_alias if field else None
    if isinstance(alias, str):
        names = [alias]
    elif isinstance(alias, AliasChoices):
        names = [str(c) for c in alias.choices]
    for n in names:
        if n in os.environ:
            return n
    return loc if loc.isupper() else names[0]


def _system_tz() -> str:
    try:
        link = os.readlink("/etc/localtime")
        if "zoneinfo/" in link:
            return link.split("zoneinfo/", 1)[1]
    except OSError:
        pass
    try:
        return Path("/etc/timezone").read_text().strip() or "UTC"
    except OSError:
        return "UTC"


def load(env_file: str | Path | None = None) -> Settings:
    """Read settings (from `env_file` instead of `.env` when given); raise SettingsError
    with one line naming the first bad setting."""
    try:
        s = Settings(_env_file=env_file) if env_file is not None else Settings()
    except ValidationError as e:
        err = e.errors()[0]
        loc = str(err["loc"][0]) if err["loc"] else "?"
        msg = err["msg"].removeprefix("Value error, ")
        raise SettingsError(f"bad setting {_env_name(loc)}: {msg}") from None
    return s.model_copy(
        update={
            "data_dir": s.data_dir.absolute(),
            "logs_dir": s.logs_dir.absolute(),
            "groups_dir": s.groups_dir.absolute(),
        }
    )


@lru_cache(maxsize=1)
def get() -> Settings:
    return load()


def secret_names(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """SECRET_ENV plus the key variables NANOCLAW_UPSTREAMS names (`key_env`)."""
    from nanoclaw.upstreams import key_envs

    return SECRET_ENV + key_envs((environ if environ is not None else os.environ)
                                 .get("NANOCLAW_UPSTREAMS", ""))


def scrubbed_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment minus every secret, plus `extra`."""
    names = secret_names()
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra or {})
    return env
