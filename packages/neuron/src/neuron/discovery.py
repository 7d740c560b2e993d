"""What this host has: GPUs through NVML (nvidia-ml-py), or a CPU-only host that says why.

NVML is read directly rather than by parsing `nvidia-smi`: the library is the same one the
tool uses and gives typed values. Every NVML call goes through an injected object with the
`pynvml` module's surface, so tests hand in a fake and a host without the library (or
without a driver) becomes a CPU-only host with `cuda_unavailable_reason` saying which.
Static facts are read once (`discovery()`); live readings (`device_health()`) are taken on
demand and never touch the device owner threads, so `/health` never queues behind inference.

A device's index, everywhere in the neuron (requests' `devices`, `/discovery`, `/health`,
`cuda:N`), is what torch calls it, never NVML's index: the two differ under
`CUDA_VISIBLE_DEVICES`, under the default `CUDA_DEVICE_ORDER` (fastest first, where NVML
counts by PCI bus) and for MIG slices, which torch sees as devices and NVML as children of a
card. Devices are matched by UUID; a card in MIG mode is offered as its slices.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import socket
from collections.abc import Sequence
from dataclasses import dataclass
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


def normalise_uuid(uuid: str) -> str:
    """NVML says GPU-<uuid> or MIG-<uuid>, torch the bare <uuid>: compare the bare lowercase form."""
    bare = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        bare = bare.removeprefix(prefix)
    return bare


@dataclass(frozen=True)
class NvmlDevice:
    """A device NVML reports: a whole card, or one MIG slice of `parent`."""

    uuid: str
    handle: Any
    # The card a MIG slice lives on (its compute capability and sensors are the card's).
    parent: Any | None = None


def nvml_devices(nvml: Any) -> list[NvmlDevice]:
    """Every device a CUDA process could be given: each card, or each slice of a card in MIG mode."""
    devices: list[NvmlDevice] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        card = nvml.nvmlDeviceGetHandleByIndex(index)
        slices = _mig_slices(nvml, card)
        if slices:
            devices += [NvmlDevice(_text(nvml.nvmlDeviceGetUUID(h)), h, parent=card) for h in slices]
        else:
            devices.append(NvmlDevice(_text(nvml.nvmlDeviceGetUUID(card)), card))
    return devices


def _mig_slices(nvml: Any, card: Any) -> list[Any]:
    """The card's MIG slices when MIG mode is on; [] for a card without MIG (or without support)."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(card)
    except nvml.NVMLError:  # "Not Supported": a card without MIG
        return []
    if current != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return []
    slices = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(card)):
        try:
            slices.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(card, slot))
        except nvml.NVMLError:  # "Not Found": an empty slot
            continue
    return slices


def match_cuda_devices(
    nvml: Sequence[NvmlDevice], cuda_uuids: Sequence[str]
) -> tuple[dict[int, NvmlDevice], list[str]]:
    """torch ordinal -> NVML device, by UUID, and what could not be matched (torch devices
    NVML does not know: they are left out, since nothing could be measured on them)."""
    by_uuid = {normalise_uuid(device.uuid): device for device in nvml}
    matched: dict[int, NvmlDevice] = {}
    unmatched: list[str] = []
    for ordinal, uuid in enumerate(cuda_uuids):
        device = by_uuid.get(normalise_uuid(uuid))
        if device is None:
            unmatched.append(f"cuda:{ordinal} ({uuid})")
        else:
            matched[ordinal] = device
    return matched, unmatched


