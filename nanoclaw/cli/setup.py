"""`nanoclaw setup`: the first run, interactive or (`--non-interactive`) from flags.

It asks for the model credential and checks it with one cheap request (the model list),
shows which runtime agents will get here (and prints the command that builds the image
or installs bubblewrap), asks for each channel's token and checks it against the
platform (`tokens.py`), then writes `.env` with mode 0600. Only what you change is
written: every other line of `.env` stays as it was, and pressing Enter (or leaving a
flag out) keeps a value. A refused key or token is one line naming it, and nothing is
written; a platform that cannot be reached is a warning (the value is written).
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from nanoclaw import config
from nanoclaw.cli import credentials, tokens
from nanoclaw.cli.common import CliError
from nanoclaw.config import Settings, SettingsError


@dataclass(frozen=True)
class Item:
    env: str
    prompt: str
    secret: bool = True
    advanced: bool = False  # flags only (base URLs, for tests and self-hosted APIs)

    @property
    def flag(self) -> str:
        return "--" + self.env.removeprefix("NANOCLAW_").lower().replace("_", "-")


ITEMS = (
    Item("NANOCLAW_PROVIDER", "provider for new agents (claude, anthropic, openai)", False),
    Item("ANTHROPIC_API_KEY", "Anthropic API key (sk-ant-…)"),
    Item("CLAUDE_CODE_OAUTH_TOKEN", "or a Claude Code OAuth token (instead of the key)"),
    Item("ANTHROPIC_BASE_URL", "Anthropic API base URL", False, True),
    Item("OPENAI_API_KEY", "OpenAI-compatible API key (NANOCLAW_PROVIDER=openai)"),
    Item("OPENAI_BASE_URL", "OpenAI-compatible base URL", False, True),
    Item("TELEGRAM_BOT_TOKEN", "Telegram bot token (from @BotFather)"),
    Item("TELEGRAM_API_BASE", "Telegram Bot API base", False, True),
    Item("DISCORD_BOT_TOKEN", "Discord bot token"),
    Item("DISCORD_API_BASE", "Discord API base", False, True),
    Item("SLACK_BOT_TOKEN", "Slack bot token (xoxb-…)"),
    Item("SLACK_APP_TOKEN", "Slack app-level token for Socket Mode (xapp-…)"),
    Item("SLACK_API_BASE", "Slack Web API base", False, True),
    Item("GITHUB_TOKEN", "GitHub token of the bot account"),
    Item("GITHUB_API_BASE", "GitHub API base", False, True),
    Item("LINEAR_API_KEY", "Linear API key"),
    Item("LINEAR_API_URL", "Linear GraphQL URL", False, True),
)
PLAIN = re.compile(r"[A-Za-z0-9_\-.:/@+=,]*\Z")


def add_parser(sub) -> None:
    p = sub.add_parser("setup", help="first run: the model key and channel tokens, checked,"
                       " written to .env (0600); --non-interactive for scripts")
    p.add_argument("--non-interactive", action="store_true",
                   help="take values from the flags only; ask nothing")
    p.add_argument("--env-file", default=".env", help="the file to write (default .env)")
    for it in ITEMS:
        p.add_argument(it.flag, dest=it.env, metavar="VALUE", default=None,
                       help=f"{it.prompt} ('' removes it)")
    p.set_defaults(fn=cmd_setup)


# ---- .env, changed line by line ---------------------------------------------------------
def read_env(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    if not path.exists():
        return {}
    return {k: v or "" for k, v in dotenv_values(path).items()}


def _quoted(value: str) -> str:
    if PLAIN.match(value):
        return value
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_env(path: Path, changes: dict[str, str]) -> None:
    """Set (or, for "", remove) each variable in `changes`; every other line is kept.
    Written to a new 0600 file, then renamed over the old one."""
    lines = path.read_text().splitlines() if path.exists() else []
    out, done = [], set()
    for line in lines:
        m = re.match(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        key = m.group(1) if m else None
        if key in changes:
            if key not in done and changes[key] != "":
                out.append(f"{key}={_quoted(changes[key])}")
            done.add(key)
            continue
        out.append(line)
    out += [f"{k}={_quoted(v)}" for k, v in changes.items() if k not in done and v != ""]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, ("\n".join(out) + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---- checking -----------------------------------------------------------------------------
def effective(path: Path, changes: dict[str, str]) -> Settings:
    """The settings the host will read once `changes` are in `path`."""
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        return config.load(path)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_credential(s: Settings, changes: dict[str, str]) -> str:
    """One line saying the key is good; CliError naming it when it is missing or refused."""
    problem = credentials.missing(s)
    if problem:
        flag = "--openai-api-key" if s.provider == "openai" else "--anthropic-api-key"
        raise CliError(f"{problem}: give it with {flag} KEY (or try everything offline"
                       " first: make demo)", 2)
    if s.provider == "openai":
        api, base, name, key = "openai", s.openai_base_url, "OPENAI_API_KEY", s.openai_api_key
    else:
        api, base = "anthropic", s.anthropic_base_url
        name = "ANTHROPIC_API_KEY" if s.anthropic_api_key else "CLAUDE_CODE_OAUTH_TOKEN"
        key = s.anthropic_api_key or s.claude_code_oauth_token
    if not key:
        return f"no key: {base} is on this machine"
    ok, why = credentials.check_key(api, base, key, name)
    if ok is False:
        raise CliError(f"{name} was {why}", 2)
    return f"{'ok' if ok else 'warning'}: {name} {'is ' + why if ok else 'not checked: ' + why}"


def check_tokens(s: Settings, changes: dict[str, str]) -> list[str]:
    """Each token that is set: a line; CliError naming the first new one refused."""
    lines = []
    for c, ok, why in tokens.check_settings(s):
        new = c.env in changes
        if ok is False and new:
            raise CliError(f"{c.env} was {why}", 2)
        if ok is False:
            lines.append(f"warning: {c.env} (already set) was {why}")
        elif ok is None:
            lines.append(f"warning: {c.env} not checked: {why}")
        else:
            lines.append(f"ok: {c.env} is good ({why})")
    if bool(s.slack_bot_token) != bool(s.slack_app_token):
        lines.append("note: Slack needs both SLACK_BOT_TOKEN and SLACK_APP_TOKEN")
    return lines


def runtime_lines(s: Settings) -> list[str]:
    """Which runtime agents get, and the command that gets a better one."""
    import shutil

    from nanoclaw.cli.doctor import runtime_report

    lines = [f"  {'ok ' if ok else '-  ' if ok is None else 'BAD'} {line}"
             for ok, line in runtime_report(s)]
    text = "\n".join(lines)
    if "runtime docker is not usable" in text and shutil.which("docker"):
        lines.append("  to give agents the docker runtime, build the image: make image")
    if "runtime bwrap is not usable" in text:
        lines.append("  to sandbox agents without Docker, install bubblewrap:"
                     " sudo apt-get install bubblewrap")
    return lines


# ---- the command ----------------------------------------------------------------------------
def _provider_key(s: Settings) -> str:
    """The variable whose value `check_credential` checks under these settings."""
    if s.provider == "openai":
        return "OPENAI_API_KEY"
    return "CLAUDE_CODE_OAUTH_TOKEN" if s.claude_code_oauth_token and not s.anthropic_api_key \
        else "ANTHROPIC_API_KEY"


def _ask(it: Item, current: str) -> str | None:
    """A new value, "" to remove, None to keep."""
    shown = ("set, ends …" + current[-4:] if it.secret else current) if current else "not set"
    prompt = f"{it.prompt} [{shown}; Enter keeps, '-' removes]: "
    try:
        answer = getpass.getpass(prompt) if it.secret and sys.stdin.isatty() else input(prompt)
    except EOFError:  # the end of piped answers: keep the rest
        print()
        return None
    answer = answer.strip()
    if not answer:
        return None
    return "" if answer == "-" else answer


def cmd_setup(args: argparse.Namespace) -> int:
    path = Path(args.env_file)
    current = read_env(path)
    changes = {it.env: getattr(args, it.env) for it in ITEMS
               if getattr(args, it.env) is not None}
    if not args.non_interactive:
        print(f"nanoclaw setup: writes {path} (mode 0600); Enter keeps a value.")
        for it in ITEMS:
            if it.advanced or it.env in changes:
                continue
            while True:
                answer = _ask(it, current.get(it.env, ""))
                if answer is None:
                    break
                trial = {**changes, it.env: answer}
                try:
                    s = effective(path, trial)
                    if it.env in {c.env for c in tokens.CHECKS} and answer:
                        check_tokens(s, {it.env: answer})
                    elif answer and it.env == _provider_key(s):
                        print("  " + check_credential(s, trial))
                except CliError as e:
                    print(f"  {e} — try again, or Enter to skip")
                    continue
                changes[it.env] = answer
                break
    try:
        s = effective(path, changes)
    except SettingsError as e:
        raise CliError(str(e), 2) from None
    print(check_credential(s, changes))
    for line in check_tokens(s, changes):
        print(line)
    print("runtime:")
    for line in runtime_lines(s):
        print(line)
    real = {k: v for k, v in changes.items() if current.get(k, "") != v}
    if real or not path.exists():
        write_env(path, real)
    else:
        os.chmod(path, 0o600)
    print(f"wrote {path} (mode 0600): " + (", ".join(
        f"{k} {'removed' if v == '' else 'set'}" for k, v in sorted(real.items()))
        or "nothing changed"))
    print("next: make run (to start it at login: nanoclaw service install)")
    return 0
