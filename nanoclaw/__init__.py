"""NanoClaw: a personal Claude assistant host.

Chat channels in, one sandboxed agent per conversation, every hand-off a row in SQLite.

The layout is the architecture. **A folder imports only the folders listed above it**
(`tests/test_import_graph.py` fails when an import breaks this):

    config log logfiles util errors nudge breaker jsonin hostile upstreams   core
    db/         one storage class per DB file: Store (central, mixins by table group),
                SessionInbound and SessionOutbound; the migrations and their ledgers
    runtime/    the sandboxes: docker, bwrap, process, the warm pool
    channels/   one platform connection per channel:<name> worker
    agents/     what an agent group owns: its folder, schedules, mounts
    approvals/  every card: who is asked, what a click does, chat registration
    routing/    the router worker's logic: inbound events to sessions, the gates
    delivery/   the delivery worker's logic: the agent's output, its actions
    lifecycle/  the containers and sweep workers' logic
    broker/     the credential broker's and the egress door's logic
    host/       the parent process: orchestrator, supervisor, the worker loop
    cli/        the `nanoclaw` command and the agent's `ncl`
    devtools/   the fake model and harnesses tests and benches use

`workers/`, the only other top-level package, holds one thin file per process and may
import any of these.
"""

__version__ = "0.1.0"

LAYERS = ("", "db", "runtime", "channels", "agents", "approvals", "routing", "delivery",
          "lifecycle", "broker", "host", "cli", "devtools")
