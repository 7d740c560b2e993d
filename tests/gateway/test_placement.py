"""Table tests for placement: a pure function of (model, catalogue, fleet snapshot, now, policy)."""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import pytest

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.neuron_api import DeviceHealth, DeviceInfo, DiscoveryResponse
from cortex_gateway.fleet import FleetSnapshot, ModelView, NodeView
from cortex_gateway.placement import ColdLoad, Decision, PlacementPolicy, Refuse, ServeOn, place

NOW = 50_000.0
POLICY = PlacementPolicy(min_residency_secs=60.0, failed_load_backoff_secs=30.0)


def polled_node(
    name: str,
    *,
    discovery: DiscoveryResponse | None,
    device_health: tuple[DeviceHealth, ...] = (),
    host_memory_free_mb: int = 0,
    models: Sequence[ModelView] = (),
    healthy: bool = True,
    in_flight: dict[str, int] | None = None,
) -> NodeView:
    """A node as the poller last saw it, at NOW and without failures; GPU and CPU nodes differ
    only in what they report."""
    return NodeView(
        name=name,
        endpoint=f"http://{name}:13131",
        healthy=healthy,
        consecutive_failures=0,
        last_error=None,
        last_poll=NOW,
        discovery=discovery,
        device_health=device_health,
        host_memory_free_mb=host_memory_free_mb,
        models=MappingProxyType({m.id: m for m in models}),
        memory_adjust_mb=MappingProxyType({}),
        in_flight=MappingProxyType(in_flight or {}),
    )


def gpu_node(
    name: str,
    *,
    devices: list[tuple[int, int]] = [(24_000, 24_000)],  # noqa: B006 - read only
    models: list[ModelView] = (),  # type: ignore[assignment]
    healthy: bool = True,
    discovered: bool = True,
    in_flight: dict[str, int] | None = None,
) -> NodeView:
    """`devices`: (total MB, free MB) per device; `in_flight`: this gateway's requests per model."""
    discovery = DiscoveryResponse(
        hostname=name,
        os="Linux",
        kernel="6",
        devices=[
            DeviceInfo(index=i, name="GPU", vram_total_mb=total) for i, (total, _) in enumerate(devices)
        ],
    )
    return polled_node(
        name,
        discovery=discovery if discovered else None,
        device_health=tuple(
            DeviceHealth(index=i, vram_used_mb=total - free, vram_free_mb=free)
            for i, (total, free) in enumerate(devices)
        ),
        models=models,
        healthy=healthy,
        in_flight=in_flight,
    )


def cpu_node(
    name: str, *, total_mb: int = 16_000, free_mb: int = 8_000, models: list[ModelView] = ()
) -> NodeView:  # type: ignore[assignment]
    discovery = DiscoveryResponse(hostname=name, os="Linux", kernel="6", host_memory_total_mb=total_mb)
    return polled_node(name, discovery=discovery, host_memory_free_mb=free_mb, models=models)


def loaded(
    model_id: str,
    *,
    mb: int | None = 10_000,
    devices: tuple[int, ...] = (0,),
    neuron_in_flight: int = 0,
    queue: int = 0,
    loaded_ago: float = 3600.0,
    used_ago: float | None = 100.0,
    status: str = "loaded",
    error: str | None = None,
    failed_ago: float | None = None,
) -> ModelView:
    return ModelView(
        id=model_id,
        status=status,
        devices=devices,
        memory_mb=mb,
        neuron_in_flight=neuron_in_flight,
        queue_depth=queue,
        loaded_at=NOW - loaded_ago,
        last_used=None if used_ago is None else NOW - used_ago,
        error=error,
        failed_at=None if failed_ago is None else NOW - failed_ago,
    )


CATALOGUE = ModelCatalogue(
    [
        ModelProfile(id="org/small", vram_mb=6_000),
        ModelProfile(id="org/big", vram_mb=20_000),
        ModelProfile(id="org/huge", vram_mb=60_000, min_devices=2),
        ModelProfile(id="org/pinned", vram_mb=6_000, pinned_on=["b"]),
        ModelProfile(id="org/floor", vram_mb=6_000, min_device_vram_mb=40_000),
        ModelProfile(id="org/vip", vram_mb=20_000, residency_priority=500),
        ModelProfile(id="org/tiny", vram_mb=1_000),
        ModelProfile(id="org/nosize"),
    ],
    {"small": "org/small"},
)


