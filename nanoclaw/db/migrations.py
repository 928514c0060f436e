"""Migrations of the central DB, in order, by name (see nanoclaw.db.central.migrate).

A migration is never edited after it ships; changes are new migrations appended here.
A name appears once (`check_ledger`, run on import and by `migrate`): a repeated name
would be skipped silently as "already applied".
"""

from nanoclaw.db.migrations_egress import MIGRATIONS as EGRESS_MIGRATIONS


def check_ledger(migrations: list[tuple[str, str]]) -> None:
    """Refuse a migration list with a repeated name (review §2, habit 9)."""
    seen: set[str] = set()
    for name, _ in migrations:
        if name in seen:
            raise ValueError(f"migration {name!r} is listed twice")
        seen.add(name)

ENTITIES = """
CREATE TABLE agent_groups (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  folder TEXT NOT NULL UNIQUE,
  agent_provider TEXT,
  created_at TEXT NOT NULL
);
CREATE TABLE messaging_groups (
  id TEXT PRIMARY KEY,
  channel_type TEXT NOT NULL,
  platform_id TEXT NOT NULL,
  name TEXT,
  is_group INTEGER NOT NULL DEFAULT 0,
  unknown_sender_policy TEXT NOT NULL DEFAULT 'strict'
    CHECK (unknown_sender_policy IN ('strict', 'request_approval', 'public')),
  created_at TEXT NOT NULL,
  denied_at TEXT,
  UNIQUE (channel_type, platform_id)
);
CREATE TABLE messaging_group_agents (
  id TEXT PRIMARY KEY,
  messaging_group_id TEXT NOT NULL REFERENCES messaging_groups(id) ON DELETE CASCADE,
  agent_group_id TEXT NOT NULL REFERENCES agent_groups(id) ON DELETE CASCADE,
  engage_mode TEXT NOT NULL DEFAULT 'pattern'
    CHECK (engage_mode IN ('pattern', 'mention', 'mention-sticky')),
  engage_pattern TEXT,
  sender_scope TEXT NOT NULL DEFAULT 'all' CHECK (sender_scope IN ('all', 'known')),
  ignored_message_policy TEXT NOT NULL DEFAULT 'drop'
    CHECK (ignored_message_policy IN ('drop', 'accumulate')),
  session_mode TEXT NOT NULL DEFAULT 'shared'
    CHECK (session_mode IN ('shared', 'per-thread', 'agent-shared')),
  priority INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  UNIQUE (messaging_group_id, agent_group_id)
);
CREATE TABLE users (
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  display_name TEXT,
  created_at TEXT NOT NULL
);
CREATE TABLE user_roles (
  user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  role TEXT NOT NULL CHECK (role IN ('owner', 'admin')),
  agent_group_id TEXT REFERENCES agent_groups(id) ON DELETE CASCADE,
  granted_by TEXT,
  granted_at TEXT NOT NULL,
  CHECK (role != 'owner' OR agent_group_id IS NULL)
);
CREATE UNIQUE INDEX user_roles_unique ON user_roles(user_id, role, IFNULL(agent_group_id, ''));
CREATE TABLE agent_group_members (
  user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  agent_group_id TEXT NOT NULL REFERENCES agent_groups(id) ON DELETE CASCADE,
  added_by TEXT,
  added_at TEXT NOT NULL,
  PRIMARY KEY (user_id, agent_group_id)
);
CREATE TABLE user_dms (
  user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  channel_type TEXT NOT NULL,
  messaging_group_id TEXT NOT NULL REFERENCES messaging_groups(id) ON DELETE CASCADE,
  resolved_at TEXT NOT NULL,
  PRIMARY KEY (user_id, channel_type)
);
CREATE TABLE sessions (
  id TEXT PRIMARY KEY,
  agent_group_id TEXT NOT NULL REFERENCES agent_groups(id) ON DELETE CASCADE,
  messaging_group_id TEXT REFERENCES messaging_groups(id) ON DELETE SET NULL,
  thread_id TEXT,
  agent_provider TEXT,
  status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'closed')),
  container_status TEXT NOT NULL DEFAULT 'stopped'
    CHECK (container_status IN ('running', 'idle', 'stopped')),
  container_id TEXT,
  token_hash TEXT,
  spawned_at TEXT,
  last_active TEXT,
  created_at TEXT NOT NULL
);
CREATE INDEX sessions_lookup ON sessions(agent_group_id, messaging_group_id, thread_id);
CREATE UNIQUE INDEX sessions_token ON sessions(token_hash) WHERE token_hash IS NOT NULL;
CREATE TABLE pending_questions (
  question_id TEXT PRIMARY KEY,
  session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
  message_out_id TEXT,
  platform_id TEXT,
  channel_type TEXT,
  thread_id TEXT,
  title TEXT,
  options_json TEXT,
  created_at TEXT NOT NULL
);
CREATE TABLE agent_destinations (
  agent_group_id TEXT NOT NULL REFERENCES agent_groups(id) ON DELETE CASCADE,
  local_name TEXT NOT NULL,
  target_type TEXT NOT NULL CHECK (target_type IN ('channel', 'agent')),
  target_id TEXT NOT NULL,
  created_at TEXT NOT NULL,
  PRIMARY KEY (agent_group_id, local_name)
);
CREATE TABLE pending_approvals (
  approval_id TEXT PRIMARY KEY,
  session_id TEXT,
  request_id TEXT,
  action TEXT NOT NULL,
  payload TEXT,
  created_at TEXT NOT NULL,
  agent_group_id TEXT,
  channel_type TEXT,
  platform_id TEXT,
  platform_message_id TEXT,
  expires_at TEXT,
  status TEXT NOT NULL DEFAULT 'pending'
    CHECK (status IN ('pending', 'approved', 'rejected', 'expired')),
  title TEXT,
  options_json TEXT
);
CREATE TABLE pending_sender_approvals (
  id TEXT PRIMARY KEY,
  messaging_group_id TEXT NOT NULL REFERENCES messaging_groups(id) ON DELETE CASCADE,
  agent_group_id TEXT NOT NULL REFERENCES agent_groups(id) ON DELETE CASCADE,
  sender_identity TEXT NOT NULL,
  sender_name TEXT,
  original_message TEXT NOT NULL,
  approver_user_id TEXT,
  created_at TEXT NOT NULL,
  title TEXT,
  options_json TEXT,
  UNIQUE (messaging_group_id, sender_identity)
);
CREATE TABLE pending_channel_approvals (
  messaging_group_id TEXT PRIMARY KEY REFERENCES messaging_groups(id) ON DELETE CASCADE,
  agent_group_id TEXT,
  original_message TEXT NOT NULL,
  approver_user_id TEXT,
  created_at TEXT NOT NULL,
  title TEXT,
  options_json TEXT
);
CREATE TABLE unregistered_senders (
  channel_type TEXT NOT NULL,
  platform_id TEXT NOT NULL,
  user_id TEXT,
  sender_name TEXT,
  reason TEXT NOT NULL,
  messaging_group_id TEXT,
  agent_group_id TEXT,
  message_count INTEGER NOT NULL DEFAULT 1,
  first_seen TEXT NOT NULL,
  last_seen TEXT NOT NULL,
  PRIMARY KEY (channel_type, platform_id)
);
CREATE TABLE container_configs (
  agent_group_id TEXT PRIMARY KEY REFERENCES agent_groups(id) ON DELETE CASCADE,
  provider TEXT,
  model TEXT,
  effort TEXT,
  image_tag TEXT,
  assistant_name TEXT,
  max_messages_per_prompt INTEGER NOT NULL DEFAULT 10,
  skills TEXT NOT NULL DEFAULT '"all"',
  mcp_servers TEXT NOT NULL DEFAULT '{}',
  packages_apt TEXT NOT NULL DEFAULT '[]',
  packages_npm TEXT NOT NULL DEFAULT '[]',
  additional_mounts TEXT NOT NULL DEFAULT '[]',
  cli_scope TEXT NOT NULL DEFAULT 'group' CHECK (cli_scope IN ('disabled', 'group', 'global')),
  updated_at TEXT NOT NULL
);
"""

