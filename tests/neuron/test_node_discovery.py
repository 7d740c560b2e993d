"""Discovery with NVML absent and with a fake NVML; /discovery and /health in process."""

from __future__ import annotations

import httpx2
import msgspec
import pytest
from support.fake_nvml import FakeGpu, FakeNvml, cuda_view, mig_slice

from cortex_core.config.neuron import NeuronConfig
from cortex_core.neuron_api import DiscoveryResponse
from neuron.app import create_app
from neuron.discovery import HostProbe, cuda_version_text, match_cuda_devices, normalise_uuid, nvml_devices

MIB = 1024 * 1024


def test_without_nvml_the_host_is_cpu_only_and_says_why() -> None:
    probe = HostProbe.open(FakeNvml(init_error="NVML Shared Library Not Found"))
    discovery = probe.discovery(["torch"])
    assert discovery.devices == []
    assert discovery.driver_version is None
    assert discovery.cuda_unavailable_reason is not None
    assert "NVML Shared Library Not Found" in discovery.cuda_unavailable_reason
    assert discovery.harnesses == ["torch"]
    assert discovery.host_memory_total_mb > 0
    assert probe.device_health() == []
    assert probe.free_bytes(None) > 0


def test_real_pynvml_on_this_host_does_not_crash() -> None:
    # This machine has no NVIDIA driver: the real binding must fall back, not raise.
    probe = HostProbe.open()
    discovery = probe.discovery(["torch"])
    assert (discovery.devices == []) == (discovery.cuda_unavailable_reason is not None)
    probe.close()


def test_no_devices_counts_as_cpu_only() -> None:
    probe = HostProbe.open(FakeNvml(gpus=[]))
    assert probe.cuda_unavailable_reason == "NVML found no NVIDIA devices"


def test_fake_nvml_gpus_are_reported() -> None:
    nvml = FakeNvml(
        gpus=[FakeGpu(), FakeGpu(name="NVIDIA Fake 80GB", total_mb=81920, used_mb=0, temperature=-1)]
    )
    probe = HostProbe.open(nvml, cuda_uuids=nvml.cuda_uuids())
    discovery = probe.discovery(["torch"])
    assert discovery.driver_version == "570.86.16"
    assert discovery.cuda_version == "12.8"
    assert discovery.cuda_unavailable_reason is None
    assert [(d.index, d.name, d.vram_total_mb, d.compute_capability) for d in discovery.devices] == [
        (0, "NVIDIA Fake 24GB", 24576, "8.9"),
        (1, "NVIDIA Fake 80GB", 81920, "8.9"),
    ]
    health = probe.device_health()
    assert [(h.index, h.vram_used_mb, h.vram_free_mb, h.utilization_pct, h.temp_c) for h in health] == [
        (0, 1024, 23552, 7, 41),
        (1, 0, 81920, 7, None),  # a sensor that is not supported leaves the field empty
    ]
    assert probe.free_bytes(1) == 81920 * 1024 * 1024
    probe.close()
    assert not nvml.initialised


def test_cuda_version_text() -> None:
    assert [cuda_version_text(v) for v in (12080, 11040, 13000)] == ["12.8", "11.4", "13.0"]


async def test_discovery_and_health_routes_with_a_fake_gpu() -> None:
    nvml = FakeNvml(gpus=[FakeGpu()])
    probe = HostProbe.open(nvml, cuda_uuids=nvml.cuda_uuids())
    app = create_app(NeuronConfig(), probe=probe, serving_routes=lambda lookup, config: [])
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as client:
        discovery = msgspec.convert((await client.get("/discovery")).json(), DiscoveryResponse)
        assert discovery.devices[0].name == "NVIDIA Fake 24GB"
        response = await client.get("/health")
        assert response.status_code == 200
        body = response.json()
        assert body["devices"] == [
            {"index": 0, "vram_used_mb": 1024, "vram_free_mb": 23552, "utilization_pct": 7, "temp_c": 41}
        ]
        assert body["activation"]["state"] == "ready"
        assert body["models"] == []
        assert body["uptime_secs"] >= 0
        assert body["host_memory_free_mb"] > 0


def four_cards() -> list[FakeGpu]:
    """NVML (PCI) order: each card told apart by its free memory; card 2 is the fastest."""
    return [
        FakeGpu(name=f"card {i}", total_mb=10_000 * (i + 1), used_mb=0, speed=10 if i == 2 else 0)
        for i in range(4)
    ]


