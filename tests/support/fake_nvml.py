"""A stand-in for the `pynvml` module: the calls HostProbe makes, answering for made-up GPUs."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

MIB = 1024 * 1024


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

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        if gpu.temperature < 0:
            raise NVMLError("Not Supported")
        return gpu.temperature