QUEUES = """
CREATE TABLE inbound_events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  channel_type TEXT NOT NULL,
  platform_id TEXT NOT NULL,
  thread_id TEXT,
  message_id TEXT NOT NULL,
  kind TEXT NOT NULL DEFAULT 'chat',
  payload TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'routed', 'failed')),
  attempts INTEGER NOT NULL DEFAULT 0,
  error TEXT,
  received_at TEXT NOT NULL,
  routed_at TEXT,
  UNIQUE (channel_type, platform_id, message_id)
);
CREATE INDEX inbound_events_pending ON inbound_events(status, id);
CREATE TABLE channel_outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  idem_key TEXT NOT NULL UNIQUE,
  session_id TEXT,
  message_out_id TEXT,
  channel_type TEXT NOT NULL,
  platform_id TEXT NOT NULL,
  thread_id TEXT,
  in_reply_to TEXT,
  kind TEXT NOT NULL,
  content TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at TEXT,
  platform_message_id TEXT,
  error TEXT,
  recorded INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  sent_at TEXT
);
CREATE INDEX channel_outbox_pending ON channel_outbox(channel_type, status, id);
CREATE INDEX channel_outbox_unrecorded ON channel_outbox(recorded, status);
CREATE TABLE workers (
  name TEXT PRIMARY KEY,
  state TEXT NOT NULL,
  pid INTEGER,
  restarts INTEGER NOT NULL DEFAULT 0,
  attempt INTEGER NOT NULL DEFAULT 0,
  started_at TEXT,
  next_start_at TEXT,
  last_exit TEXT,
  updated_at TEXT NOT NULL
);
CREATE TABLE worker_requests (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  worker TEXT NOT NULL,
  action TEXT NOT NULL CHECK (action IN ('restart', 'stop', 'start')),
  created_at TEXT NOT NULL,
  handled_at TEXT
);
CREATE TABLE container_requests (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id TEXT NOT NULL,
  action TEXT NOT NULL CHECK (action IN ('wake', 'kill')),
  reason TEXT,
  created_at TEXT NOT NULL,
  handled_at TEXT
);
CREATE INDEX container_requests_open ON container_requests(handled_at, id);
CREATE TABLE host_state (
  key TEXT PRIMARY KEY,
  value TEXT,
  updated_at TEXT NOT NULL
);
"""

