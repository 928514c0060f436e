"""The central DB's migration for the egress door (`nanoclaw/broker/egress.py`).

`agent_groups.web`: the group's web policy (`off`, `on`, `allow:a.com,b.org`,
`deny:x.com`). A group created from now on gets `on` (the column's default); every group
that already exists when this runs gets `off`, so an upgrade opens no agent to the web
that was not before. `egress_log`: what the door let through or refused, per agent
group, day and destination (`nanoclaw usage --web`).
"""

EGRESS = """
ALTER TABLE agent_groups ADD COLUMN web TEXT NOT NULL DEFAULT 'on';
UPDATE agent_groups SET web='off';
CREATE TABLE egress_log (
  agent_group_id TEXT NOT NULL,
  day TEXT NOT NULL,
  host TEXT NOT NULL,
  port INTEGER NOT NULL,
  allowed INTEGER NOT NULL,
  reason TEXT NOT NULL DEFAULT '',
  connections INTEGER NOT NULL DEFAULT 0,
  bytes INTEGER NOT NULL DEFAULT 0,
  first_at TEXT NOT NULL,
  last_at TEXT NOT NULL,
  PRIMARY KEY (agent_group_id, day, host, port, allowed, reason)
);
"""

MIGRATIONS = [("egress-web", EGRESS)]
