"""Intent-named access to the central DB: one method, one transaction.

Workers hold one `Store` each (opened after fork). `Store` is one class per DB file,
split by table group into mixins so no file grows past a screenful of intents:

| mixin | file | tables |
|---|---|---|
| `GroupQueries` | `groups.py` | agent groups, container configs, chats, wirings, destinations, users and roles; the who-may reads |
| `SessionQueries` | `sessions.py` | sessions, container requests, workers, host state |
| `QueueQueries` | `queues.py` | inbound events, channel outbox, question cards |
| `ApprovalQueries` | `approvals.py` | the three kinds of approval and the decisions that close them |
| `UsageQueries` | `usage.py` | token usage and budgets |
| `ChannelQueries` | `channels.py` | what a channel runner reads and writes for itself |
| `AdminQueries` | `admin.py` | what only the admin operations run |
| `EgressQueries` | `egress.py` | each group's web policy, the egress door's log |

A method that queues work for another worker nudges it after its commit (`nudge`).
The statements several decisions share, and the mixins' common base, are in `rows.py`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from nanoclaw import nudge
from nanoclaw.db.admin import AdminQueries
from nanoclaw.db.approvals import ApprovalQueries
from nanoclaw.db.central import data_version, open_central
from nanoclaw.db.channels import ChannelQueries
from nanoclaw.db.egress import EgressQueries
from nanoclaw.db.groups import GroupQueries
from nanoclaw.db.queues import QueueQueries
from nanoclaw.db.sessions import SessionQueries
from nanoclaw.db.usage import UsageQueries


class Store(GroupQueries, SessionQueries, QueueQueries, ApprovalQueries, UsageQueries,
            ChannelQueries, AdminQueries, EgressQueries):
    def __init__(self, conn: sqlite3.Connection, data_dir: Path | None = None):
        self.conn = conn
        self.data_dir = data_dir  # where the workers' nudge sockets are; None: no nudges

    @classmethod
    def open(cls, data_dir: Path, create: bool = True) -> "Store":
        return cls(open_central(data_dir, create=create), data_dir)

    def nudge(self, *workers: str) -> None:
        """Wake workers now rather than at their next poll (after a commit; best effort)."""
        if self.data_dir is not None:
            nudge.send(self.data_dir, *workers)

    def close(self) -> None:
        self.conn.close()

    def version(self) -> int:
        return data_version(self.conn)