TOKEN_USAGE = """
CREATE TABLE token_usage (
  agent_group_id TEXT NOT NULL,
  day TEXT NOT NULL,
  requests INTEGER NOT NULL DEFAULT 0,
  input_tokens INTEGER NOT NULL DEFAULT 0,
  output_tokens INTEGER NOT NULL DEFAULT 0,
  cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
  cache_read_input_tokens INTEGER NOT NULL DEFAULT 0,
  updated_at TEXT NOT NULL,
  PRIMARY KEY (agent_group_id, day)
);
ALTER TABLE container_configs ADD COLUMN daily_token_budget INTEGER;
"""

# H3: a question card is named by the host (`card_id`), never by the agent: the agent's
# own `questionId` is kept beside it and only ever handed back with the answer. Cards
# sent before this keep their old id as their card id (it is what their buttons carry).
QUESTION_CARDS = """
CREATE TABLE pending_questions_by_card (
  card_id TEXT PRIMARY KEY,
  question_id TEXT NOT NULL,
  session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
  message_out_id TEXT,
  platform_id TEXT,
  channel_type TEXT,
  thread_id TEXT,
  title TEXT,
  options_json TEXT,
  created_at TEXT NOT NULL,
  UNIQUE (session_id, message_out_id)
);
INSERT OR IGNORE INTO pending_questions_by_card (card_id, question_id, session_id,
  message_out_id, platform_id, channel_type, thread_id, title, options_json, created_at)
  SELECT question_id, question_id, session_id, message_out_id, platform_id, channel_type,
         thread_id, title, options_json, created_at FROM pending_questions;
DROP TABLE pending_questions;
ALTER TABLE pending_questions_by_card RENAME TO pending_questions;
CREATE INDEX pending_questions_asked ON pending_questions(channel_type, platform_id, question_id);
"""

MIGRATIONS: list[tuple[str, str]] = [
    ("initial-entities", ENTITIES),
    ("inter-worker-queues", QUEUES),
    ("approvals-approver", "ALTER TABLE pending_approvals ADD COLUMN approver_user_id TEXT;"),
    ("token-usage", TOKEN_USAGE),
    ("channel-approval-naming",  # "Connect new agent": who names it, since when
     "ALTER TABLE pending_channel_approvals ADD COLUMN naming_by TEXT;\n"
     "ALTER TABLE pending_channel_approvals ADD COLUMN naming_at TEXT;\n"),
    ("fallback-model",  # answered by another model when the chosen one stays overloaded
     "ALTER TABLE container_configs ADD COLUMN fallback_model TEXT;\n"),
    ("approvals-decided-by",  # who clicked: approved agent commands run as them
     "ALTER TABLE pending_approvals ADD COLUMN decided_by TEXT;\n"
     "ALTER TABLE pending_approvals ADD COLUMN decided_at TEXT;\n"),
    ("question-card-ids", QUESTION_CARDS),
    ("send-parts",  # a split send's parts already sent; when its first attempt began
     "ALTER TABLE channel_outbox ADD COLUMN parts TEXT;\n"
     "ALTER TABLE channel_outbox ADD COLUMN attempt_at TEXT;\n"),
    ("model-upstreams",  # which upstream the broker forwards a group's calls to (and its
     # fallback's); NULL: the default of the group's provider (nanoclaw/upstreams.py)
     "ALTER TABLE container_configs ADD COLUMN upstream TEXT;\n"
     "ALTER TABLE container_configs ADD COLUMN fallback_upstream TEXT;\n"),
    *EGRESS_MIGRATIONS,  # agent_groups.web, egress_log (migrations_egress.py)
]
check_ledger(MIGRATIONS)
