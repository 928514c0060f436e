"""The host's errors, sorted by what the caller does next (as python-telegram-bot's
`error.py`): stop and fix the setup, tell the asker why nothing changed, or look at the
data. Built-in `LookupError`, `KeyError` and `PermissionError` are never a signal here:
a bug that raises one must not reach a user as "already decided" or "not allowed".

Every message is one line that names the cause and, where there is one, the fix.
"""

from __future__ import annotations


class NanoclawError(Exception):
    """Base of every error the host raises on purpose."""


class ConfigError(NanoclawError):
    """The settings or the install are wrong; retrying or restarting will not help
    (a worker exits with EXIT_CONFIG and waits to be asked)."""


class DataError(NanoclawError):
    """The data directory or a database is unusable or not what it must be."""


class NotFound(NanoclawError):
    """The thing named does not exist, or no longer does (decided, expired, removed).
    Nothing was changed; tell the asker."""


class NotAllowed(NanoclawError):
    """The asker may not do this. Nothing was changed; tell the asker."""


class Refused(NanoclawError):
    """Understood and allowed, but refused as asked (a bad value, a state that does not
    permit it, nobody to approve). Nothing was changed; the message says why."""


class DiskFull(Refused):
    """The data directory has no space left: nothing was stored. Input is refused with
    this message until space returns; workers wait for it instead of crashing."""

    def __init__(self, where: object) -> None:
        super().__init__(f"the host's disk is full ({where} has no space left), so nothing"
                         " new can be stored; free some space there and send it again")


def disk_full(e: BaseException) -> bool:
    """Whether an error says the disk (or the database's quota) is full."""
    import errno
    import sqlite3

    if isinstance(e, sqlite3.OperationalError):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or \
            "disk is full" in str(e)
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
