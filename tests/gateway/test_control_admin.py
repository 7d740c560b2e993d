"""/v1/models, /health and the admin routes over fake neurons."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import anthropic
import msgspec
import openai
import pytest
from support.fake_neuron import FakeClock, FakeNeuron, gateway, in_process_client

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_gateway import admin

CATALOGUE = ModelCatalogue(
    [
        ModelProfile(id="org/small", vram_mb=6_000, capabilities=["text"]),
        ModelProfile(id="org/tp", vram_mb=30_000, min_devices=2),
        ModelProfile(id="org/pinned", vram_mb=1_000, pinned_on=["b"]),
    ],
    {"small": "org/small", "dangling": "org/missing"},
)


async def test_v1_models_merges_catalogue_topology_residents_and_aliases() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    b = FakeNeuron("b", devices_mb=[24_000, 24_000])
    a.preload("org/small", 6_000)
    b.preload("local/adhoc", 2_000)
    async with gateway([a, b], CATALOGUE, clock=FakeClock(1_700_000_000)) as (_, http):
        response = await http.get("/v1/models")
    assert response.status_code == 200
    listing = msgspec.json.decode(response.content, type=admin.ModelList)
    assert listing.object == "list"
    by_id = {entry.id: entry for entry in listing.data}
    assert [entry.id for entry in listing.data] == sorted(by_id)
    assert set(by_id) == {"local/adhoc", "org/pinned", "org/small", "org/tp", "small"}

    small = by_id["org/small"]
    assert (small.object, small.owned_by, small.created) == ("model", "cortex", 1_700_000_000)
    assert small.loaded and small.state == "loaded"
    assert small.feasible_on == ["a", "b"]
    assert [(loc.node, loc.status, loc.vram_estimate_mb) for loc in small.locations] == [
        ("a", "loaded", 6_000)
    ]
    assert small.capabilities == ["text"]

    assert by_id["org/tp"].feasible_on == ["b"] and by_id["org/tp"].state == "available"
    assert by_id["org/pinned"].feasible_on == ["b"]
    adhoc = by_id["local/adhoc"]
    assert adhoc.loaded and adhoc.feasible_on == [] and adhoc.locations[0].node == "b"

    alias = by_id["small"]
    assert alias.alias_of == "org/small" and alias.loaded and alias.locations == small.locations
    # Optional keys are omitted, not null.
    raw = {entry["id"]: entry for entry in response.json()["data"]}
    assert "limit" not in raw["org/small"] and "alias_of" not in raw["org/small"]


async def test_v1_models_marks_models_on_unhealthy_neurons_not_loaded() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    a.preload("org/small", 6_000)
    async with gateway([a], CATALOGUE, poller={"unhealthy_after": 1}) as (app, http):
        a.down = True
        await app.state.poller.poll_once()
        entry = next(e for e in (await http.get("/v1/models")).json()["data"] if e["id"] == "org/small")
    assert entry["loaded"] is False
    assert entry["feasible_on"] == []
    assert entry["locations"] == [{"node": "a", "status": "loaded", "vram_estimate_mb": 6000}]


async def test_admin_fleet_report_decodes_with_the_shared_structs() -> None:
    clock = FakeClock()
    a = FakeNeuron("a", devices_mb=[24_000])
    b = FakeNeuron("b", devices_mb=[], host_memory_mb=32_000)
    a.preload("org/small", 6_000)
    async with gateway([a, b], CATALOGUE, clock=clock) as (app, http):
        lease = await app.state.router.acquire("org/small")
        lease.use(lease.candidates[0])
        response = await http.get("/admin/fleet")
        lease.release()
    assert response.status_code == 200
    report = msgspec.json.decode(response.content, type=admin.FleetReport)
    assert report.status == "ok"
    node_a, node_b = report.nodes
    assert (node_a.name, node_a.healthy, node_a.cpu_only, node_a.hostname) == ("a", True, False, "a")
    assert [(d.index, d.total_mb, d.free_mb) for d in node_a.devices] == [(0, 24_000, 18_000)]
    (model,) = node_a.models
    assert (model.id, model.status, model.in_flight, model.memory_mb, model.priority) == (
        "org/small",
        "loaded",
        1,
        6_000,
        100,
    )
    assert (node_b.cpu_only, node_b.host_memory_total_mb, node_b.devices) == (True, 32_000, [])


async def test_admin_load_and_unload_by_hand() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    b = FakeNeuron("b", devices_mb=[24_000])
    async with gateway([a, b], CATALOGUE) as (app, http):
        loaded = await http.post("/admin/models/load", json={"model": "small", "node": "b"})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json() == {"model": "org/small", "nodes": ["b"], "status": "loaded"}
        assert b.load_calls[0]["model_id"] == "org/small" and a.load_calls == []

        anywhere = await http.post("/admin/models/load", json={"model": "org/small"})
        assert anywhere.json()["nodes"] == ["b"]  # already loaded there: nothing to do
        assert len(b.load_calls) == 1

        unloaded = await http.post("/admin/models/unload", json={"model": "org/small"})
        assert unloaded.json() == {"model": "org/small", "nodes": ["b"], "status": "unloaded"}
        assert b.unload_calls == ["org/small"]
        assert "org/small" not in app.state.fleet.snapshot().node("b").models

        again = await http.post("/admin/models/unload", json={"model": "org/small"})
        assert again.status_code == 404 and "not loaded" in again.json()["error"]["message"]
        unknown_node = await http.post("/admin/models/load", json={"model": "org/small", "node": "zz"})
        assert unknown_node.status_code == 404
        assert "known: a, b" in unknown_node.json()["error"]["message"]
        bad = await http.post("/admin/models/load", json={"node": "a"})
        assert bad.status_code == 400 and "model" in bad.json()["error"]["message"]


async def test_admin_fleet_lists_loads_in_progress() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    a.hold_loads.clear()
    async with gateway([a], CATALOGUE) as (_, http):
        load = asyncio.create_task(http.post("/admin/models/load", json={"model": "org/small"}))
        await a.load_started.wait()
        report = msgspec.json.decode((await http.get("/admin/fleet")).content, type=admin.FleetReport)
        assert [(p.node, p.model) for p in report.loads_in_progress] == [("a", "org/small")]
        assert report.nodes[0].models[0].status == "loading"
        a.hold_loads.set()
        assert (await load).status_code == 200


async def test_health_is_impaired_by_a_down_node_or_a_broken_model() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    b = FakeNeuron("b", devices_mb=[24_000])
    b.preload("org/small", 6_000)
    b.models["org/small"].status = "poisoned"
    b.models["org/small"].error = "NCCL watchdog fired on rank 1"
    async with gateway([a, b], CATALOGUE) as (_, http):
        health = msgspec.json.decode((await http.get("/health")).content, type=admin.FleetHealth)
    assert health.status == "impaired"
    assert health.nodes == admin.NodeCounts(healthy=2, total=2)
    # A catalogue model that is poisoned is being reloaded by the gateway.
    assert [(u.node, u.model, u.status) for u in health.unservable] == [("b", "org/small", "recovering")]


async def test_admin_unload_of_a_busy_model_is_409() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    a.preload("org/small", 6_000)
    async with gateway([a], CATALOGUE) as (app, http):
        lease = await app.state.router.acquire("org/small")
        lease.use(lease.candidates[0])
        busy = await http.post("/admin/models/unload", json={"model": "org/small"})
        assert busy.status_code == 409
        assert "in flight" in busy.json()["error"]["message"]
        assert a.unload_calls == []
        lease.release()
        assert (await http.post("/admin/models/unload", json={"model": "org/small"})).status_code == 200


# --- GET /v1/models/{id} and Anthropic's Models API shapes ----------------------------------


def sdks(app: Any) -> tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]:
    return (
        openai.AsyncOpenAI(
            base_url="http://gateway/v1", api_key="x", max_retries=0, http_client=in_process_client(app)
        ),
        anthropic.AsyncAnthropic(
            base_url="http://gateway", api_key="x", max_retries=0, http_client=in_process_client(app)
        ),
    )


async def test_models_retrieve_through_both_sdks() -> None:
    a = FakeNeuron("a", devices_mb=[24_000])
    a.preload("org/small", 6_000)
    async with gateway([a], CATALOGUE, clock=FakeClock(1_700_000_000)) as (app, _):
        openai_sdk, anthropic_sdk = sdks(app)
        async with openai_sdk, anthropic_sdk:
            # A catalogue id has a slash, which the SDKs put in the path as it is.
            model = await openai_sdk.models.retrieve("org/small")
            alias = await openai_sdk.models.retrieve("small")
            described = await anthropic_sdk.models.retrieve("org/small")
            with pytest.raises(openai.NotFoundError) as openai_missing:
                await openai_sdk.models.retrieve("org/nope")
            with pytest.raises(anthropic.NotFoundError) as anthropic_missing:
                await anthropic_sdk.models.retrieve("org/nope")
    assert (model.id, model.object, model.created, model.owned_by) == (
        "org/small",
        "model",
        1_700_000_000,
        "cortex",
    )
    assert alias.id == "small" and alias.model_extra and alias.model_extra["alias_of"] == "org/small"
    assert (described.type, described.id, described.display_name) == ("model", "org/small", "org/small")
    assert described.created_at == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert openai_missing.value.code == "model_not_found"
    assert anthropic_missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "'org/nope'" in anthropic_missing.value.body["error"]["message"]  # type: ignore[index]


async def test_anthropic_sdk_lists_every_model_page_by_page() -> None:
    async with gateway([FakeNeuron("a", devices_mb=[24_000])], CATALOGUE) as (app, http):
        _, anthropic_sdk = sdks(app)
        async with anthropic_sdk:
            listed = [model.id async for model in anthropic_sdk.models.list(limit=2)]
        openai_shape = (await http.get("/v1/models")).json()
        bad_limit = await http.get("/v1/models?limit=0", headers={"anthropic-version": "2023-06-01"})
    assert (
        listed
        == [entry["id"] for entry in openai_shape["data"]]
        == ["org/pinned", "org/small", "org/tp", "small"]
    )
    assert openai_shape["object"] == "list" and "has_more" not in openai_shape
    assert bad_limit.status_code == 400 and bad_limit.json()["error"]["message"].startswith("limit: ")


def _listing(*ids: str) -> admin.ModelList:
    return admin.ModelList(data=[admin._entry(model_id, 0, [], []) for model_id in ids])


@pytest.mark.parametrize(
    ("limit", "after", "before", "page", "more"),
    [
        (20, None, None, ["a", "b", "c", "d"], False),
        (2, None, None, ["a", "b"], True),
        (2, "b", None, ["c", "d"], False),
        (1, "b", None, ["c"], True),
        (2, None, "d", ["b", "c"], True),
        (5, None, "b", ["a"], False),
        (2, "zz", None, [], False),  # an unknown cursor: past the end
    ],
)
def test_anthropic_pages(
    limit: int, after: str | None, before: str | None, page: list[str], more: bool
) -> None:
    result = admin.anthropic_model_page(
        _listing("a", "b", "c", "d"), limit=limit, after_id=after, before_id=before
    )
    assert [model.id for model in result.data] == page
    assert result.has_more is more
    assert (result.first_id, result.last_id) == ((page[0], page[-1]) if page else (None, None))
