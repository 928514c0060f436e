"""The checks `nanoclaw doctor` adds for a first-time owner, each with the one command
that fixes what it finds: the model credential (set? accepted upstream?), each enabled
channel's token (one cheap call to its platform), the webhook door, free disk space
under `data/` and `logs/`, the size of `logs/`, and CJK fonts for agents' browser where
the owner's timezone or recent messages say they are wanted.

Each check returns (ok, line) pairs: ok True or False, or None for a plain note (what
cannot be told, and why).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

from nanoclaw import logfiles
from nanoclaw.cli import credentials, tokens
from nanoclaw.config import Settings

Check = tuple["bool | None", str]
MIN_FREE = 1 << 30  # below 1 GiB free, a busy host fills the disk within days
MIB = 1 << 20


def credential(settings: Settings, host_up: bool) -> list[Check]:
    """Is the default provider's credential set, and — with the host down (else the
    broker's upstream check below says it) — does its API accept it?"""
    problem = credentials.missing(settings)
    if problem:
        return [(False, f"{problem}: every message will fail. Fix: nanoclaw setup"
                 " (or try it offline first: make demo)")]
    name = credentials.key_name(settings)
    if settings.provider == "openai":
        api, base, key = "openai", settings.openai_base_url, settings.openai_api_key
    else:
        api, base = "anthropic", settings.anthropic_base_url
        key = settings.anthropic_api_key or settings.claude_code_oauth_token
        if not settings.anthropic_api_key and settings.claude_code_oauth_token:
            name = "CLAUDE_CODE_OAUTH_TOKEN"
    if not key:
        return [(None, f"no {name} set; {base} is on this machine, so it may need none")]
    if host_up:
        return [(True, f"{name} is set (the broker's check of it is below)")]
    ok, why = credentials.check_key(api, base, key, name)
    if ok is None:
        return [(None, f"{name} is set, but whether it is accepted cannot be told: {why}")]
    if ok:
        return [(True, f"{name} is {why}")]
    return [(False, f"{name} was {why}. Fix: nanoclaw setup (enter a valid key)")]


def channel_tokens(settings: Settings) -> list[Check]:
    out: list[Check] = []
    for c, ok, why in tokens.check_settings(settings):
        if ok is None:
            out.append((None, f"channel {c.channel}: {c.env} not checked: {why}"))
        elif ok:
            out.append((True, f"channel {c.channel}: {c.env} is good ({why})"))
        else:
            out.append((False, f"channel {c.channel}: {c.env} was {why}. Fix: nanoclaw setup"
                        f" --{c.env.lower().replace('_', '-')} NEW_TOKEN"))
    return out


def webhook_door(settings: Settings, url: str | None, host_up: bool) -> list[Check]:
    """With a webhook channel on: does the door answer at its address?"""
    if not url:
        return []
    if not host_up:
        return [(None, f"webhook door {url}: not checked (the host is not running)")]
    hostport = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host == "0.0.0.0":
        host = "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except (OSError, ValueError) as e:
        return [(False, f"webhook door {url} does not answer ({e}). Fix: nanoclaw workers"
                 " restart webhooks")]
    return [(True, f"webhook door {url} answers")]


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk(settings: Settings) -> list[Check]:
    out: list[Check] = []
    seen: set[int] = set()
    for label, path in (("data/", settings.data_dir), ("logs/", settings.logs_dir)):
        where = _existing(path)
        try:
            dev = where.stat().st_dev
            usage = shutil.disk_usage(where)
        except OSError as e:
            out.append((None, f"disk under {label}: cannot tell ({e})"))
            continue
        if dev in seen:
            continue
        seen.add(dev)
        free = usage.free
        if free < MIN_FREE:
            out.append((False, f"only {free // MIB} MiB free on the disk of {label} ({path}):"
                        " messages will be refused when it is full. Fix: free space there"
                        f" (du -sh {path}/* shows what is big; nanoclaw logs --tidy)"))
        else:
            out.append((True, f"{free // MIB:,} MiB free on the disk of {label}"))
    return out


def logs_size(settings: Settings) -> list[Check]:
    """logs/ against what rotation and retention allow it to hold."""
    if not settings.logs_dir.exists():
        return []
    size = logfiles.tree_size(settings.logs_dir)
    allowed = (settings.log_rotate_mb * (settings.log_keep + 1) * 2
               + settings.container_logs_mb) * MIB
    line = (f"logs/ holds {size / MIB:,.1f} MiB (rotation and retention allow about"
            f" {allowed / MIB:,.0f}: NANOCLAW_LOG_ROTATE_MB, NANOCLAW_LOG_KEEP,"
            " NANOCLAW_CONTAINER_LOGS_MB)")
    if size > allowed:
        return [(False, f"{line}. Fix: nanoclaw logs --tidy")]
    return [(True, line)]


# The signals the original's setup reads: a CJK timezone, or CJK text in what people say.
CJK_ZONES = {"Asia/Tokyo", "Asia/Shanghai", "Asia/Chongqing", "Asia/Harbin", "Asia/Urumqi",
             "Asia/Seoul", "Asia/Pyongyang", "Asia/Taipei", "Asia/Hong_Kong", "Asia/Macau",
             "Japan", "PRC", "ROK", "ROC", "Hongkong"}
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def cjk_wanted(tz: str, texts: list[str]) -> str | None:
    """Why CJK fonts look wanted (the timezone, or recent messages), or None."""
    if tz in CJK_ZONES:
        return f"the timezone is {tz}"
    with_cjk = sum(1 for t in texts if CJK.search(t))
    if with_cjk and with_cjk * 5 >= len(texts):  # a fifth of recent messages or more
        return f"{with_cjk} of the last {len(texts)} messages are in Chinese, Japanese or Korean"
    return None


def host_has_cjk_fonts() -> bool | None:
    """Whether the host has a CJK font (the bwrap and process runtimes' browser uses the
    host's fonts); None when fontconfig cannot say."""
    if not shutil.which("fc-list"):
        return None
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.strip())


def cjk_fonts(settings: Settings, texts: list[str], image_cjk: str | None,
              runtime: str) -> list[Check]:
    """A suggestion (never a failure) to add CJK fonts when they look wanted and the
    agents' browser has none: without them screenshots and PDFs show empty boxes."""
    why = cjk_wanted(settings.tz, texts)
    if runtime == "docker":
        if settings.cjk_fonts and image_cjk != "1":
            return [(False, "NANOCLAW_CJK_FONTS=1 but the agent image has no CJK fonts."
                            " Fix: make image")]
        have = image_cjk == "1"
    else:
        have = bool(host_has_cjk_fonts())
    if not why or have:
        return []
    fix = ("add NANOCLAW_CJK_FONTS=1 to .env, then make image" if runtime == "docker"
           else "apt-get install fonts-noto-cjk")
    return [(None, f"CJK fonts suggested ({why}): without them the agents' browser shows"
                   f" Chinese, Japanese and Korean text as empty boxes. Fix: {fix}")]


def report(settings: Settings, host_up: bool) -> list[Check]:
    """Every check above, in the order a first-time owner needs them."""
    from nanoclaw.channels import webhook_names
    from nanoclaw.cli.channels import door_url

    door = door_url(settings) if webhook_names(settings) else None
    return (credential(settings, host_up) + channel_tokens(settings)
            + webhook_door(settings, door, host_up) + disk(settings) + logs_size(settings))
