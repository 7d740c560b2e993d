"""A stand-in for the `pynvml` module: the calls HostProbe makes, answering for made-up GPUs.

`cuda_view` is the other half of a fake host: the device UUIDs torch would list, by its
ordinal, under given `CUDA_VISIBLE_DEVICES` and `CUDA_DEVICE_ORDER` values (CUDA's rules,
reduced to what the tests need).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

MIB = 1024 * 1024
NVML_DEVICE_MIG_ENABLE = 1


def _fake_uuid(kind: str) -> str:
    return f"{kind}-{uuid.uuid4()}"


class NVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    name: str = "NVIDIA Fake 24GB"
    total_mb: int = 24576
    used_mb: int = 1024
    compute_capability: tuple[int, int] = (8, 9)
    utilization: int = 7
    temperature: int = 41
    uuid: str = field(default_factory=lambda: _fake_uuid("GPU"))
    # CUDA's FASTEST_FIRST order puts higher first (ties: PCI bus order, i.e. NVML's).
    speed: int = 0
    # MIG mode is on when the card has slices; each is a device of its own for CUDA.
    mig_slices: list[FakeGpu] = field(default_factory=list)


def mig_slice(name: str, total_mb: int, used_mb: int = 0) -> FakeGpu:
    return FakeGpu(name=name, total_mb=total_mb, used_mb=used_mb, uuid=_fake_uuid("MIG"))


def cuda_view(gpus: list[FakeGpu], visible: str | None = None, order: str = "FASTEST_FIRST") -> list[str]:
    """UUIDs (bare, as torch prints them) of the devices CUDA would number 0, 1, ... .

    Cards are ordered fastest first unless `order` is PCI_BUS_ID; `visible` (the
    CUDA_VISIBLE_DEVICES value) picks and reorders them by position in that order or by UUID
    (a MIG slice only by its UUID); like CUDA, an entry that matches nothing ends the list.
    """
    ordered = list(gpus) if order == "PCI_BUS_ID" else sorted(gpus, key=lambda gpu: -gpu.speed)
    if visible is None:
        chosen = [gpu for gpu in ordered if not gpu.mig_slices]
    else:
        everything = [*ordered, *(s for gpu in gpus for s in gpu.mig_slices)]
        chosen = []
        for entry in (part.strip() for part in visible.split(",")):
            if entry.isdigit() and int(entry) < len(ordered):
                chosen.append(ordered[int(entry)])
                continue
            found = [d for d in everything if d.uuid.lower().startswith(entry.lower())]
            if len(found) != 1:
                break
            chosen.append(found[0])
    return [gpu.uuid.split("-", 1)[1] for gpu in chosen]


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=list)
    # Set to make nvmlInit fail like a host without a driver.
    init_error: str | None = None
    driver: str = "570.86.16"
    cuda_driver: int = 12080
    initialised: bool = False
    NVMLError: type[Exception] = NVMLError
    NVML_TEMPERATURE_GPU: int = 0
    NVML_DEVICE_MIG_ENABLE: int = NVML_DEVICE_MIG_ENABLE

    def nvmlInit(self) -> None:
        if self.init_error:
            raise NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda_driver

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> bytes:
        return gpu.name.encode()  # old bindings return bytes

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> Any:
        return SimpleNamespace(
            total=gpu.total_mb * MIB, used=gpu.used_mb * MIB, free=(gpu.total_mb - gpu.used_mb) * MIB
        )

    def nvmlDeviceGetCudaComputeCapability(self, gpu: FakeGpu) -> tuple[int, int]:
        return gpu.compute_capability

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        return SimpleNamespace(gpu=gpu.utilization, memory=0)

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return gpu.uuid

    def nvmlDeviceGetMigMode(self, gpu: FakeGpu) -> tuple[int, int]:
        if gpu.uuid.startswith("MIG-"):
            raise NVMLError("Not Supported")
        mode = NVML_DEVICE_MIG_ENABLE if gpu.mig_slices else 0
        return mode, mode

    def nvmlDeviceGetMaxMigDeviceCount(self, gpu: FakeGpu) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, gpu: FakeGpu, index: int) -> FakeGpu:
        if index >= len(gpu.mig_slices):
            raise NVMLError("Not Found")
        return gpu.mig_slices[index]

    def cuda_uuids(self) -> list[str]:
        """What torch lists with no CUDA_VISIBLE_DEVICES, in PCI order (every fake card equally fast)."""
        return cuda_view(self.gpus)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        if gpu.temperature < 0:
            raise NVMLError("Not Supported")
        return gpu.temperature
