"""One thin module per worker process; `make_worker` builds one by name."""

from __future__ import annotations

from nanoclaw.config import Settings
from nanoclaw.worker import Worker

CORE = ("router", "delivery", "sweep", "containers", "broker")


def channel_names(settings: Settings) -> list[str]:
    from nanoclaw.channels import load_builtin

    reg = load_builtin()
    return [n for n in reg.names() if reg.get(n).enabled(settings)]


def make_worker(name: str, settings: Settings) -> Worker:
    if name.startswith("channel:"):
        from workers.channel import ChannelWorker

        return ChannelWorker(settings, name)
    if name == "router":
        from workers.router import RouterWorker as W
    elif name == "delivery":
        from workers.delivery import DeliveryWorker as W
    elif name == "sweep":
        from workers.sweep import SweepWorker as W
    elif name == "containers":
        from workers.containers import ContainersWorker as W
    elif name == "broker":
        from workers.broker import BrokerWorker as W
    else:
        raise ValueError(f"unknown worker {name!r}")
    return W(settings, name)