CASES: list[tuple[str, str, list[NodeView], Decision]] = [
    (
        "loaded replica is served",
        "org/small",
        [gpu_node("a", models=[loaded("org/small")]), gpu_node("b")],
        ServeOn(("a",)),
    ),
    (
        "least busy replica first, ties by name",
        "org/small",
        [
            gpu_node("a", models=[loaded("org/small")], in_flight={"org/small": 3}),
            gpu_node("b", models=[loaded("org/small")], in_flight={"org/small": 1}),
            gpu_node("c", models=[loaded("org/small")], in_flight={"org/small": 1}),
        ],
        ServeOn(("b", "c", "a")),
    ),
    (
        "the neuron's queue counts as busy",
        "org/small",
        [
            gpu_node("a", models=[loaded("org/small", neuron_in_flight=2, queue=5)]),
            gpu_node("b", models=[loaded("org/small")], in_flight={"org/small": 4}),
        ],
        ServeOn(("b", "a")),
    ),
    (
        "replica on an unhealthy node is skipped",
        "org/small",
        [gpu_node("a", models=[loaded("org/small")], healthy=False), gpu_node("b")],
        ColdLoad("b", devices=(0,)),
    ),
    (
        "a load in progress is joined, not duplicated",
        "org/small",
        [gpu_node("a", models=[loaded("org/small", status="loading")]), gpu_node("b")],
        ColdLoad("a", join_existing=True),
    ),
    (
        "cold load on the node with the most free memory",
        "org/small",
        [gpu_node("a", devices=[(24_000, 8_000)]), gpu_node("b", devices=[(24_000, 20_000)])],
        ColdLoad("b", devices=(0,)),
    ),
    (
        "a node that fits without eviction beats one that needs it",
        "org/big",
        [
            gpu_node("a", devices=[(48_000, 4_000)], models=[loaded("org/small", mb=30_000)]),
            gpu_node("z", devices=[(24_000, 22_000)]),
        ],
        ColdLoad("z", devices=(0,)),
    ),
    (
        "cold load after evicting the LRU idle resident",
        "org/big",
        [
            gpu_node(
                "a",
                devices=[(24_000, 4_000)],
                models=[
                    loaded("org/small", used_ago=10, mb=6_000),
                    loaded("org/tiny", used_ago=900, mb=16_000),
                ],
            )
        ],
        ColdLoad("a", evict=("org/tiny",), devices=(0,)),
    ),
    (
        "resident footprint falls back to the catalogue's vram_mb",
        "org/big",
        [gpu_node("a", devices=[(24_000, 16_000)], models=[loaded("org/small", mb=None)])],
        ColdLoad("a", evict=("org/small",), devices=(0,)),
    ),
    (
        "second device picked when the first is full",
        "org/big",
        [gpu_node("a", devices=[(24_000, 1_000), (24_000, 23_000)])],
        ColdLoad("a", devices=(1,)),
    ),
    (
        "tensor parallel needs min_devices devices",
        "org/huge",
        [
            gpu_node("a", devices=[(40_000, 40_000), (40_000, 39_000)]),
            gpu_node("b", devices=[(80_000, 80_000)]),
        ],
        ColdLoad("a", devices=(0, 1)),
    ),
    (
        "pinned model goes only to its node",
        "org/pinned",
        [gpu_node("a", devices=[(80_000, 80_000)]), gpu_node("b")],
        ColdLoad("b", devices=(0,)),
    ),
    (
        "model without a size is placed; the neuron's pre-flight decides",
        "org/nosize",
        [gpu_node("a", devices=[(24_000, 0)])],
        ColdLoad("a", devices=(0,)),
    ),
    (
        "CPU-only neuron hosts a single-device model in host memory",
        "org/small",
        [cpu_node("laptop")],
        ColdLoad("laptop"),
    ),
    (
        "CPU-only neuron evicts an idle resident to make room",
        "org/small",
        [cpu_node("laptop", free_mb=2_000, models=[loaded("org/tiny", devices=(), mb=5_000)])],
        ColdLoad("laptop", evict=("org/tiny",)),
    ),
    (
        "GPU node preferred over nothing; CPU node cannot host a TP model",
        "org/huge",
        [cpu_node("laptop", total_mb=512_000, free_mb=512_000)],
        Refuse(
            404,
            "model_not_placeable",
            "model 'org/huge' is in the catalogue but no neuron can host it "
            "(laptop: needs 2 GPU(s); the neuron is CPU-only)",
        ),
    ),
    (
        "no neuron can ever host it: 404 naming each node's reason",
        "org/floor",
        [gpu_node("a"), gpu_node("b", devices=[(24_000, 24_000), (24_000, 24_000)])],
        Refuse(
            404,
            "model_not_placeable",
            "model 'org/floor' is in the catalogue but no neuron can host it "
            "(a: needs 1 device(s) with at least 40000 MB each; it has 0 of 1; "
            "b: needs 1 device(s) with at least 40000 MB each; it has 0 of 2)",
        ),
    ),
    (
        "pinned model whose node is missing: 404 naming the pin",
        "org/pinned",
        [gpu_node("a")],
        Refuse(
            404,
            "model_not_placeable",
            "model 'org/pinned' is in the catalogue but no neuron can host it (a: pinned to b)",
        ),
    ),
    (
        "unknown model: 404 model_not_found pointing at /v1/models",
        "org/nope",
        [gpu_node("a")],
        Refuse(
            404,
            "model_not_found",
            "The model 'org/nope' does not exist on any neuron and is not in the catalogue; "
            "GET /v1/models lists the models this gateway can serve.",
        ),
    ),
]


