"""The broker reuses its upstream connections (issue 17): a conversation's model calls,
from several agents, reach the model over kept-alive connections, not one connection
per call (each new one costs a connect, and with TLS a handshake)."""

from __future__ import annotations


def test_model_calls_share_the_brokers_upstream_connection(host_factory, fake_model):
    h = host_factory("reuse").start()
    clients = [h.client(f"c{i}") for i in range(2)]
    for n in range(3):
        for i, c in enumerate(clients):
            assert c.wait_reply(c.send(f"m{n} {i}"), 60)["text"] == f"echo: m{n} {i}"
    calls = [r for r in fake_model.requests if r["path"] == "/v1/messages"]
    assert len(calls) == 6
    # one after another, so one pooled connection serves them all (two agents, six calls)
    assert len({r["peer_port"] for r in calls}) == 1, [r["peer_port"] for r in calls]
    assert h.stop() == 0
