"""What every command-line verb shares: the one-line error, opening settings and store,
printing a table, who made a change.

Why a module of its own: the host verbs (`host`, `doctor`, `chat`), the admin operations
(`ops_*.py`) and the agent's `ncl` (`agent`) need these, and `main` imports them all to
build its parser (architecture review §1.4, M2).
"""

from __future__ import annotations

import argparse
from typing import Any

from nanoclaw import config
from nanoclaw.config import Settings, SettingsError
from nanoclaw.delivery import actions
from nanoclaw.errors import DataError
from nanoclaw.util import local_user_id


class CliError(Exception):
    """Print this one line and exit 1 (or `code`)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def load_settings() -> Settings:
    try:
        return config.load()
    except SettingsError as e:
        raise CliError(str(e), 2) from None


def open_store(settings: Settings):
    from nanoclaw.db.store import Store

    try:
        return Store.open(settings.data_dir, create=False)
    except DataError as e:
        raise CliError(str(e), 2) from None


def table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    """Print rows as aligned columns (`-` for an empty cell), or `(none)`."""
    if not rows:
        print("(none)")
        return
    cell = {c: [str(r.get(c) if r.get(c) is not None else "-") for r in rows] for c in cols}
    widths = {c: max(len(c), *map(len, cell[c])) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for i in range(len(rows)):
        print("  ".join(cell[c][i].ljust(widths[c]) for c in cols))


def actor(a: argparse.Namespace) -> str:
    """Who is recorded as making a change: the local user at the terminal, or the admin
    who approved an agent's `ncl` command (set by `cli.agent.execute`)."""
    return getattr(a, "actor", None) or local_user_id()


def refresh(store, settings: Settings, agent_group_id: str) -> None:
    """Re-project the group's destinations into its live sessions (after a change)."""
    actions.refresh_destinations(store, settings, agent_group_id)
