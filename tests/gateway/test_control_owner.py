"""The router as the one owner of fleet state: reservations, recovery, unloading in every state."""

from __future__ import annotations

import asyncio

import msgspec
from support.fake_neuron import FakeClock, FakeNeuron, gateway

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.errors import ApiError
from cortex_gateway import admin
from cortex_gateway.router import Router

CATALOGUE = ModelCatalogue(
    [
        ModelProfile(id="org/left", vram_mb=20_000),
        ModelProfile(id="org/right", vram_mb=20_000),
        ModelProfile(id="org/small", vram_mb=4_000),
    ],
    {},
)
SIZES = {"org/left": 20_000, "org/right": 20_000, "org/small": 4_000}
RECOVERY = {"recovery_backoff_secs": 5.0, "recovery_backoff_max_secs": 8.0, "recovery_max_attempts": 3}


async def test_two_cold_models_that_fit_only_alone_do_not_both_load() -> None:
    """The issue's reproduction: two 20 GB models, one 24 GB device, requested at once."""
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    a.hold_loads.clear()
    async with gateway([a], CATALOGUE) as (app, _http):
        router: Router = app.state.router
        first = asyncio.create_task(router.acquire("org/left"))
        await a.load_started.wait()
        # The first load is claimed with its memory: the second request sees 4 GB free and a
        # resident that is still loading, so it is refused instead of loading beside it.
        try:
            await router.acquire("org/right")
        except ApiError as refused:
            assert (refused.status, refused.code) == (503, "insufficient_memory")
            assert refused.retry_after is not None
        else:
            raise AssertionError("the second model was placed on memory the first had reserved")
        a.hold_loads.set()
        lease = await first
    assert [u.node for u in lease.candidates] == ["a"]
    assert [call["model_id"] for call in a.load_calls] == ["org/left"]
    assert a.unload_calls == []


async def test_the_load_and_its_memory_are_claimed_before_the_evictions_run() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    a.preload("org/left")
    a.hold_unloads.clear()
    clock = FakeClock()
    async with gateway([a], CATALOGUE, clock=clock) as (app, _http):
        clock.advance(3600)
        router: Router = app.state.router
        task = asyncio.create_task(router.acquire("org/right"))
        await a.unload_started.wait()
        node = app.state.fleet.snapshot().node("a")
        assert (node.models["org/right"].status, node.models["org/left"].status) == ("loading", "unloading")
        assert node.free_by_device() == {0: 0}  # 4 GB measured free, 20 GB reserved
        # Meanwhile a small model finds no room: the eviction's memory is already spent.
        try:
            await router.acquire("org/small")
        except ApiError as refused:
            assert refused.code == "insufficient_memory"
        else:
            raise AssertionError("the small model was placed on memory the claimed load had reserved")
        a.hold_unloads.set()
        await task
    assert a.unload_calls == ["org/left"]
    assert [call["model_id"] for call in a.load_calls] == ["org/right"]


async def _report(http: object) -> admin.FleetReport:
    response = await http.get("/admin/fleet")  # type: ignore[attr-defined]
    return msgspec.json.decode(response.content, type=admin.FleetReport)


async def test_a_poisoned_model_is_unloaded_and_reloaded_by_itself() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    a.preload("org/small")
    a.models["org/small"].status = "poisoned"
    a.models["org/small"].error = "CUDA error: an illegal memory access"
    clock = FakeClock()
    async with gateway([a], CATALOGUE, clock=clock, router=RECOVERY) as (app, http):
        [model] = (await _report(http)).nodes[0].models
        assert (model.status, model.attempts, model.retry_at) == ("recovering", 0, clock.now + 5.0)
        refused = await http.post("/v1/chat/completions", json=_chat("org/small"))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_recovering"
        assert "illegal memory access" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "5"

        await app.state.poller.poll_once()
        assert a.load_calls == []  # the back-off is not over
        clock.advance(5.0)
        await app.state.poller.poll_once()
        await app.state.router.settle()
        await app.state.poller.poll_once()
        [model] = (await _report(http)).nodes[0].models
    assert (model.status, model.attempts) == ("loaded", 0)
    assert a.unload_calls == ["org/small"]
    assert [call["model_id"] for call in a.load_calls] == ["org/small"]


async def test_recovery_backs_off_exponentially_up_to_the_cap_and_gives_up_at_the_limit() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    a.fail_loads["org/small"] = (500, "CUDA out of memory while loading")
    clock = FakeClock()
    async with gateway([a], CATALOGUE, clock=clock, router=RECOVERY) as (app, http):
        failed = await http.post("/v1/chat/completions", json=_chat("org/small"))
        assert failed.status_code == 502  # the request that triggered the load gets the reason
        delays = []
        for attempt in (1, 2, 3):
            [model] = (await _report(http)).nodes[0].models
            assert (model.status, model.attempts) == ("recovering", attempt - 1)
            assert model.retry_at is not None
            delays.append(model.retry_at - clock.now)
            clock.advance(model.retry_at - clock.now)
            await app.state.poller.poll_once()
            await app.state.router.settle()
            assert len(a.load_calls) == 1 + attempt
        [model] = (await _report(http)).nodes[0].models
        # 5 s, then 10 s capped to 8 s; after three reloads it stays failed, with the reason.
        assert delays == [5.0, 8.0, 8.0]
        assert (model.status, model.error) == ("failed", "CUDA out of memory while loading")
        clock.advance(3600)
        await app.state.poller.poll_once()
        await app.state.router.settle()
    assert len(a.load_calls) == 4


async def test_a_neuron_that_refuses_a_load_is_not_retried_by_recovery() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb=SIZES)
    a.fail_loads["org/small"] = (422, "architecture 'mamba2' is not supported")
    clock = FakeClock()
    async with gateway([a], CATALOGUE, clock=clock, router=RECOVERY) as (app, http):
        assert (await http.post("/v1/chat/completions", json=_chat("org/small"))).status_code == 502
        clock.advance(6.0)
        await app.state.poller.poll_once()
        await app.state.router.settle()
        [model] = (await _report(http)).nodes[0].models
    assert model.status == "failed"
    assert len(a.load_calls) == 1


async def test_unload_by_hand_works_in_every_state() -> None:
    a = FakeNeuron("a", devices_mb=[48_000], sizes_mb=SIZES)
    a.preload("org/left")
    a.models["org/left"].status = "poisoned"
    a.preload("org/right")
    a.models["org/right"].status = "failed"
    a.models["org/right"].error = "disk full"
    clock = FakeClock()
    async with gateway([a], CATALOGUE, clock=clock, router=RECOVERY) as (app, http):
        statuses = {m.id: m.status for m in (await _report(http)).nodes[0].models}
        assert statuses == {"org/left": "recovering", "org/right": "recovering"}
        for model in ("org/left", "org/right"):
            response = await http.post("/admin/models/unload", json={"model": model})
            assert response.status_code == 200, response.text
        # Unloaded by the operator: recovery stops; nothing reloads it later.
        clock.advance(3600)
        await app.state.poller.poll_once()
        await app.state.router.settle()
        assert (await _report(http)).nodes[0].models == []
        assert a.load_calls == []

        a.hold_loads.clear()
        loading = asyncio.create_task(app.state.router.acquire("org/small"))
        await a.load_started.wait()
        unload = asyncio.create_task(http.post("/admin/models/unload", json={"model": "org/small"}))
        a.hold_loads.set()
        await loading
        response = await unload
        assert response.status_code == 200, response.text
    assert a.unload_calls == ["org/left", "org/right", "org/small"]
    assert a.models == {}


def _chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}
