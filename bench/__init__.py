"""`make bench`: drives a real host (`nanoclaw run`, process runtime) against the fake
model over the terminal channel and reports latency, throughput, idle CPU and memory.

Why a package: `run` (options, then every phase in `phases.PHASES`), `rig` (the fake and
the host), `chat` (the terminal-channel client), `procfs` (CPU and memory from /proc),
`sandboxes` (cold turns per sandbox runtime), `breakdown` (a warm turn stage by stage),
`report` (figures, targets, the tables, the comparison with the previous run).
See `python -m bench.run --help`. This file puts the repository on sys.path (so
`nanoclaw` imports without an install) and holds the one error type they share."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class BenchError(RuntimeError):
    """Something the bench measures did not behave (no reply, host exited, ...)."""
