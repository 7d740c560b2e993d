"""The lifecycle manager's rules over a scripted harness: no torch, no weights, no timing.

States, single flight, reservations, poisoning, harness selection and drain are the
manager's alone (neuron/manager.py); ScriptedHarness (tests/support) only does what each
test tells it, so these hold for any harness behind cortex_core.harness.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import httpx2
import pytest
from support.scripted_harness import ScriptedHarness, scripted_engine

from cortex_core.config.neuron import NeuronConfig
from cortex_core.errors import ApiError
from cortex_core.neuron_api import ModelSpec
from neuron.app import create_app
from neuron.discovery import HostProbe
from neuron.manager import ModelManager
from neuron.preflight import required_bytes

GIB = 1024**3


class FixedHost(HostProbe):
    """A CPU-only host with a fixed amount of free memory."""

    def __init__(self, free_bytes: int = 8 * GIB) -> None:
        super().__init__(None, cuda_unavailable_reason="test host: CPU only")
        self._free = free_bytes

    def free_bytes(self, device: int | None) -> int:
        return self._free


def spec(model_id: str = "org/model", harness: str = "scripted") -> ModelSpec:
    return ModelSpec(model_id=model_id, harness=harness)


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ModelManager, ScriptedHarness]]:
    harness = ScriptedHarness()
    manager = ModelManager(NeuronConfig(), FixedHost(), harnesses=[harness])
    try:
        yield manager, harness
    finally:
        await manager.close()


async def test_concurrent_loads_of_one_model_share_one_harness_load(
    scripted: tuple[ModelManager, ScriptedHarness],
) -> None:
    manager, harness = scripted
    harness.release.clear()
    waiters = [asyncio.create_task(manager.load(spec())) for _ in range(5)]
    # The load task is created by the first waiter, so it runs after all five have queued
    # on it: when the harness is entered, every caller is already waiting.
    await harness.entered.wait()
    assert [info.status for info in manager.models()] == ["loading"]
    assert not any(waiter.done() for waiter in waiters)
    harness.release.set()
    infos = await asyncio.gather(*waiters)
    assert {info.status for info in infos} == {"loaded"}
    assert harness.loads == ["org/model"]
    # Loading a loaded model is a no-op success.
    assert (await manager.load(spec())).status == "loaded"
    assert harness.loads == ["org/model"]


async def test_a_failed_load_is_kept_with_its_reason_and_a_new_load_tries_again(
    scripted: tuple[ModelManager, ScriptedHarness],
) -> None:
    manager, harness = scripted
    harness.fail_with = ApiError(
        422, "architecture 'mamba2' is not supported", code="unsupported_architecture"
    )
    with pytest.raises(ApiError) as refused:
        await manager.load(spec())
    assert refused.value.status == 422
    [info] = manager.models()
    assert (info.status, info.error) == ("failed", "architecture 'mamba2' is not supported")
    with pytest.raises(ApiError) as gone:
        manager.get("org/model")
    assert gone.value.status == 404 and "mamba2" in gone.value.message
    harness.fail_with = None
    assert (await manager.load(spec())).status == "loaded"
    assert harness.loads == ["org/model", "org/model"]


async def test_memory_is_reserved_while_a_load_runs_and_returned_after(
    scripted: tuple[ModelManager, ScriptedHarness],
) -> None:
    manager, harness = scripted
    harness.weight_bytes = 3 * GIB
    seen: list[int] = []
    harness.on_load = lambda ticket: seen.append(ticket.free_bytes(None))
    harness.release.clear()
    first = asyncio.create_task(manager.load(spec("org/a")))
    await harness.entered.wait()
    harness.entered.clear()
    second = asyncio.create_task(manager.load(spec("org/b")))
    await harness.entered.wait()
    harness.release.set()
    await asyncio.gather(first, second)
    # Each load, inside its own reservation, sees it and every other load's in progress
    # (weights plus pre-flight's headroom); all of it comes back when the loads end.
    held = required_bytes(3 * GIB)
    assert seen == [8 * GIB - held, 8 * GIB - 2 * held]
    assert manager._reserved == {None: 0}


async def test_a_load_that_no_longer_fits_is_refused_at_its_reservation(
    scripted: tuple[ModelManager, ScriptedHarness],
) -> None:
    manager, harness = scripted
    # Two of these do not fit in the scripted host's 8 GiB.
    harness.weight_bytes = 5 * GIB
    harness.release.clear()
    first = asyncio.create_task(manager.load(spec("org/a")))
    await harness.entered.wait()
    with pytest.raises(ApiError) as refused:
        await manager.load(spec("org/b"))
    assert refused.value.status == 422
    harness.release.set()
    assert (await first).status == "loaded"


async def test_a_device_fault_poisons_the_model_until_it_is_unloaded_and_loaded_again(
    scripted: tuple[ModelManager, ScriptedHarness],
) -> None:
    manager, harness = scripted
    await manager.load(spec())
    report = harness.tickets["org/model"].device_fault()
    # Reported from another thread, as an engine's owner thread does.
    thread = threading.Thread(target=report, args=("CUDA error: an illegal memory access",))
    thread.start()
    thread.join()
    await asyncio.sleep(0)  # the report is posted to the loop; let it run once
    [info] = manager.models()
    assert info.status == "poisoned" and "illegal memory access" in (info.error or "")
    with pytest.raises(ApiError) as unusable:
        manager.get("org/model")
    assert (unusable.value.status, unusable.value.code) == (500, "model_poisoned")
    with pytest.raises(ApiError) as refused:
        await manager.load(spec())
    assert refused.value.status == 409
    loaded = manager._records["org/model"].loaded
    assert loaded is not None
    engine = scripted_engine(loaded)
    await manager.unload("org/model")
    assert engine.closed and harness.unloads == ["org/model"]
    assert (await manager.load(spec())).status == "loaded"


async def test_each_model_loads_through_the_harness_its_spec_names() -> None:
    one, other = ScriptedHarness(name="scripted"), ScriptedHarness(name="other")
    manager = ModelManager(NeuronConfig(), FixedHost(), harnesses=[one, other])
    try:
        assert manager.harness_names == ["other", "scripted"]
        info = await manager.load(spec("org/b", harness="other"))
        assert info.harness == "other"
        assert (one.loads, other.loads) == ([], ["org/b"])
        await manager.unload("org/b")
        assert other.unloads == ["org/b"]
    finally:
        await manager.close()
    assert one.closed and other.closed


async def test_drain_cancels_loads_in_progress_and_unloads_the_rest() -> None:
    harness = ScriptedHarness()
    manager = ModelManager(NeuronConfig(), FixedHost(), harnesses=[harness])
    await manager.load(spec("org/a"))
    harness.release.clear()
    harness.entered.clear()
    pending = asyncio.create_task(manager.load(spec("org/b")))
    await harness.entered.wait()
    await manager.close()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert harness.unloads == ["org/a"] and harness.closed
    assert manager.models() == []


async def test_the_http_api_names_the_known_harnesses() -> None:
    harness = ScriptedHarness()
    probe = FixedHost()
    manager = ModelManager(NeuronConfig(), probe, harnesses=[harness])
    app = create_app(NeuronConfig(), probe=probe, manager=manager, serving_routes=lambda lookup, config: [])
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/discovery")).json()["harnesses"] == ["scripted"]
        refused = await client.post("/models/load", json={"model_id": "org/m", "harness": "candle"})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("unknown_harness", "harness")
        assert error["message"] == "unknown harness 'candle' for model 'org/m'; this neuron runs ['scripted']"
        loaded = await client.post("/models/load", json={"model_id": "org/m", "harness": "scripted"})
        assert loaded.status_code == 200
        [listed] = (await client.get("/models")).json()
        assert (listed["id"], listed["harness"], listed["status"]) == ("org/m", "scripted", "loaded")
    await manager.close()