@pytest.mark.parametrize(
    ("visible", "order", "expected"),
    [
        # torch ordinal -> NVML card
        (None, "PCI_BUS_ID", [0, 1, 2, 3]),
        (None, "FASTEST_FIRST", [2, 0, 1, 3]),  # CUDA's default order: not NVML's
        ("3,1", "PCI_BUS_ID", [3, 1]),
        ("1,0", "FASTEST_FIRST", [0, 2]),  # positions in the fastest-first order
        ("uuid:1,uuid:3", "FASTEST_FIRST", [1, 3]),
        ("2,9,0", "PCI_BUS_ID", [2]),  # an entry that matches nothing ends the list
    ],
)
def test_cuda_ordinals_are_torch_s_matched_to_nvml_by_uuid(
    visible: str | None, order: str, expected: list[int]
) -> None:
    cards = four_cards()
    if visible is not None:
        visible = ",".join(
            cards[int(e.removeprefix("uuid:"))].uuid if e.startswith("uuid:") else e
            for e in visible.split(",")
        )
    nvml = FakeNvml(gpus=cards)
    probe = HostProbe.open(nvml, cuda_uuids=cuda_view(cards, visible, order))
    assert probe.gpu_indices == list(range(len(expected)))
    # Every reading by torch ordinal is that card's: free memory, discovery, health.
    assert [probe.free_bytes(i) // MIB for i in probe.gpu_indices] == [10_000 * (c + 1) for c in expected]
    assert [d.name for d in probe.discovery(["torch"]).devices] == [f"card {c}" for c in expected]
    assert [h.index for h in probe.device_health()] == probe.gpu_indices
    assert [h.vram_free_mb for h in probe.device_health()] == [10_000 * (c + 1) for c in expected]


def test_mig_slices_are_devices_of_their_own() -> None:
    sliced = FakeGpu(
        name="NVIDIA A100 80GB",
        total_mb=81920,
        compute_capability=(8, 0),
        mig_slices=[
            mig_slice("NVIDIA A100 80GB MIG 3g.40gb", 40192, used_mb=192),
            mig_slice("NVIDIA A100 80GB MIG 2g.20gb", 19968),
        ],
    )
    whole = FakeGpu(name="NVIDIA L4", total_mb=23034)
    nvml = FakeNvml(gpus=[sliced, whole])
    assert [d.uuid for d in nvml_devices(nvml)] == [s.uuid for s in sliced.mig_slices] + [whole.uuid]
    # The process is given the second slice and the L4, in that order.
    visible = f"{sliced.mig_slices[1].uuid},{whole.uuid}"
    probe = HostProbe.open(nvml, cuda_uuids=cuda_view(nvml.gpus, visible))
    devices = probe.discovery(["torch"]).devices
    assert [(d.index, d.name, d.vram_total_mb, d.compute_capability) for d in devices] == [
        (0, "NVIDIA A100 80GB MIG 2g.20gb", 19968, "8.0"),  # the card's capability
        (1, "NVIDIA L4", 23034, "8.9"),
    ]
    assert probe.free_bytes(0) == 19968 * MIB
    assert [h.temp_c for h in probe.device_health()] == [41, 41]  # a slice reads its card's sensor


def test_torch_devices_nvml_does_not_know_are_left_out_and_none_at_all_is_cpu_only() -> None:
    cards = four_cards()
    nvml = FakeNvml(gpus=cards)
    stranger = "0badc0de-0000-4000-8000-000000000000"
    probe = HostProbe.open(nvml, cuda_uuids=[stranger, normalise_uuid(cards[1].uuid)])
    assert probe.gpu_indices == [1]  # cuda:1 is still card 1; cuda:0 cannot be measured
    assert probe.free_bytes(1) == 20_000 * MIB
    matched, unmatched = match_cuda_devices(nvml_devices(nvml), [stranger])
    assert matched == {} and unmatched == [f"cuda:0 ({stranger})"]

    none_match = HostProbe.open(FakeNvml(gpus=four_cards()), cuda_uuids=[stranger])
    assert none_match.gpu_indices == []
    assert "CUDA_VISIBLE_DEVICES" in (none_match.cuda_unavailable_reason or "")
    cpu_torch = HostProbe.open(FakeNvml(gpus=four_cards()), cuda_uuids="torch 2.9.0+cpu cannot use CUDA here")
    assert cpu_torch.gpu_indices == []
    assert "NVML sees 4 device(s) but torch 2.9.0+cpu" in (cpu_torch.cuda_unavailable_reason or "")
