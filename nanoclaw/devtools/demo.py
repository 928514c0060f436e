"""`make demo`: the whole system offline in one command, before you have a key.

The fake model (`fake_model.py`, canned answers: it echoes what you write) starts
beside the host, the host is started pointing at it with a dummy key, a banner says the
answers are canned, and the web chat's address is printed once it is up. Everything
else is the real host on the real data/: `nanoclaw send hello --wait 30` and `nanoclaw
chat` answer from another terminal. Ctrl-C (or SIGTERM) stops the host, then the fake.

Run: `make demo`, or `python -m nanoclaw.devtools.demo [--port P]`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from nanoclaw import config
from nanoclaw.devtools.fake_model import FakeModel

DUMMY_KEY = "sk-demo-not-a-real-key"


def banner(model_url: str, openai_url: str | None) -> str:
    lines = ["DEMO MODE: every answer is CANNED by a fake model on this machine",
             f"({model_url}{', ' + openai_url if openai_url else ''}); no real model is"
             " called and no key is used.",
             "It echoes what you write, so you can see every part work:",
             "  .venv/bin/nanoclaw send hello --wait 30     (or: .venv/bin/nanoclaw chat)",
             "For real answers: put ANTHROPIC_API_KEY=... in .env (or run"
             " `nanoclaw setup`), then make run."]
    width = max(map(len, lines)) + 4
    bar = "=" * width
    return "\n".join([bar, *(f"| {line.ljust(width - 4)} |" for line in lines), bar])


def web_address(settings: config.Settings) -> str | None:
    """The web chat's address with its token, once the web channel has published it."""
    from nanoclaw.db.store import Store

    if not settings.db_path.exists():
        return None
    try:
        store = Store.open(settings.data_dir, create=False)
        try:
            url = store.get_state("web_url")
        finally:
            store.close()
        token = (settings.data_dir / "web-token").read_text().strip()
    except Exception:  # noqa: BLE001 - not there yet (the host is still starting)
        return None
    return f"{url}#token={token}" if url and token else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the host against a fake model, offline")
    p.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT") or 0),
                   help="the fake model's port (default: a free one)")
    args = p.parse_args(argv)
    settings = config.load()
    fake = FakeModel(port=args.port).start()
    env = {**os.environ, "ANTHROPIC_BASE_URL": fake.url, "ANTHROPIC_API_KEY": DUMMY_KEY}
    env.pop("CLAUDE_CODE_OAUTH_TOKEN", None)
    fakes = [fake]
    openai_url = None
    if settings.provider == "openai":  # the default provider speaks the other API
        from nanoclaw.devtools.fake_openai import FakeOpenAI

        oa = FakeOpenAI(port=0).start()
        fakes.append(oa)
        openai_url = oa.url
        env.update(OPENAI_BASE_URL=oa.url, OPENAI_API_KEY=DUMMY_KEY)
    print(banner(fake.url, openai_url), flush=True)
    host = subprocess.Popen([sys.executable, "-m", "nanoclaw", "run"], env=env)
    stop = {"n": 0}

    def on_signal(sig: int, _frame: object) -> None:
        stop["n"] += 1
        if sig == signal.SIGTERM or stop["n"] > 1:  # Ctrl-C reaches the host by itself
            try:
                host.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    shown = False
    while host.poll() is None:
        if not shown and not stop["n"]:
            addr = web_address(settings)
            if addr:
                shown = True
                print(f"\nDEMO: web chat at {addr}\n"
                      "DEMO: answers are canned (fake model); Ctrl-C stops the demo\n",
                      flush=True)
        time.sleep(0.2)
    for f in fakes:
        f.stop()
    return host.returncode or 0


if __name__ == "__main__":
    raise SystemExit(main())