def torch_cuda_uuids() -> list[str] | str:
    """The UUID of each device torch can use, by torch ordinal, or why it can use none.

    Asks the CUDA runtime for device properties only (no context is created on this thread).
    """
    try:
        import torch
    except ImportError as exc:
        return f"torch is not installed ({exc})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} cannot use CUDA here (a CPU build, or no usable driver)"
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


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
    """Static host facts and live device readings; `nvml` is None on a CPU-only host.

    `devices` maps each torch ordinal the neuron may use to its NVML device.
    """

    def __init__(
        self,
        nvml: Any | None,
        *,
        devices: dict[int, NvmlDevice] | None = None,
        cuda_unavailable_reason: str | None = None,
    ) -> None:
        self._nvml = nvml
        self.cuda_unavailable_reason = cuda_unavailable_reason
        self._devices = dict(sorted((devices or {}).items())) if nvml is not None else {}

    @classmethod
    def open(cls, nvml: Any | None = None, cuda_uuids: Sequence[str] | str | None = None) -> HostProbe:
        """Initialise NVML (the real `pynvml` unless one is given) and match its devices to
        torch's (`cuda_uuids`, by torch ordinal; asked of torch unless given, or the reason
        torch has none); fall back to CPU-only with a reason."""
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
        try:
            known = nvml_devices(nvml)
        except nvml.NVMLError as exc:
            return cls._cpu_only(f"NVML could not list its devices: {exc}")
        seen_by_torch = torch_cuda_uuids() if cuda_uuids is None else cuda_uuids
        if isinstance(seen_by_torch, str):
            return cls._cpu_only(f"NVML sees {len(known)} device(s) but {seen_by_torch}")
        matched, unmatched = match_cuda_devices(known, seen_by_torch)
        if unmatched:
            log.warning("torch devices that NVML does not report, left unused: %s", ", ".join(unmatched))
        if not matched:
            return cls._cpu_only(
                f"none of the {len(seen_by_torch)} device(s) torch sees matches NVML's "
                f"{[device.uuid for device in known]} (check CUDA_VISIBLE_DEVICES)"
            )
        return cls(nvml, devices=matched)

    @classmethod
    def _cpu_only(cls, reason: str) -> HostProbe:
        log.info("CPU-only host: %s", reason)
        return cls(None, cuda_unavailable_reason=reason)

    @property
    def gpu_indices(self) -> list[int]:
        """The torch ordinals of the GPUs the neuron may use."""
        return list(self._devices)

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
        for index, device in self._devices.items():
            # A MIG slice has no compute capability of its own: its card's.
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(device.parent or device.handle)
            response.devices.append(
                DeviceInfo(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(device.handle)),
                    vram_total_mb=nvml.nvmlDeviceGetMemoryInfo(device.handle).total // MIB,
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
        for index, device in self._devices.items():
            handle = device.handle
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            reading = DeviceHealth(
                index=index, vram_used_mb=memory.used // MIB, vram_free_mb=memory.free // MIB
            )
            # Some boards (and MIG slices) do not report these; the reading stays useful without them.
            with contextlib.suppress(nvml.NVMLError):
                reading.utilization_pct = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            with contextlib.suppress(nvml.NVMLError):
                kind = getattr(nvml, "NVML_TEMPERATURE_GPU", _TEMPERATURE_GPU)
                reading.temp_c = int(nvml.nvmlDeviceGetTemperature(device.parent or handle, kind))
            readings.append(reading)
        return readings

    def supports_bf16(self, device: int) -> bool:
        """Whether the GPU (by torch ordinal) computes in bf16: compute capability 8.0 or later."""
        if self._nvml is None:
            return False
        found = self._devices[device]
        major, minor = self._nvml.nvmlDeviceGetCudaComputeCapability(found.parent or found.handle)
        return (int(major), int(minor)) >= (8, 0)

    def free_bytes(self, device: int | None) -> int:
        """Free memory of a GPU (by torch ordinal) or, for None, available host memory."""
        if device is None or self._nvml is None:
            return read_meminfo().get("MemAvailable", 0)
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._devices[device].handle).free)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.warning("NVML shutdown failed: %s", exc)


def host_memory_free_mb() -> int:
    return read_meminfo().get("MemAvailable", 0) // MIB


__all__ = [
    "HostProbe",
    "NvmlDevice",
    "cuda_version_text",
    "host_memory_free_mb",
    "match_cuda_devices",
    "nvml_devices",
    "read_meminfo",
]
