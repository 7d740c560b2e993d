"""Poller and neuron client against fake neurons (in process; one test on loopback)."""

from __future__ import annotations

import asyncio

import pytest
from support.fake_neuron import AsgiNeuronTransport, FakeClock, FakeNeuron, gateway
from support.fake_upstream import on_hypercorn

from cortex_core.config.catalogue import ModelCatalogue
from cortex_core.neuron_api import ModelInfo, ModelSpec
from cortex_gateway.fleet import FleetState
from cortex_gateway.neuron_client import (
    AiohttpTransport,
    NeuronClient,
    NeuronError,
    decode_models,
    error_text,
    rewrite_loopback,
)
from cortex_gateway.poller import Poller

EMPTY = ModelCatalogue([], {})


def make_poller(neurons: list[FakeNeuron], unhealthy_after: int = 3) -> tuple[FleetState, Poller]:
    from support.fake_neuron import gateway_config

    config = gateway_config(neurons)
    fleet = FleetState(config.neurons, unhealthy_after=unhealthy_after, clock=FakeClock())
    client = NeuronClient(AsgiNeuronTransport(neurons), poll_timeout=2.0)
    return fleet, Poller(fleet, client, interval_secs=1.0)


async def test_unhealthy_after_n_consecutive_failures_and_healthy_again_on_answer() -> None:
    a, b = FakeNeuron("a", devices_mb=[24_000]), FakeNeuron("b", devices_mb=[24_000])
    a.preload("org/m", 4_000)
    fleet, poller = make_poller([a, b], unhealthy_after=3)
    assert [n.healthy for n in fleet.snapshot().nodes] == [False, False]  # unknown until polled

    await poller.poll_once()
    assert [n.healthy for n in fleet.snapshot().nodes] == [True, True]

    a.down = True
    for expected_failures in (1, 2):
        await poller.poll_once()
        node = fleet.snapshot().node("a")
        assert node is not None
        assert (node.healthy, node.consecutive_failures) == (True, expected_failures)  # debounced
    await poller.poll_once()
    node = fleet.snapshot().node("a")
    assert node is not None and not node.healthy
    assert node.last_error is not None and "cannot connect" in node.last_error
    assert "org/m" in node.models  # the model map survives an outage
    assert fleet.snapshot().node("b").healthy  # type: ignore[union-attr]  # one dead node does not stall others

    a.down = False
    await poller.poll_once()
    node = fleet.snapshot().node("a")
    assert node is not None and node.healthy and node.consecutive_failures == 0


async def test_poll_records_topology_models_and_load() -> None:
    a = FakeNeuron("a", devices_mb=[24_000, 16_000])
    a.preload("org/m", 4_000, device=1)
    a.models["org/m"].in_flight = 2
    fleet, poller = make_poller([a])
    await poller.poll_once()
    node = fleet.snapshot().node("a")
    assert node is not None and node.discovery is not None
    assert [d.vram_total_mb for d in node.discovery.devices] == [24_000, 16_000]
    assert node.free_by_device() == {0: 24_000, 1: 12_000}
    view = node.models["org/m"]
    assert (view.status, view.devices, view.memory_mb, view.neuron_in_flight) == ("loaded", (1,), 4_000, 2)

    # Gone from /models → gone from the fleet (stale entries are pruned).
    del a.models["org/m"]
    await poller.poll_once()
    assert fleet.snapshot().node("a").models == {}  # type: ignore[union-attr]


async def test_restarted_neuron_is_asked_for_its_topology_again() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    fleet, poller = make_poller([a])
    a.uptime = 500.0
    await poller.poll_once()
    a.devices_mb = [24_000, 24_000]  # e.g. a GPU added during the restart
    a.uptime = 3.0
    await poller.poll_once()  # notices the restart
    await poller.poll_once()  # fetches discovery again
    discovery = fleet.snapshot().node("a").discovery  # type: ignore[union-attr]
    assert discovery is not None and len(discovery.devices) == 2


async def test_cpu_only_neuron_reports_host_memory() -> None:
    laptop = FakeNeuron("laptop", devices_mb=[], host_memory_mb=16_000)
    laptop.preload("org/m", 3_000)
    fleet, poller = make_poller([laptop])
    await poller.poll_once()
    node = fleet.snapshot().node("laptop")
    assert node is not None and node.cpu_only
    assert node.free_by_device() == {-1: 13_000}


@pytest.mark.parametrize(
    ("url", "endpoint", "expected"),
    [
        ("http://localhost:13131", "http://gpu1.lan:13131", "http://gpu1.lan:13131"),
        ("http://127.0.0.1:9000/", "http://gpu1.lan:13131", "http://gpu1.lan:9000"),
        ("http://0.0.0.0:13131/base/", "https://10.0.0.5:13131", "http://10.0.0.5:13131/base"),
        ("http://[::1]:13131", "http://gpu1:13131", "http://gpu1:13131"),
        ("http://gpu2.lan:13131", "http://gpu1.lan:13131", "http://gpu2.lan:13131"),
        ("http://localhost:13131", "http://[fd00::5]:13131", "http://[fd00::5]:13131"),
    ],
)
def test_loopback_rewrite(url: str, endpoint: str, expected: str) -> None:
    assert rewrite_loopback(url, endpoint) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": "model \'x\' not loaded"}', "model 'x' not loaded"),
        (b'{"error": {"message": "no room", "type": "api_error"}}', "no room"),
        (
            b'{"error": {"kind": "quant_not_found", "requested": "q9"}}',
            '{"kind":"quant_not_found","requested":"q9"}',
        ),
        (b"Internal Server Error", "Internal Server Error"),
        (b"", "(empty body)"),
    ],
)
def test_error_text_reads_every_neuron_error_shape(body: bytes, expected: str) -> None:
    assert error_text(body) == expected


