"""Metrics: the pure derivation of timings, and the exposition text after recording."""

from __future__ import annotations

import httpx2
import pytest

from cortex_gateway.metrics import GatewayMetrics, RequestOutcome, Timings, derive_timings
from cortex_gateway.observers import Observation, Usage


def outcome(observation: Observation | None, **overrides: object) -> RequestOutcome:
    values: dict[str, object] = {
        "status": 200,
        "started_at": 10.0,
        "sent_at": 10.001,
        "last_upstream_byte_at": 12.0,
        "finished_at": 12.0005,
        "error": False,
        "observation": observation,
    }
    values.update(overrides)
    return RequestOutcome(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "record", "expected"),
    [
        (
            "stream: TTFT from the first token, TPOT over the decode window",
            outcome(Observation(True, 10.1, 10.5, 11.5, Usage(20, 11, 5))),
            Timings(2.0005, 0.0015, 0.5, 0.1, 11.0, 20, 11, 5),
        ),
        (
            "short decode window: tokens/s over the whole request",
            outcome(Observation(True, 10.1, 10.5, 10.55, Usage(20, 2, None))),
            Timings(2.0005, 0.0015, 0.5, 0.05, 2 / 0.55, 20, 2, None),
        ),
        (
            "non-streamed body: no TTFT/TPOT, tokens/s until the end",
            outcome(Observation(False, 12.0, None, None, Usage(3, 4, None))),
            Timings(2.0005, 0.0015, None, None, 4 / 2.0005, 3, 4, None),
        ),
        (
            "one completion token: no TPOT",
            outcome(Observation(True, 10.1, 10.5, 10.5, Usage(3, 1, None))),
            Timings(2.0005, 0.0015, 0.5, None, 1 / 0.5, 3, 1, None),
        ),
        (
            "no usage: timings only",
            outcome(Observation(True, 10.1, 10.5, 11.0, None)),
            Timings(2.0005, 0.0015, 0.5, None, None, None, None, None),
        ),
        (
            "waited for a cold load: its wait is not overhead",
            outcome(Observation(True, 10.1, 10.5, 11.5, Usage(20, 11, 5)), cold_start=True),
            Timings(2.0005, None, 0.5, 0.1, 11.0, 20, 11, 5),
        ),
        (
            "upstream never reached: no overhead",
            outcome(None, status=503, sent_at=None, last_upstream_byte_at=None, error=True),
            Timings(2.0005, None, None, None, None, None, None, None),
        ),
    ],
)
def test_derive_timings(name: str, record: RequestOutcome, expected: Timings) -> None:
    got = derive_timings(record)
    for field in Timings.__slots__:
        want, have = getattr(expected, field), getattr(got, field)
        if isinstance(want, float):
            assert have == pytest.approx(want), (name, field)
        else:
            assert have == want, (name, field)


async def test_exposition_has_every_series_after_requests() -> None:
    metrics = GatewayMetrics()
    metrics.target("qwen", "gpu1").in_flight.inc()
    metrics.record("qwen", "gpu1", outcome(Observation(True, 10.1, 10.5, 11.5, Usage(20, 11, 5))))
    metrics.record(
        "qwen", "gpu1", outcome(None, status=503, sent_at=None, last_upstream_byte_at=None, error=True)
    )
    metrics.cold_start("qwen", "gpu1")
    metrics.load_finished("qwen", "gpu1", 12.5, ok=True)
    metrics.load_finished("qwen", "gpu2", 3.0, ok=False)
    metrics.evicted("llama", "gpu1")
    metrics.queue_wait("qwen", 4.0)

    transport = httpx2.ASGITransport(app=metrics.asgi_app())
    async with httpx2.AsyncClient(transport=transport, base_url="http://metrics") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    text = response.text
    lbl = 'model="qwen",node="gpu1"'
    expected = [
        f"cortex_requests_total{{{lbl}}} 2.0",
        f'cortex_responses_total{{{lbl},status="200"}} 1.0',
        f'cortex_responses_total{{{lbl},status="503"}} 1.0',
        f"cortex_request_errors_total{{{lbl}}} 1.0",
        f"cortex_requests_in_flight{{{lbl}}} 1.0",
        f"cortex_request_duration_seconds_count{{{lbl}}} 2.0",
        f'cortex_time_to_first_token_seconds_bucket{{le="0.5",{lbl}}} 1.0',
        f"cortex_time_per_output_token_seconds_count{{{lbl}}} 1.0",
        f"cortex_tokens_per_second_count{{{lbl}}} 1.0",
        f"cortex_gateway_overhead_seconds_count{{{lbl}}} 1.0",
        f"cortex_prompt_tokens_total{{{lbl}}} 20.0",
        f"cortex_completion_tokens_total{{{lbl}}} 11.0",
        f"cortex_cached_prompt_tokens_total{{{lbl}}} 5.0",
        f"cortex_cold_starts_total{{{lbl}}} 1.0",
        f"cortex_model_load_duration_seconds_count{{{lbl}}} 1.0",
        'cortex_model_load_failures_total{model="qwen",node="gpu2"} 1.0',
        'cortex_evictions_total{model="llama",node="gpu1"} 1.0',
        'cortex_queue_wait_seconds_sum{model="qwen"} 4.0',
        "# TYPE cortex_time_to_first_token_seconds histogram",
    ]
    for line in expected:
        assert line in text, line


