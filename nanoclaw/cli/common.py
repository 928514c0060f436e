"""What every command-line verb shares: the one-line error and opening settings and store.

Why a module of its own: the admin verbs (`admin`, `admin_limits`) and the agent's `ncl`
(`agent_cli`) need these, and `cli.py` imports the verbs to build its parser. Taking them
from `cli.py` closed an import cycle through the whole host (architecture review §1.4, M2).
"""

from __future__ import annotations

from nanoclaw import config
from nanoclaw.config import Settings, SettingsError
from nanoclaw.errors import DataError


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
