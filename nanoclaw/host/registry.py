"""Which processes the host runs, by name, and what each one runs.

A worker's class is named by a dotted path and imported in the child after the fork
(as gunicorn names its worker classes): the host supervises `workers/` without
importing it, since `workers/` imports the host's loop.
"""

from __future__ import annotations

import importlib

from nanoclaw import breaker
from nanoclaw.channels import load_builtin, webhook_names
from nanoclaw.config import Settings
from nanoclaw.host.runner import Worker

WORKERS = {
    "router": "workers.router:RouterWorker",
    "delivery": "workers.delivery:DeliveryWorker",
    "sweep": "workers.sweep:SweepWorker",
    "containers": "workers.containers:ContainersWorker",
    "broker": "workers.broker:BrokerWorker",
    "egress": "workers.egress:EgressWorker",  # unless NANOCLAW_EGRESS_ENABLED=false
}
CHANNEL = "workers.channel:ChannelWorker"  # every `channel:<name>`
WEBHOOKS = "workers.webhooks:WebhooksWorker"  # the door, while a webhook channel is on
# How fast each one is restarted after a crash, `LOCAL` or `PLATFORM`: every name above,
# `webhooks`, `channel:cli` and `channel:web` are local; every other channel talks to a
# platform and keeps the seed's slow schedule. Declared in `nanoclaw.breaker`
# (`LOCAL_WORKERS`) so a lower layer may ask too (import it from there, not from here).
restart_kind = breaker.restart_kind


def channel_names(settings: Settings) -> list[str]:
    """The channels these settings enable (their client libraries stay unimported)."""
    reg = load_builtin()
    return [n for n in reg.names() if reg.get(n).enabled(settings)]


def worker_names(settings: Settings) -> list[str]:
    door = ["webhooks"] if webhook_names(settings) else []
    core = [w for w in WORKERS if w != "egress" or settings.egress_enabled]
    return [*core, *door, *[f"channel:{c}" for c in channel_names(settings)]]


def make_worker(name: str, settings: Settings) -> Worker:
    target = CHANNEL if name.startswith("channel:") else (
        WEBHOOKS if name == "webhooks" else WORKERS.get(name))
    if target is None:
        raise ValueError(f"unknown worker {name!r}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(settings, name)