def test_registries_are_per_app() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.evicted("m", "n")
    assert first.registry.get_sample_value("cortex_evictions_total", {"model": "m", "node": "n"}) == 1.0
    assert second.registry.get_sample_value("cortex_evictions_total", {"model": "m", "node": "n"}) is None


async def test_real_app_exposes_request_and_control_plane_series() -> None:
    """Through create_app: an alias that cold-loads, then streams; labels use the concrete id."""
    from support.fake_neuron import FakeNeuron, gateway
    from support.fake_upstream import FakeUpstream, Script, sse_stream

    from cortex_core.config.catalogue import ModelCatalogue, ModelProfile

    catalogue = ModelCatalogue([ModelProfile(id="org/small", vram_mb=1_000)], {"small": "org/small"})
    neuron = FakeNeuron(
        "a", devices_mb=[24_000], sizes_mb={"org/small": 1_000}, endpoint="http://127.0.0.1:1"
    )
    script = Script(content_type="text/event-stream", chunks=sse_stream(["x", "y"], prompt_tokens=4))
    async with FakeUpstream(script) as upstream:
        neuron.inference_url = upstream.base_url
        async with gateway([neuron], catalogue) as (app, http):
            body = {"model": "small", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200
            transport = httpx2.ASGITransport(app=app.state.metrics.asgi_app())
            async with httpx2.AsyncClient(transport=transport, base_url="http://metrics") as scrape:
                text = (await scrape.get("/metrics")).text
    lbl = 'model="org/small",node="a"'
    for line in (
        f"cortex_requests_total{{{lbl}}} 1.0",
        f'cortex_responses_total{{{lbl},status="200"}} 1.0',
        f"cortex_prompt_tokens_total{{{lbl}}} 4.0",
        f"cortex_completion_tokens_total{{{lbl}}} 2.0",
        f"cortex_time_to_first_token_seconds_count{{{lbl}}} 1.0",
        f"cortex_cold_starts_total{{{lbl}}} 1.0",
        f"cortex_model_load_duration_seconds_count{{{lbl}}} 1.0",
        'cortex_queue_wait_seconds_count{model="org/small"} 1.0',
        f"cortex_requests_in_flight{{{lbl}}} 0.0",
    ):
        assert line in text, line
    assert 'model="small"' not in text  # never the alias


async def test_the_gateway_re_exports_what_each_neuron_reports() -> None:
    from support.fake_neuron import FakeNeuron, gateway

    from cortex_core.config.catalogue import ModelCatalogue

    gpu = FakeNeuron("gpu1", devices_mb=[24_000, 16_000])
    gpu.preload("org/m", 6_000, device=1)
    gpu.models["org/m"].in_flight = 3
    laptop = FakeNeuron("laptop", host_memory_mb=16_000)
    laptop.preload("org/cpu", 2_000)
    down = FakeNeuron("down", devices_mb=[24_000])
    down.down = True
    async with gateway([gpu, laptop, down], ModelCatalogue([], {})) as (app, _http):
        registry = app.state.metrics.registry
        mb = 1024 * 1024
        expected = [
            ("cortex_neuron_up", {"node": "gpu1"}, 1.0),
            ("cortex_neuron_up", {"node": "down"}, 0.0),
            ("cortex_neuron_requests_in_flight", {"model": "org/m", "node": "gpu1"}, 3.0),
            ("cortex_neuron_queue_depth", {"model": "org/m", "node": "gpu1"}, 0.0),
            ("cortex_neuron_decode_tokens_per_second", {"model": "org/m", "node": "gpu1"}, 0.0),
            ("cortex_neuron_prefill_tokens_per_second", {"model": "org/cpu", "node": "laptop"}, 0.0),
            ("cortex_neuron_memory_used_bytes", {"node": "gpu1", "device": "1"}, 6_000 * mb),
            ("cortex_neuron_memory_used_bytes", {"node": "gpu1", "device": "0"}, 0.0),
            ("cortex_neuron_memory_total_bytes", {"node": "gpu1", "device": "0"}, 24_000 * mb),
            ("cortex_neuron_memory_used_bytes", {"node": "laptop", "device": "host"}, 2_000 * mb),
            ("cortex_neuron_memory_total_bytes", {"node": "laptop", "device": "host"}, 16_000 * mb),
        ]
        for name, labels, value in expected:
            assert registry.get_sample_value(name, labels) == value, (name, labels)
        # The next poll's readings are what the next scrape shows.
        gpu.models["org/m"].in_flight = 0
        await app.state.poller.poll_once()
        assert (
            registry.get_sample_value("cortex_neuron_requests_in_flight", {"model": "org/m", "node": "gpu1"})
            == 0.0
        )