def test_unknown_model_status_is_kept_but_not_routable() -> None:
    body = b'[{"id": "a/b", "harness": "torch", "status": "loaded"}, {"id": "c/d", "harness": "torch", "status": "recovering"}]'
    models = decode_models(body)
    assert [(m.id, m.status) for m in models] == [("a/b", "loaded"), ("c/d", "failed")]
    assert models[1].error is not None and "cannot route" in models[1].error


async def test_client_reports_the_neurons_reason_for_a_failed_load() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    a.fail_loads["org/m"] = (422, "architecture 'mamba' is not supported (supported: llama, qwen3)")
    client = NeuronClient(AsgiNeuronTransport([a]))
    with pytest.raises(NeuronError) as raised:
        await client.load(a.base_url, ModelSpec(model_id="org/m"))
    assert raised.value.status == 422
    assert "mamba" in raised.value.message
    a.down = True
    with pytest.raises(NeuronError) as unreachable:
        await client.models(a.base_url)
    assert unreachable.value.status is None


async def test_aiohttp_transport_against_a_fake_neuron_on_loopback() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], inference_url="http://localhost:13131")
    a.preload("org/m", 1_000)
    client = NeuronClient(AiohttpTransport(), poll_timeout=5.0)
    try:
        async with on_hypercorn(a.app) as base_url:  # type: ignore[arg-type]
            discovery = await client.discovery(base_url)
            assert discovery.hostname == "a"
            models = await client.models(base_url)
            assert [m.id for m in models] == ["org/m"]
            # The id's '/' travels percent-encoded; the loopback answer points at the neuron's host.
            assert await client.inference_url(base_url, "org/m") == "http://127.0.0.1:13131"
            with pytest.raises(NeuronError) as missing:
                await client.inference_url(base_url, "org/other")
            assert missing.value.status == 404
            await client.unload(base_url, "org/m")
            assert a.unload_calls == ["org/m"]
        with pytest.raises(NeuronError) as refused:
            await client.health(base_url)
        assert refused.value.status is None
    finally:
        await client.close()


async def test_health_readyz_livez_follow_the_fleet() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    async with gateway([a], EMPTY, poll=False, poller={"unhealthy_after": 1}) as (app, http):
        assert (await http.get("/livez")).status_code == 200
        not_ready = await http.get("/readyz")
        assert not_ready.status_code == 503
        assert "retry-after" in not_ready.headers
        assert (await http.get("/health")).json()["status"] == "degraded"

        await app.state.poller.poll_once()
        assert (await http.get("/readyz")).status_code == 200
        health = (await http.get("/health")).json()
        assert health["status"] == "ok"
        assert health["nodes"] == {"healthy": 1, "total": 1}

        a.down = True
        await app.state.poller.poll_once()
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/health")).json()["unhealthy_nodes"] == ["a"]


async def test_no_neurons_configured_is_not_ready() -> None:
    async with gateway([], EMPTY) as (_, http):
        response = await http.get("/readyz")
        assert response.status_code == 503
        assert "no neurons are configured" in response.json()["error"]["message"]


class _BrokenModels(NeuronClient):
    """A client whose /models answer breaks the poll of node `a` (a bug, not an outage) a few times."""

    def __init__(self, neurons: list[FakeNeuron], *, failures: int) -> None:
        super().__init__(AsgiNeuronTransport(neurons), poll_timeout=2.0)
        self.failures_left = failures

    async def models(self, endpoint: str) -> list[ModelInfo]:
        if "//a:" in endpoint and self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("unexpected shape in the fleet view")
        return await super().models(endpoint)


async def test_an_unexpected_error_is_logged_counted_and_polling_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from support.fake_neuron import gateway_config

    a, b = FakeNeuron("a", devices_mb=[24_000]), FakeNeuron("b", devices_mb=[24_000])
    b.preload("org/m", 4_000)
    fleet = FleetState(gateway_config([a, b]).neurons, clock=FakeClock())
    client = _BrokenModels([a, b], failures=2)
    failed_nodes: list[str] = []
    a_is_back = asyncio.Event()

    def after_cycle() -> None:
        if fleet.snapshot().node("a").healthy:  # type: ignore[union-attr]
            a_is_back.set()

    poller = Poller(fleet, client, interval_secs=0.0, on_error=failed_nodes.append, after_cycle=after_cycle)

    await poller.poll_once()  # one node's bug does not stop the others
    assert "org/m" in fleet.snapshot().node("b").models  # type: ignore[union-attr]
    assert failed_nodes == ["a"]
    assert "unexpected shape in the fleet view" in caplog.text and "Traceback" in caplog.text

    poller.start()  # the running loop survives the next failure and keeps polling
    await a_is_back.wait()
    assert poller.running
    await poller.stop()
    assert failed_nodes == ["a", "a"]


async def test_the_app_counts_poller_errors_in_a_metric() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    async with gateway([a], EMPTY) as (app, _http):
        app.state.poller._on_error("a")
        registry = app.state.metrics.registry
        assert registry.get_sample_value("cortex_poller_errors_total", {"node": "a"}) == 1.0
