"""The admin operations of `nanoclaw` and `ncl`, all of them: importing this module
registers every one in `cli.ops` (each topic module declares its own with `@op`), in the
order `nanoclaw --help` lists them. Adding an operation is writing it in its topic module;
a new topic is one more import here.

They write the central DB through `Store` (safe while the host runs: WAL, one
transaction each) and re-project destinations into live sessions. An unknown id is one
clear line and exit 2; nothing is written half."""

from __future__ import annotations

from nanoclaw.cli import ops
# one import per topic, in this order (they register as they load): not sorted on purpose
from nanoclaw.cli import ops_groups  # groups, skills
from nanoclaw.cli import ops_wiring  # wire, destinations, init-first-agent
from nanoclaw.cli import ops_users  # users, roles, members
from nanoclaw.cli import ops_approvals  # approvals, tasks
from nanoclaw.cli import ops_limits  # mounts, usage

TOPICS = (ops_groups, ops_wiring, ops_users, ops_approvals, ops_limits)
OPS, VERBS = ops.OPS, ops.VERBS
add_parsers = ops.add_parsers
