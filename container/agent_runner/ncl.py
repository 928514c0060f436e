"""`python3 -m agent_runner.ncl groups list`: the `ncl` tool from a shell (Bash).

The same request as the tool (`tools/ncl.py`): a system row for the host, then a wait
of up to 30 s for its answer. Prints the output; exit 0 when done, 3 while an admin's
approval is pending (the outcome comes later as a note), 1 when refused or no answer.
"""

from __future__ import annotations

import sys

from agent_runner.config import load
from agent_runner.db import Inbound, Outbound
from agent_runner.tools.base import ToolContext, ToolError
from agent_runner.tools.ncl import request


def main(argv: list[str]) -> int:
    config = load()
    inbound = Inbound(config.inbound)
    ctx = ToolContext(config, inbound, Outbound(config.outbound, inbound, config.session_dir))
    try:
        status, output = request(ctx, argv)
    except ToolError as e:
        print(f"ncl: {e}", file=sys.stderr)
        return 1
    print(output, file=sys.stderr if status == "error" else sys.stdout)
    return {"ok": 0, "approval-pending": 3}.get(status, 1)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
