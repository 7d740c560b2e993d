"""Routing through the real gateway app over fake neurons: cold loads, eviction, waiting, errors."""

from __future__ import annotations

import asyncio
import json

import pytest
from support.fake_neuron import FakeClock, FakeNeuron, gateway
from support.fake_upstream import FakeUpstream
from support.waits import until

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.errors import ApiError
from cortex_gateway.router import Router

CATALOGUE = ModelCatalogue(
    [
        ModelProfile(id="org/small", vram_mb=6_000, capabilities=["text"]),
        ModelProfile(id="org/big", vram_mb=20_000, quant="q4k"),
        ModelProfile(id="org/old", vram_mb=20_000),
        ModelProfile(id="org/tp", vram_mb=30_000, min_devices=2),
        ModelProfile(id="org/elsewhere", vram_mb=1_000, pinned_on=["gpu9"]),
    ],
    {"small": "org/small"},
)
SIZES = {"org/small": 6_000, "org/big": 20_000, "org/old": 20_000, "org/tp": 30_000}


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def test_cold_load_evicts_the_idle_resident_then_serves_through_the_proxy() -> None:
    clock = FakeClock()
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES, endpoint="http://127.0.0.1:1")
    a.preload("org/old")
    async with FakeUpstream() as upstream:
        # The neuron says "localhost"; the gateway rewrites it to the neuron's host.
        a.inference_url = upstream.base_url.replace("127.0.0.1", "localhost")
        async with gateway([a], CATALOGUE, clock=clock) as (app, http):
            clock.advance(3600)  # org/old is past its minimum residency
            response = await http.post("/v1/chat/completions", json=chat("org/big"))
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == "Hello there"
    assert a.unload_calls == ["org/old"]
    assert a.load_calls == [
        {
            "model_id": "org/big",
            "harness": "torch",
            "quant": "q4k",
            "tensor_parallel": None,
            "devices": [0],
            "served_model_name": None,
        }
    ]
    assert set(a.models) == {"org/big"}
    assert json.loads(upstream.calls[0].body)["model"] == "org/big"
    text = _metrics_text(app)
    assert 'cortex_evictions_total{model="org/old",node="a"} 1.0' in text
    assert 'cortex_cold_starts_total{model="org/big",node="a"} 1.0' in text


async def test_a_mirror_sourced_model_is_loaded_from_the_mirror_and_served_under_its_catalogue_id() -> None:
    catalogue = ModelCatalogue([ModelProfile(id="org/mirrored", vram_mb=1_000, source="helexa")], {})
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb={"org/mirrored": 1_000}, endpoint="http://127.0.0.1:1")
    async with FakeUpstream() as upstream:
        a.inference_url = upstream.base_url
        async with gateway([a], catalogue) as (_app, http):
            response = await http.post("/v1/chat/completions", json=chat("org/mirrored"))
            assert response.status_code == 200, response.text
            listed = (await http.get("/v1/models")).json()["data"]
    [load] = a.load_calls
    assert (load["model_id"], load["served_model_name"]) == ("helexa:org/mirrored", "org/mirrored")
    assert [entry["id"] for entry in listed] == ["org/mirrored"]
    assert listed[0]["loaded"] is True


def _metrics_text(app: object) -> str:
    from prometheus_client import generate_latest

    return generate_latest(app.state.metrics.registry).decode()  # type: ignore[attr-defined]


async def test_twenty_concurrent_first_requests_make_exactly_one_load_call() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES, endpoint="http://127.0.0.1:1")
    a.hold_loads.clear()
    async with FakeUpstream() as upstream:
        a.inference_url = upstream.base_url
        async with gateway([a], CATALOGUE) as (app, http):
            requests = [
                asyncio.create_task(http.post("/v1/chat/completions", json=chat("small"))) for _ in range(20)
            ]
            await a.load_started.wait()
            # The load is held open until all twenty wait for it: single flight is tested
            # only if every request arrives while the load is in flight.
            router: Router = app.state.router
            await until(lambda: router.waiting_for_load("org/small") == 20, "twenty waiters")
            assert len(a.load_calls) == 1
            assert app.state.router.loads_in_flight == [("a", "org/small")]
            a.hold_loads.set()
            responses = await asyncio.gather(*requests)
    assert [r.status_code for r in responses] == [200] * 20
    assert len(a.load_calls) == 1
    assert len(upstream.calls) == 20
    # The alias was rewritten in every forwarded body.
    assert {json.loads(call.body)["model"] for call in upstream.calls} == {"org/small"}


