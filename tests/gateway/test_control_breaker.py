"""Per-neuron circuit breaker and safe retries, through the real gateway app over fake neurons."""

from __future__ import annotations

import socket

from support.fake_neuron import FakeClock, FakeNeuron, gateway
from support.fake_upstream import FakeUpstream

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile

CATALOGUE = ModelCatalogue([ModelProfile(id="org/m", vram_mb=4_000)], {})
CHAT = {"model": "org/m", "messages": [{"role": "user", "content": "hi"}]}


def refused_url() -> str:
    """A loopback port with nobody listening (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


async def test_the_breaker_opens_after_repeated_connect_failures_and_a_probe_closes_it() -> None:
    clock = FakeClock()
    a = FakeNeuron("a", devices_mb=[24_000], endpoint="http://127.0.0.1:1")
    b = FakeNeuron("b", devices_mb=[24_000], endpoint="http://127.0.0.1:2")
    a.inference_url = refused_url()  # its management API answers, its inference port is dead
    for neuron in (a, b):
        neuron.preload("org/m", 4_000)
    async with FakeUpstream() as upstream:
        b.inference_url = upstream.base_url
        async with gateway(
            [a, b], CATALOGUE, clock=clock, proxy={"breaker_failures": 3, "breaker_cooldown_secs": 10.0}
        ) as (app, http):
            fleet = app.state.fleet
            # Ties go to `a` by name: each request fails to connect there and is served by b.
            for _ in range(3):
                response = await http.post("/v1/chat/completions", json=CHAT)
                assert response.status_code == 200
            assert fleet.breaker_open("a")
            assert fleet.snapshot().node("a").healthy is False

            # Open: requests are not sent to `a` at all.
            lease = await app.state.router.acquire("org/m")
            assert [u.node for u in lease.candidates] == ["b"]
            lease.release()

            # A poll within the cool-down does not close it; the first one after does.
            await app.state.poller.poll_once()
            assert fleet.breaker_open("a")
            clock.advance(10.0)
            await app.state.poller.poll_once()
            assert not fleet.breaker_open("a")
            lease = await app.state.router.acquire("org/m")
            assert sorted(u.node for u in lease.candidates) == ["a", "b"]
            lease.release()
    assert len(upstream.calls) == 3
    failures = app.state.metrics.registry.get_sample_value(
        "cortex_upstream_failures_total", {"model": "org/m", "node": "a"}
    )
    assert failures == 3.0
