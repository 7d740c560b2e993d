"""Discovery with NVML absent and with a fake NVML; /discovery and /health in process."""

from __future__ import annotations

import httpx2
import msgspec
from support.fake_nvml import FakeGpu, FakeNvml

from cortex_core.config.neuron import NeuronConfig
from cortex_core.neuron_api import DiscoveryResponse
from neuron.app import create_app
from neuron.discovery import HostProbe, cuda_version_text


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
    probe = HostProbe.open(nvml)
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
    probe = HostProbe.open(FakeNvml(gpus=[FakeGpu()]))
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