async def test_waiting_queue_is_bounded_with_429() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    a.hold_loads.clear()
    async with gateway([a], CATALOGUE, router={"max_waiting_per_model": 3}) as (app, http):
        router: Router = app.state.router
        waiting = [asyncio.create_task(router.acquire("org/small")) for _ in range(3)]
        await a.load_started.wait()
        refused = await http.post("/v1/chat/completions", json=chat("org/small"))
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "5"
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error"
        assert "max_waiting_per_model" in error["message"] and "org/small" in error["message"]
        a.hold_loads.set()
        leases = await asyncio.gather(*waiting)
        assert all(lease.candidates[0].node == "a" and lease.cold_start for lease in leases)


async def test_bounded_wait_gives_503_with_retry_after_and_the_load_goes_on() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    a.hold_loads.clear()
    async with gateway([a], CATALOGUE, router={"load_wait_secs": 0.1}) as (app, http):
        response = await http.post("/v1/chat/completions", json=chat("org/small"))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "model_loading"
        assert "still loading" in response.json()["error"]["message"]
        # The abandoned load was not cancelled: once it finishes, the model serves.
        a.hold_loads.set()
        await app.state.router.settle()
        lease = await app.state.router.acquire("org/small")
        assert [u.node for u in lease.candidates] == ["a"]
        assert len(a.load_calls) == 1


async def test_failed_load_is_reported_to_every_waiter_with_the_neurons_reason() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    a.hold_loads.clear()
    a.fail_loads["org/small"] = (422, "architecture 'mamba2' is not supported; supported: llama, qwen3")
    async with gateway([a], CATALOGUE) as (app, http):
        waiters = [
            asyncio.create_task(http.post("/v1/chat/completions", json=chat("org/small"))) for _ in range(5)
        ]
        await a.load_started.wait()
        # All five must be waiting on the one load when it fails, not arrive afterwards
        # (which the back-off would answer without any waiting).
        await until(lambda: app.state.router.waiting_for_load("org/small") == 5, "five waiters")
        a.hold_loads.set()
        responses = await asyncio.gather(*waiters)
        for response in responses:
            assert response.status_code == 502
            error = response.json()["error"]
            assert error["code"] == "model_load_failed"
            assert "mamba2" in error["message"] and "'a'" in error["message"]
        # Within the back-off a new request gets the same reason without a new load.
        again = await http.post("/v1/chat/completions", json=chat("org/small"))
        assert again.status_code == 502 and "mamba2" in again.json()["error"]["message"]
        await app.state.poller.poll_once()  # the failure survives the neuron's /models
        again = await http.post("/v1/chat/completions", json=chat("org/small"))
        assert again.status_code == 502
        assert len(a.load_calls) == 1


async def test_unreachable_neuron_during_load_is_a_retryable_503() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    async with gateway([a], CATALOGUE) as (_, http):
        a.down = True
        response = await http.post("/v1/chat/completions", json=chat("org/small"))
        assert response.status_code == 503
        assert "retry-after" in response.headers
        assert "cannot connect" in response.json()["error"]["message"]


async def test_unknown_model_is_404_in_openai_shape_naming_the_model() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    async with gateway([a], CATALOGUE) as (_, http):
        response = await http.post("/v1/chat/completions", json=chat("org/nope"))
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    assert "'org/nope'" in error["message"] and "GET /v1/models" in error["message"]


async def test_model_no_neuron_can_host_names_why() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    async with gateway([a], CATALOGUE) as (_, http):
        tp = await http.post("/v1/completions", json={"model": "org/tp", "prompt": "x"})
        pinned = await http.post("/v1/responses", json={"model": "org/elsewhere", "input": "x"})
    assert tp.status_code == 404
    assert "needs 2 device(s)" in tp.json()["error"]["message"]
    assert pinned.status_code == 404
    assert "pinned to gpu9" in pinned.json()["error"]["message"]


