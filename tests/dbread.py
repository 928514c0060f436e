"""Raw reads of the central DB for tests' assertions. The host's own code reaches the
DB only through `Store`'s intent-named methods; a test may look at any row it likes."""

from __future__ import annotations

from typing import Any


def db_rows(store: Any, sql: str, args: tuple | dict = ()) -> list[dict[str, Any]]:
    return [dict(r) for r in store.conn.execute(sql, args)]


def db_row(store: Any, sql: str, args: tuple | dict = ()) -> dict[str, Any] | None:
    r = store.conn.execute(sql, args).fetchone()
    return dict(r) if r is not None else None
