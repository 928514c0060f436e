"""The central-DB statements only the admin operations run (`nanoclaw groups …`,
`users …`, `wiring …`, and the agent's `ncl`). A mixin of `Store`."""

from __future__ import annotations

import sqlite3


class AdminQueries:
    conn: sqlite3.Connection
