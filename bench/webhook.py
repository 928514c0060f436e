"""Bench: a WhatsApp Cloud webhook in → the reply POSTed to the Graph API.

A real host (process runtime) against the zero-delay fake model, its `whatsapp-cloud`
channel pointed at the test suite's fake Graph API (tests/fakes/fake_graph.py); one
wired chat; `-n` messages one after another, each timed from the start of the signed
POST to the door until the fake Graph API has the reply. Prints p50/p95/max in ms
(target: p50 ≤ 40 ms). Run: `.venv/bin/python -m bench.webhook [-n 50]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Host, wait_for  # noqa: E402
from fakes.fake_graph import FakeGraph  # noqa: E402
from fakes.hosts import wire_chat  # noqa: E402

from nanoclaw.devtools.fake_model import FakeModel  # noqa: E402

USER = "15557770001"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=50, help="messages timed (default 50)")
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    graph = FakeGraph().start()
    model = FakeModel(port=0, delay_ms=0)
    model.start()
    with tempfile.TemporaryDirectory(prefix="nc-bench-wh-") as tmp:
        host = Host(Path(tmp), model.url, {**graph.host_env(), "NANOCLAW_WEB_ENABLED": "false"})
        try:
            host.start()
            meta = graph.attach(host)
            wait_for(lambda: graph.connected(host), 30, what="door and channel up")
            wire_chat(host, "whatsapp-cloud", f"whatsapp-cloud:{USER}")
            times = []
            for i in range(args.warmup + args.n):
                text = f"bench {i}"
                ev = graph.text(USER, text)
                t0 = time.time()
                meta.deliver([ev])
                want = f"echo: {text}"
                call = wait_for(lambda: next((c for c in reversed(graph.calls_of("messages"))
                                              if want in json.dumps(c.params)), None),
                                30, interval=0.0005, what=want)
                if i >= args.warmup:
                    times.append((call.at - t0) * 1000)
        finally:
            host.cleanup()
            model.stop()
            graph.stop()
    times.sort()
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
    print(f"webhook in → reply POSTed, {len(times)} messages: p50 {statistics.median(times):.1f}"
          f" ms, p95 {p95:.1f} ms, max {times[-1]:.1f} ms (target p50 ≤ 40 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
