"""`nanoclaw channels`: which chat channels are on, where the platforms that call us
reach the webhook door, and `channels login whatsapp` (a linked device is linked from
the terminal: a QR code, or a pairing code for WHATSAPP_PHONE_NUMBER)."""

from __future__ import annotations

import argparse
import json
import sys

from nanoclaw.channels import WEBHOOK_CHANNEL, WEBHOOKS, load_builtin, webhook_names
from nanoclaw.cli.common import CliError, load_settings
from nanoclaw.config import Settings

LOGINS = ("whatsapp",)  # the channels linked by a login rather than a token


def door_url(settings: Settings) -> str:
    """Where the webhook door listens: as the running door recorded it, else as set."""
    if settings.db_path.exists():
        from nanoclaw.db.store import Store

        try:
            store = Store.open(settings.data_dir, create=False)
            try:
                url = store.get_state("webhook_url")
            finally:
                store.close()
            if url:
                return url
        except Exception:  # noqa: BLE001 - a report line, not a failure
            pass
    return f"http://{settings.webhook_host}:{settings.webhook_port}"


def status_of(settings: Settings, name: str) -> str | None:
    """A linked channel's own last word (`data/channels/<name>/status.json`)."""
    path = settings.data_dir / "channels" / name / "status.json"
    try:
        st = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return st.get("state", "?") + (f": {st['reason']}" if st.get("reason") else "")


def report(settings: Settings) -> list[str]:
    reg = load_builtin()
    hooks = set(webhook_names(settings))
    url = door_url(settings) if hooks else None
    lines = []
    for name in reg.names():
        on = reg.get(name).enabled(settings)
        line = f"{name:<16} {'on' if on else 'off'}"
        # the webhooks this channel's platforms call (email's is /webhook/resend)
        served = [h for h in sorted(hooks) if WEBHOOK_CHANNEL.get(h, h) == name]
        if served:  # on, and served (github without a secret only polls)
            line += "   platform calls " + ", ".join(f"{url}/webhook/{h}" for h in served)
        elif on and any(WEBHOOK_CHANNEL.get(h, h) == name for h in WEBHOOKS):
            line += "   no webhook: it fetches from the platform itself"
        st = status_of(settings, name) if name in LOGINS else None
        if st:
            line += f"   ({st})"
        lines.append(line)
    return lines


def cmd_channels(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.action == "login":
        if args.name not in LOGINS:
            raise CliError(f"channel {args.name!r} has no login: its token in .env enables it"
                           " (README: Channels)" if args.name else
                           "channels login needs a channel: whatsapp")
        from nanoclaw.channels import whatsapp_login

        return whatsapp_login.run(settings, sys.stdout)
    for line in report(settings):
        print(line)
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("channels", help="which channels are on (and where platforms call"
                       " the webhook door); login whatsapp")
    c.add_argument("action", nargs="?", choices=["list", "login"], default="list")
    c.add_argument("name", nargs="?")
    c.set_defaults(fn=cmd_channels)
