"""Migrations of a session's `inbound.db`, in order, by name (applied by
`nanoclaw.db.central.migrate` into the file's own `session_migrations` ledger).

`inbound.db` is the host's file, so it carries a ledger like the central DB's: the host
brings it up to date when it creates the session folder (`session.create`, run before
every agent start) and the first time a host process opens it (`SessionInbound`, once
per process and file), so a column added here reaches every existing session before any
code uses it. A migration is never edited after it ships; append a new one. Migrations
must keep the agent's reads working (the runner reads this file read-only with
`SELECT *`, container/agent_runner/db.py): add, never rename or drop.

"initial" is the DDL the file had before it had a ledger, written with `IF NOT EXISTS`
so a file of that time adopts the ledger without change. `outbound.db` has no ledger:
see `outbound.py` ("Versions") for why and what happens instead.
"""

from nanoclaw.db.migrations import check_ledger

INITIAL = """
CREATE TABLE IF NOT EXISTS messages_in (
  id TEXT PRIMARY KEY,
  seq INTEGER NOT NULL UNIQUE,
  kind TEXT NOT NULL,
  timestamp TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending',
  process_after TEXT,
  recurrence TEXT,
  series_id TEXT,
  tries INTEGER NOT NULL DEFAULT 0,
  trigger INTEGER NOT NULL DEFAULT 1,
  platform_id TEXT,
  channel_type TEXT,
  thread_id TEXT,
  content TEXT NOT NULL,
  source_session_id TEXT,
  on_wake INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_in_status ON messages_in(status, process_after);
CREATE TABLE IF NOT EXISTS delivered (
  message_out_id TEXT PRIMARY KEY,
  platform_message_id TEXT,
  status TEXT NOT NULL,
  error TEXT,
  delivered_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS destinations (
  name TEXT PRIMARY KEY,
  display_name TEXT,
  type TEXT NOT NULL,
  channel_type TEXT,
  platform_id TEXT,
  agent_group_id TEXT
);
CREATE TABLE IF NOT EXISTS session_routing (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  channel_type TEXT,
  platform_id TEXT,
  thread_id TEXT
);
CREATE TABLE IF NOT EXISTS reset_claims (
  message_id TEXT NOT NULL,
  claimed_at TEXT NOT NULL,
  PRIMARY KEY (message_id, claimed_at)
);
"""

INBOUND_MIGRATIONS: list[tuple[str, str]] = [
    ("initial", INITIAL),
    # a task is found by its series (`tasks.py`: id=? OR series_id=?) on every action
    ("messages-in-series-index",
     "CREATE INDEX messages_in_series ON messages_in(series_id);\n"),
]
check_ledger(INBOUND_MIGRATIONS)