async def test_no_healthy_neuron_is_503_with_retry_after() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    a.down = True
    async with gateway([a], CATALOGUE) as (_, http):
        response = await http.post("/v1/chat/completions", json=chat("org/small"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"


async def test_thrash_guard_makes_the_second_model_wait_instead_of_evicting() -> None:
    clock = FakeClock()
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    async with gateway([a], CATALOGUE, clock=clock, eviction={"min_residency_secs": 60}) as (app, _):
        router: Router = app.state.router
        await router.acquire("org/big")
        clock.advance(20)
        with pytest.raises(ApiError) as refused:
            await router.acquire("org/old")
        assert refused.value.status == 503
        assert refused.value.retry_after == 40
        assert a.unload_calls == []
        clock.advance(41)
        lease = await router.acquire("org/old")
        assert lease.cold_start
        assert a.unload_calls == ["org/big"]


async def test_busy_resident_is_never_evicted() -> None:
    clock = FakeClock()
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    a.preload("org/old")
    async with gateway([a], CATALOGUE, clock=clock) as (app, _):
        clock.advance(3600)
        router: Router = app.state.router
        lease = await router.acquire("org/old")
        lease.use(lease.candidates[0])
        with pytest.raises(ApiError) as refused:
            await router.acquire("org/big")
        assert refused.value.status == 503 and "busy" in refused.value.message
        lease.release()
        await router.acquire("org/big")
        assert a.unload_calls == ["org/old"]


async def test_least_busy_replica_is_first_and_in_flight_is_accounted() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    b = FakeNeuron("b", devices_mb=[24_000])
    for neuron in (a, b):
        neuron.preload("org/small", 6_000)
    async with gateway([a, b], CATALOGUE) as (app, _):
        router: Router = app.state.router
        first = await router.acquire("org/small")
        assert [u.node for u in first.candidates] == ["a", "b"]
        first.use(first.candidates[0])
        second = await router.acquire("org/small")
        assert [u.node for u in second.candidates] == ["b", "a"]
        # Failover moves the in-flight count with the request.
        second.use(second.candidates[0])
        second.use(second.candidates[1])
        third = await router.acquire("org/small")
        assert [u.node for u in third.candidates] == ["b", "a"]
        first.release()
        second.release()
        second.release()  # idempotent
        node = app.state.fleet.snapshot().node("a")
        view = node.models["org/small"]
        assert node.gateway_in_flight("org/small") == 0 and node.last_used(view) is not None


async def test_cpu_only_neuron_gets_the_load_without_device_indices() -> None:
    laptop = FakeNeuron("laptop", devices_mb=[], host_memory_mb=16_000, sizes_mb=SIZES)
    async with gateway([laptop], CATALOGUE) as (app, _):
        lease = await app.state.router.acquire("org/small")
    assert lease.candidates[0].node == "laptop"
    assert laptop.load_calls[0]["devices"] is None


async def test_body_over_the_limit_is_413_in_openai_shape() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    async with gateway([a], CATALOGUE, gateway={"max_body_bytes": 100}) as (_, http):
        response = await http.post(
            "/v1/chat/completions", content=b'{"model": "org/small", "x": "' + b"a" * 200 + b'"}'
        )
    assert response.status_code == 413
    assert "gateway.max_body_bytes" in response.json()["error"]["message"]


async def test_missing_model_field_is_400() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    async with gateway([a], CATALOGUE) as (_, http):
        response = await http.post("/v1/chat/completions", json={"messages": []})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


async def test_unknown_route_is_404_in_openai_shape() -> None:
    async with gateway([], CATALOGUE) as (_, http):
        response = await http.get("/v2/nothing")
    assert response.status_code == 404
    assert "/v2/nothing" in response.json()["error"]["message"]
    assert "the API is under /v1" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "headers", "shape"),
    [
        ("GET", "/v1/files", {}, "openai"),
        ("POST", "/v1/embeddings", {}, "openai"),
        ("POST", "/v1/messages/batches", {}, "anthropic"),
        ("GET", "/v1/files", {"anthropic-version": "2023-06-01"}, "anthropic"),
    ],
)
async def test_unknown_route_under_v1_says_it_does_not_exist_in_the_callers_shape(
    method: str, path: str, headers: dict[str, str], shape: str
) -> None:
    async with gateway([], CATALOGUE) as (_, http):
        response = await http.request(method, path, headers=headers)
    assert response.status_code == 404
    body = response.json()
    if shape == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    else:
        assert body["error"]["code"] == "not_found"
    message = body["error"]["message"]
    assert message.startswith(f"route {method} {path} does not exist")
    assert "under /v1" not in message


async def test_only_unreachable_upstreams_count_toward_the_circuit_breaker() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    a.preload("org/small", 6_000)
    clock = FakeClock()
    async with gateway(
        [a], CATALOGUE, clock=clock, proxy={"breaker_failures": 2, "breaker_cooldown_secs": 5.0}
    ) as (app, _):
        router: Router = app.state.router
        lease = await router.acquire("org/small")
        for _ in range(3):
            lease.upstream_failed(lease.candidates[0], "HTTP 503")  # the neuron answered
        assert app.state.fleet.snapshot().node("a").healthy
        for _ in range(2):
            lease.upstream_failed(lease.candidates[0], "connection refused", unreachable=True)
        assert not app.state.fleet.snapshot().node("a").healthy
        clock.advance(5.0)
        await app.state.poller.poll_once()  # the probe after the cool-down answered
        assert app.state.fleet.snapshot().node("a").healthy