@pytest.mark.parametrize(("model", "nodes", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_place(model: str, nodes: list[NodeView], expected: Decision) -> None:
    assert place(model, CATALOGUE, FleetSnapshot(tuple(nodes), NOW), NOW, POLICY) == expected


# Transient refusals: the status, code and Retry-After matter; the message is checked loosely.
TRANSIENT: list[tuple[str, str, list[NodeView], int, str, float, str]] = [
    (
        "feasible node unhealthy: 503 retry",
        "org/small",
        [gpu_node("a", healthy=False), gpu_node("b", healthy=False)],
        503,
        "service_unavailable",
        5.0,
        "no healthy neuron",
    ),
    (
        "the only feasible node is unhealthy while another is healthy",
        "org/pinned",
        [gpu_node("a"), gpu_node("b", healthy=False)],
        503,
        "service_unavailable",
        3.0,
        "currently unhealthy",
    ),
    (
        "thrash guard: recently loaded resident is not evicted, retry when its residency ends",
        "org/big",
        [gpu_node("a", devices=[(24_000, 4_000)], models=[loaded("org/small", loaded_ago=45, mb=20_000)])],
        503,
        "insufficient_memory",
        15.0,
        "recently loaded",
    ),
    (
        "busy resident blocks: 503 retry",
        "org/big",
        [
            gpu_node(
                "a",
                devices=[(24_000, 4_000)],
                models=[loaded("org/small", mb=20_000)],
                in_flight={"org/small": 1},
            )
        ],
        503,
        "insufficient_memory",
        5.0,
        "busy",
    ),
    (
        "higher-priority resident is not displaced",
        "org/big",
        [gpu_node("a", devices=[(24_000, 4_000)], models=[loaded("org/vip", mb=20_000)])],
        503,
        "insufficient_memory",
        5.0,
        "higher priority",
    ),
    (
        "recent failed load: the neuron's reason, 502",
        "org/small",
        [gpu_node("a", models=[loaded("org/small", status="failed", error="out of memory", failed_ago=5)])],
        502,
        "model_load_failed",
        25.0,
        "out of memory",
    ),
    (
        "poisoned replica: 503 recovering",
        "org/small",
        [gpu_node("a", models=[loaded("org/small", status="poisoned", error="NCCL timeout")])],
        503,
        "model_recovering",
        5.0,
        "NCCL timeout",
    ),
    (
        "topology not reported yet",
        "org/small",
        [gpu_node("a", discovered=False)],
        503,
        "service_unavailable",
        3.0,
        "topology",
    ),
]


@pytest.mark.parametrize(
    ("model", "nodes", "status", "code", "retry_after", "says"),
    [c[1:] for c in TRANSIENT],
    ids=[c[0] for c in TRANSIENT],
)
def test_place_refuses_transiently(
    model: str, nodes: list[NodeView], status: int, code: str, retry_after: float, says: str
) -> None:
    decision = place(model, CATALOGUE, FleetSnapshot(tuple(nodes), NOW), NOW, POLICY)
    assert isinstance(decision, Refuse)
    assert (decision.status, decision.code) == (status, code)
    assert decision.retry_after == pytest.approx(retry_after)
    assert says in decision.message
    assert model in decision.message


def test_failed_load_is_retried_after_the_back_off() -> None:
    node = gpu_node("a", models=[loaded("org/small", status="failed", error="boom", failed_ago=31)])
    decision = place("org/small", CATALOGUE, FleetSnapshot((node,), NOW), NOW, POLICY)
    assert decision == ColdLoad("a", devices=(0,))


def test_failed_on_one_node_loads_on_another() -> None:
    nodes = (
        gpu_node("a", models=[loaded("org/small", status="failed", error="boom", failed_ago=1)]),
        gpu_node("b"),
    )
    assert place("org/small", CATALOGUE, FleetSnapshot(nodes, NOW), NOW, POLICY) == ColdLoad(
        "b", devices=(0,)
    )


def test_model_outside_the_catalogue_is_served_where_loaded() -> None:
    nodes = (gpu_node("a", models=[loaded("local/adhoc")]),)
    assert place("local/adhoc", CATALOGUE, FleetSnapshot(nodes, NOW), NOW, POLICY) == ServeOn(("a",))


def test_model_outside_the_catalogue_on_an_unhealthy_node_is_transient() -> None:
    nodes = (gpu_node("a", models=[loaded("local/adhoc")], healthy=False),)
    decision = place("local/adhoc", CATALOGUE, FleetSnapshot(nodes, NOW), NOW, POLICY)
    assert isinstance(decision, Refuse)
    assert (decision.status, decision.retry_after) == (503, 3.0)


def test_alternating_models_do_not_thrash() -> None:
    """A just loaded, B requested: B waits (503) instead of evicting A; later B may evict A."""
    a_just_loaded = gpu_node(
        "a", devices=[(24_000, 4_000)], models=[loaded("org/big", loaded_ago=1, mb=20_000)]
    )
    first = place("org/vip", CATALOGUE, FleetSnapshot((a_just_loaded,), NOW), NOW, POLICY)
    assert isinstance(first, Refuse)
    assert first.status == 503
    later = NOW + 60
    second = place("org/vip", CATALOGUE, FleetSnapshot((a_just_loaded,), later), later, POLICY)
    assert second == ColdLoad("a", evict=("org/big",), devices=(0,))
