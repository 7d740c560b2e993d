"""The neuron's HTTP API: what the gateway and `cortex status` read and send.

Shapes follow the reference neuron (shared/reference/neuron.md §3-4) with the additions our
neuron makes: lifecycle states `loading` and `failed` (with the reason) appear in `/models`.
Unknown fields are ignored on decode so that newer neurons and older gateways interoperate.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ModelState = Literal["loading", "loaded", "failed", "poisoned", "unloading"]
ActivationState = Literal["pre_warming", "ready"]


class DeviceInfo(msgspec.Struct, kw_only=True):
    index: int
    name: str
    vram_total_mb: int
    compute_capability: str | None = None


class DiscoveryResponse(msgspec.Struct, kw_only=True):
    hostname: str
    os: str
    kernel: str
    cuda_version: str | None = None
    driver_version: str | None = None
    devices: list[DeviceInfo] = msgspec.field(default_factory=list)
    harnesses: list[str] = msgspec.field(default_factory=list)
    # Why no GPU is usable (no NVML library, no driver, ...); None on a GPU host.
    cuda_unavailable_reason: str | None = None
    # Host memory, so that CPU-only hosts can still be placed on by the gateway.
    host_memory_total_mb: int = 0


class DeviceHealth(msgspec.Struct, kw_only=True):
    index: int
    vram_used_mb: int
    vram_free_mb: int
    utilization_pct: int | None = None
    temp_c: int | None = None


class ActivationFailure(msgspec.Struct, kw_only=True):
    model_id: str
    error: str


class ActivationStatus(msgspec.Struct, kw_only=True):
    state: ActivationState = "ready"
    pending: list[str] = msgspec.field(default_factory=list)
    in_progress: str | None = None
    completed: list[str] = msgspec.field(default_factory=list)
    failed: list[ActivationFailure] = msgspec.field(default_factory=list)


class ModelLoad(msgspec.Struct, kw_only=True):
    """Live load of one model: what the gateway's least-busy choice reads."""

    id: str
    in_flight: int = 0
    queue_depth: int = 0
    max_in_flight: int = 0
    max_queue_depth: int = 0
    tok_s_prefill: float = 0.0
    tok_s_decode: float = 0.0
    # The longest prompt + output one request can have: the model's position limit or what
    # its K/V pool holds, whichever is less (None when the engine does not say).
    max_model_len: int | None = None
    # K/V pool blocks held by running sequences, and the pool's usable blocks.
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0


class HealthResponse(msgspec.Struct, kw_only=True):
    uptime_secs: float = 0.0
    devices: list[DeviceHealth] = msgspec.field(default_factory=list)
    activation: ActivationStatus = msgspec.field(default_factory=ActivationStatus)
    models: list[ModelLoad] = msgspec.field(default_factory=list)
    host_memory_free_mb: int = 0


class ModelLimit(msgspec.Struct, kw_only=True, omit_defaults=True):
    context: int
    input: int | None = None
    output: int


class ModelInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    harness: str
    status: ModelState
    devices: list[int] = msgspec.field(default_factory=list)
    vram_used_mb: int | None = None
    capabilities: list[str] = msgspec.field(default_factory=list)
    limit: ModelLimit | None = None
    tool_call: bool = False
    reasoning: bool = False
    # For `failed` and `poisoned`: what went wrong, in words a user can act on.
    error: str | None = None
    loaded_at: float | None = None
    last_used: float | None = None
    in_flight: int = 0


class ModelSpec(msgspec.Struct, kw_only=True):
    """Body of `POST /models/load` and an entry of neuron.toml's `default_models`."""

    model_id: str
    harness: str = "torch"
    quant: str | None = None
    tensor_parallel: int | None = None
    devices: list[int] | None = None
    # The id the model is served and listed under. Defaults to `model_id`; set it when the
    # source is a mirror (`helexa:Org/X`), a local folder or a .gguf path, so clients and
    # the gateway's catalogue see one stable name.
    served_model_name: str | None = None

    @property
    def served_id(self) -> str:
        return self.served_model_name or self.model_id


class UnloadRequest(msgspec.Struct, kw_only=True):
    model_id: str


class LoadResponse(msgspec.Struct, kw_only=True):
    status: Literal["loaded"] = "loaded"
    model_id: str | None = None
    load_seconds: float | None = None


class UnloadResponse(msgspec.Struct, kw_only=True):
    status: Literal["unloaded"] = "unloaded"
    model_id: str | None = None


class EndpointResponse(msgspec.Struct, kw_only=True):
    url: str


class VersionResponse(msgspec.Struct, kw_only=True):
    name: str
    version: str
    python: str
    torch: str | None = None
    transformers: str | None = None
    # The process serving: `cortex serve` checks that the neuron answering is its own child.
    pid: int | None = None
