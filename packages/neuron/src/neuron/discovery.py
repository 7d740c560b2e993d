"""What this host has: GPUs through NVML (nvidia-ml-py), or a CPU-only host that says why.

NVML is read directly rather than by parsing `nvidia-smi`: the library is the same one the
tool uses and gives typed values. Every NVML call goes through an injected object with the
`pynvml` module's surface, so tests hand in a fake and a host without the library (or
without a driver) becomes a CPU-only host with `cuda_unavailable_reason` saying which.
Static facts are read once (`discovery()`); live readings (`device_health()`) are taken on
demand and never touch the device owner threads, so `/health` never queues behind inference.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import socket
from typing import Any

from cortex_core.neuron_api import DeviceHealth, DeviceInfo, DiscoveryResponse

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# NVML_TEMPERATURE_GPU in pynvml; a fake NVML object may leave it out.
_TEMPERATURE_GPU = 0


def _text(value: Any) -> str:
    """NVML strings are `bytes` in old bindings and `str` in new ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


def cuda_version_text(driver_cuda: int) -> str:
    """NVML reports the driver's CUDA version as 1000*major + 10*minor (12080 -> "12.8")."""
    return f"{driver_cuda // 1000}.{(driver_cuda % 1000) // 10}"


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """Host memory in bytes by /proc/meminfo key (MemTotal, MemAvailable, ...); {} when unreadable."""
    values: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
    return values


class HostProbe:
    """Static host facts and live device readings; `nvml` is None on a CPU-only host."""

    def __init__(self, nvml: Any | None, *, cuda_unavailable_reason: str | None = None) -> None:
        self._nvml = nvml
        self.cuda_unavailable_reason = cuda_unavailable_reason
        self._handles: list[Any] = []
        if nvml is not None:
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    @classmethod
    def open(cls, nvml: Any | None = None) -> HostProbe:
        """Initialise NVML (the real `pynvml` unless one is given); fall back to CPU-only with a reason."""
        if nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                return cls._cpu_only(f"nvidia-ml-py is not installed ({exc}); install it to use GPUs")
            nvml = pynvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return cls._cpu_only(
                f"NVML could not be initialised: {exc} (no NVIDIA driver or library on this host)"
            )
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            return cls._cpu_only(f"NVML could not count devices: {exc}")
        if count == 0:
            return cls._cpu_only("NVML found no NVIDIA devices")
        return cls(nvml)

    @classmethod
    def _cpu_only(cls, reason: str) -> HostProbe:
        log.info("CPU-only host: %s", reason)
        return cls(None, cuda_unavailable_reason=reason)

    @property
    def gpu_indices(self) -> list[int]:
        return list(range(len(self._handles)))

    def discovery(self, harnesses: list[str]) -> DiscoveryResponse:
        uname = platform.uname()
        response = DiscoveryResponse(
            hostname=socket.gethostname() or uname.node or "unknown",
            os=uname.system or "unknown",
            kernel=uname.release or "unknown",
            harnesses=list(harnesses),
            cuda_unavailable_reason=self.cuda_unavailable_reason,
            host_memory_total_mb=read_meminfo().get("MemTotal", 0) // MIB,
        )
        nvml = self._nvml
        if nvml is None:
            return response
        response.driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        try:
            response.cuda_version = cuda_version_text(nvml.nvmlSystemGetCudaDriverVersion())
        except nvml.NVMLError as exc:
            log.warning("NVML has no CUDA driver version: %s", exc)
        for index, handle in enumerate(self._handles):
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            response.devices.append(
                DeviceInfo(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    vram_total_mb=nvml.nvmlDeviceGetMemoryInfo(handle).total // MIB,
                    compute_capability=f"{major}.{minor}",
                )
            )
        return response

    def device_health(self) -> list[DeviceHealth]:
        """Memory, utilisation and temperature per GPU now; [] on a CPU-only host."""
        nvml = self._nvml
        if nvml is None:
            return []
        readings = []
        for index, handle in enumerate(self._handles):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            reading = DeviceHealth(
                index=index, vram_used_mb=memory.used // MIB, vram_free_mb=memory.free // MIB
            )
            # Some boards (and MIG slices) do not report these; the reading stays useful without them.
            with contextlib.suppress(nvml.NVMLError):
                reading.utilization_pct = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            with contextlib.suppress(nvml.NVMLError):
                kind = getattr(nvml, "NVML_TEMPERATURE_GPU", _TEMPERATURE_GPU)
                reading.temp_c = int(nvml.nvmlDeviceGetTemperature(handle, kind))
            readings.append(reading)
        return readings

    def free_bytes(self, device: int | None) -> int:
        """Free memory of a GPU (by index) or, for None, available host memory."""
        if device is None or self._nvml is None:
            return read_meminfo().get("MemAvailable", 0)
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handles[device]).free)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.warning("NVML shutdown failed: %s", exc)


def host_memory_free_mb() -> int:
    return read_meminfo().get("MemAvailable", 0) // MIB


__all__ = ["HostProbe", "cuda_version_text", "host_memory_free_mb", "read_meminfo"]
