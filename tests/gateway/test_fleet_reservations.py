"""FleetState's memory books: a reservation outlives a /health reading that crossed its load."""

from __future__ import annotations

from support.fake_neuron import FakeClock

from cortex_core.config.gateway import NeuronEndpoint
from cortex_core.neuron_api import DeviceHealth, DeviceInfo, DiscoveryResponse, HealthResponse, ModelInfo
from cortex_gateway.fleet import FleetState


def fleet_with_one_24gb_device() -> FleetState:
    fleet = FleetState([NeuronEndpoint(name="a", endpoint="http://a:13131")], clock=FakeClock())
    fleet.record_discovery(
        "a",
        DiscoveryResponse(
            hostname="a",
            os="Linux",
            kernel="6",
            devices=[DeviceInfo(index=0, name="GPU", vram_total_mb=24_000)],
        ),
    )
    fleet.record_models("a", [])
    return fleet


def health(free_mb: int) -> HealthResponse:
    return HealthResponse(
        uptime_secs=10.0, devices=[DeviceHealth(index=0, vram_used_mb=24_000 - free_mb, vram_free_mb=free_mb)]
    )


def free(fleet: FleetState) -> int:
    node = fleet.snapshot().node("a")
    assert node is not None
    return node.free_by_device()[0]


def test_a_reading_asked_for_before_the_load_settled_keeps_the_reservation() -> None:
    fleet = fleet_with_one_24gb_device()
    assert fleet.reserve_load("a", "org/m", evict=(), devices=(0,), memory_mb=20_000)
    assert free(fleet) == 4_000

    crossing = fleet.mark()  # a poll asks for /health while the load runs ...
    fleet.load_finished("a", "org/m", 20_000)
    fleet.record_health("a", health(24_000), mark=crossing)  # ... and it measured no model yet
    assert free(fleet) == 4_000  # the reservation stands: the reading predates the load

    fresh = fleet.mark()
    fleet.record_models("a", [ModelInfo(id="org/m", harness="torch", status="loaded", vram_used_mb=20_000)])
    fleet.record_health("a", health(4_000), mark=fresh)
    assert free(fleet) == 4_000  # now measured, and the reservation is gone (not counted twice)


def test_a_claim_is_all_or_nothing() -> None:
    fleet = fleet_with_one_24gb_device()
    fleet.record_models("a", [ModelInfo(id="org/old", harness="torch", status="loaded", vram_used_mb=10_000)])
    fleet.request_started("a", "org/old")
    assert not fleet.reserve_load("a", "org/new", evict=("org/old",), devices=(0,), memory_mb=20_000)
    node = fleet.snapshot().node("a")
    assert node is not None and node.models["org/old"].status == "loaded" and "org/new" not in node.models
    fleet.request_finished("a", "org/old")
    assert fleet.reserve_load("a", "org/new", evict=("org/old",), devices=(0,), memory_mb=20_000)
    node = fleet.snapshot().node("a")
    assert node is not None
    assert (node.models["org/old"].status, node.models["org/new"].status) == ("unloading", "loading")
