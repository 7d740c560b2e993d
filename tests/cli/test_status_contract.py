"""`cortex status` reads what the real gateway app answers (in process, over fake neurons).

The CLI decodes /admin/fleet with its own lenient Structs (a workstation has no
cortex-gateway installed); this test keeps the two sides in step.
"""

from __future__ import annotations

from support.fake_neuron import FakeClock, FakeNeuron, gateway

from cortex_cli.status import render_models_list, render_status
from cortex_core.config.catalogue import ModelCatalogue, ModelProfile


async def test_status_table_from_the_real_admin_route() -> None:
    gpu = FakeNeuron("gpu1", devices_mb=[24_000], sizes_mb={"org/big": 12_000})
    gpu.preload("org/big")
    cpu = FakeNeuron("cpu1", host_memory_mb=32_000)
    cpu.down = True
    catalogue = ModelCatalogue([ModelProfile(id="org/big", vram_mb=12_000)], {"big": "org/big"})
    clock = FakeClock()
    async with gateway([gpu, cpu], catalogue, clock=clock) as (_, http):
        clock.advance(90)
        fleet = (await http.get("/admin/fleet")).json()
        listing = (await http.get("/v1/models")).json()

    table = render_status(fleet, endpoint="http://gw:31313")
    lines = table.splitlines()
    assert lines[0].startswith("cortex at http://gw:31313 (")
    assert "nodes healthy" in lines[0]
    assert any("gpu1" in line and "healthy" in line and "http://gpu1:13131" in line for line in lines)
    assert any("cpu1" in line and "UNHEALTHY" in line for line in lines)
    assert any("gpu1" in line and "0 Fake GPU" in line and "11.7 / 23.4 GiB (50%)" in line for line in lines)
    assert any(
        line.split()[:4] == ["org/big", "loaded", "gpu1", "11.7"] and line.rstrip().endswith(("-", "ago"))
        for line in lines
    ), table

    models = render_models_list(listing)
    assert any(line.split()[:3] == ["org/big", "yes", "gpu1(loaded)"] for line in models.splitlines()), models
    assert any(line.split()[:2] == ["big", "yes"] for line in models.splitlines()), models


async def test_status_shows_a_recovering_model_with_its_next_reload() -> None:
    gpu = FakeNeuron("gpu1", devices_mb=[24_000], sizes_mb={"org/big": 12_000})
    gpu.preload("org/big")
    gpu.models["org/big"].status = "poisoned"
    gpu.models["org/big"].error = "CUDA error: an illegal memory access"
    catalogue = ModelCatalogue([ModelProfile(id="org/big", vram_mb=12_000)], {})
    clock = FakeClock()
    async with gateway([gpu], catalogue, clock=clock, router={"recovery_backoff_secs": 8.0}) as (_, http):
        fleet = (await http.get("/admin/fleet")).json()
        listing = (await http.get("/v1/models")).json()

    table = render_status(fleet, endpoint="http://gw:31313")  # "now" is the report's generated_at
    row = next(line for line in table.splitlines() if line.strip().startswith("org/big"))
    assert "recovering (reload 1 in 8s): CUDA error: an illegal memory access" in row, table
    assert "gpu1(recovering)" in render_models_list(listing)
