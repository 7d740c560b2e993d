"""ModelManager: the `torch` harness - every model's lifecycle on this neuron, owned by one object.

States: `loading` -> `loaded` | `failed` (reason kept for /models); `loaded` -> `unloading`
-> gone; `poisoned` when a device fault made a model unusable. Loads are single-flight per
model id: the record is created and the load task started without an `await` in between,
so concurrent identical loads all await one task. A load of a loaded model is a no-op
success. Torch work (load, free) runs on the device's owner thread; the event loop only
awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from cortex_core.config.neuron import EngineConfig, NeuronConfig
from cortex_core.errors import ApiError
from cortex_core.neuron_api import (
    ActivationFailure,
    ActivationStatus,
    ModelInfo,
    ModelLimit,
    ModelLoad,
    ModelSpec,
    ModelState,
)
from neuron.device import DeviceWorker
from neuron.discovery import HostProbe
from neuron.engine.api import Engine, GenerationRequest, TokenEvent
from neuron.loader import (
    CheckpointMetadata,
    LoadedCheckpoint,
    bind_device,
    choose_dtype,
    device_name,
    load_checkpoint,
    read_metadata,
    release_memory,
)
from neuron.metrics import LiveReadings, NeuronMetrics
from neuron.preflight import (
    check_fit,
    replicated_weight_bytes,
    required_bytes,
    tensor_parallel_rank_bytes,
    torch_itemsize,
)
from neuron.prepare import ModelPreparer, Placement, PreparedModel
from neuron.runtime import LoadedModel
from neuron.serving.params import context_length
from neuron.sources import effective_sources

log = logging.getLogger(__name__)

HARNESS = "torch"
MIB = 1024 * 1024
# What a client should wait before retrying a model that is still loading or unloading.
RETRY_AFTER_SECS = 5.0
# An engine that does not stop within this long on unload is abandoned (its memory with it).
ENGINE_CLOSE_TIMEOUT_SECS = 20.0


class EngineFactory(Protocol):
    def __call__(
        self,
        checkpoint: LoadedCheckpoint,
        worker: DeviceWorker,
        config: EngineConfig,
        model_id: str,
        on_device_fault: Callable[[str], None],
    ) -> Engine:
        """An engine over the loaded checkpoint; it calls `on_device_fault(reason)` (from any
        thread) when a step hits an error that leaves the device unusable."""
        ...


def default_engine_factory(
    checkpoint: LoadedCheckpoint,
    worker: DeviceWorker,
    config: EngineConfig,
    model_id: str,
    on_device_fault: Callable[[str], None],
) -> Engine:
    """The continuous-batching engine of `neuron.engine` (imported late: it pulls in torch)."""
    try:
        from neuron.engine import build_engine
    except ImportError as exc:
        raise ApiError(
            503,
            f"model '{model_id}' cannot be served: this neuron build has no inference engine ({exc})",
            code="engine_unavailable",
        ) from exc
    return build_engine(
        checkpoint.model,
        worker=worker,
        engine_config=config,
        model_id=model_id,
        on_device_fault=on_device_fault,
    )


def choose_device(
    model_id: str, requested: Sequence[int] | None, free_by_gpu: dict[int, int], no_gpu_reason: str | None
) -> int | None:
    """The GPU to load on (None = CPU): the requested one, else the one with the most free memory."""
    if not free_by_gpu:
        if requested:
            raise ApiError(
                422,
                f"model '{model_id}' asks for devices {list(requested)} but this host has no usable GPU "
                f"({no_gpu_reason or 'none found'}); leave devices unset to load on the CPU",
                code="device_unavailable",
                param="devices",
            )
        return None
    if requested:
        unknown = [index for index in requested if index not in free_by_gpu]
        if unknown:
            raise ApiError(
                422,
                f"model '{model_id}' asks for devices {list(requested)} but this host has GPUs "
                f"{sorted(free_by_gpu)}; unknown: {unknown}",
                code="device_unavailable",
                param="devices",
            )
        return requested[0]
    return max(sorted(free_by_gpu), key=lambda index: free_by_gpu[index])


class DevicePool:
    """One owner thread per device, started on first use and kept for the daemon's life; each
    thread first makes its device current (`bind`)."""

    def __init__(self, bind: Callable[[int | None], None] = bind_device) -> None:
        self._workers: dict[int | None, DeviceWorker] = {}
        self._bind = bind

    def worker(self, device: int | None) -> DeviceWorker:
        if device not in self._workers:
            self._workers[device] = DeviceWorker(device_name(device), on_start=partial(self._bind, device))
        return self._workers[device]

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close(timeout=5.0)
        self._workers.clear()


class MeteredEngine:
    """The engine as serving sees it: counts requests and generated tokens, marks the model used."""

    def __init__(
        self, inner: Engine, on_request: Callable[[], None], on_tokens: Callable[[int], None]
    ) -> None:
        self.inner = inner
        self._on_request = on_request
        self._on_tokens = on_tokens

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        # Called synchronously like the engine's own, so its refusals (400, 503) still raise at once.
        stream = self.inner.generate(request)
        self._on_request()
        return self._counted(stream)

    async def _counted(self, stream: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
        try:
            async for event in stream:
                if event.token_id is not None:
                    self._on_tokens(1)
                yield event
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def load(self) -> ModelLoad:
        return self.inner.load()

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Engine-specific extras (e.g. statistics) stay reachable through the wrapper.
        return getattr(self.inner, name)


@dataclass
class ModelRecord:
    spec: ModelSpec
    state: ModelState
    requested_at: float
    device: int | None = None
    # Every rank's device of a tensor-parallel model (rank 0's is `device`); empty otherwise.
    devices: list[int] = field(default_factory=list)
    error: str | None = None
    loaded: LoadedModel | None = None
    memory_bytes: int = 0
    loaded_at: float | None = None
    last_used: float | None = None
    load_seconds: float | None = None
    task: asyncio.Task[LoadedModel] | None = field(default=None, repr=False)
    unload_task: asyncio.Task[None] | None = field(default=None, repr=False)


def _capabilities(loaded: LoadedModel) -> tuple[bool, bool]:
    """(tool_call, reasoning): the template takes tools; the vocabulary has reasoning markers."""
    from neuron.serving.reasoning import find_reasoning_markers
    from neuron.serving.template import template_takes_tools

    return template_takes_tools(loaded.chat_template), find_reasoning_markers(loaded.tokenizer) is not None


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


# Load failures that mean "the model source could not be reached", not "this model is bad":
# a default model's pre-warm tries those again (the registry may come back; a network may
# come up after the daemon).
SOURCE_UNREACHABLE = frozenset({"repo_fetch_failed", "download_failed"})


@dataclass(frozen=True)
class PrewarmRetry:
    """Retries of a default model whose source is unreachable: base·2^(n-1) s, capped, n ≤ attempts."""

    attempts: int = 5
    base_secs: float = 2.0
    cap_secs: float = 60.0
    # Injected so tests can run the back-off without waiting for it.
    sleep: Callable[[float], Any] = asyncio.sleep

    def delay(self, retry: int) -> float:
        return min(self.cap_secs, self.base_secs * 2.0 ** (retry - 1))


class ModelManager:
    """Implements cortex_core.harness.Harness for the in-process `torch` harness."""

    def __init__(
        self,
        config: NeuronConfig,
        probe: HostProbe,
        *,
        metrics: NeuronMetrics | None = None,
        engine_factory: EngineFactory = default_engine_factory,
        preparer: ModelPreparer | None = None,
        devices: DevicePool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.probe = probe
        self.metrics = metrics or NeuronMetrics()
        self.metrics.watch(self.live_readings)
        self._engine_factory = engine_factory
        self.preparer = preparer or ModelPreparer(effective_sources(config), config.default_source)
        self.devices = devices or DevicePool()
        self._clock = clock
        self._records: dict[str, ModelRecord] = {}
        # Bytes that loads in progress will occupy, per device (None = host memory). Free memory
        # readings do not show a load until its weights are resident.
        self._reserved: dict[int | None, int] = {}
        self.activation = ActivationStatus()
        self.prewarm_retry = PrewarmRetry()

    @property
    def name(self) -> str:
        return HARNESS

    # --- queries ---------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return [self._info(model_id, record) for model_id, record in sorted(self._records.items())]

    def info(self, model_id: str) -> ModelInfo:
        return self._info(model_id, self._records[model_id])

    def _info(self, model_id: str, record: ModelRecord) -> ModelInfo:
        info = ModelInfo(
            id=model_id,
            harness=HARNESS,
            status=record.state,
            devices=record.devices or ([] if record.device is None else [record.device]),
            error=record.error,
            loaded_at=record.loaded_at,
            last_used=record.last_used,
        )
        loaded = record.loaded
        if loaded is not None:
            info.vram_used_mb = record.memory_bytes // MIB
            info.capabilities = list(loaded.capabilities)
            # The window serving enforces (serving/model.py): the config's, capped by the K/V pool.
            context = loaded.served_context(context_length(loaded.hf_config))
            if context is not None:
                # What one request can really get: a prompt takes at least one token of the
                # window, and so does the answer (serving/params.py refuses anything more).
                info.limit = ModelLimit(context=context, input=context - 1, output=context - 1)
            info.tool_call, info.reasoning = _capabilities(loaded)
            info.in_flight = loaded.engine.load().in_flight
        return info

    def get(self, model_id: str) -> LoadedModel:
        """The loaded model for serving; 404 when absent or failed, 503 + Retry-After while it changes."""
        record = self._records.get(model_id)
        if record is None:
            raise ApiError(
                404,
                f"model '{model_id}' is not loaded on this neuron; loaded: {self._loaded_ids()}. "
                "Load it with POST /models/load",
                code="model_not_found",
                extras={"model_id": model_id},
            )
        if record.state == "loaded" and record.loaded is not None:
            record.last_used = self._clock()
            return record.loaded
        if record.state in ("loading", "unloading"):
            raise ApiError(
                503,
                f"model '{model_id}' is {record.state}; retry shortly",
                code=f"model_{record.state}",
                retry_after=RETRY_AFTER_SECS,
            )
        if record.state == "poisoned":
            raise ApiError(
                500,
                f"model '{model_id}' is poisoned ({record.error}); unload and load it again to recover",
                code="model_poisoned",
            )
        raise ApiError(
            404,
            f"model '{model_id}' failed to load: {record.error}. Fix the cause and load it again",
            code="model_not_found",
            extras={"model_id": model_id},
        )

    def _loaded_ids(self) -> list[str]:
        return sorted(model_id for model_id, record in self._records.items() if record.state == "loaded")

    def loads(self) -> list[ModelLoad]:
        return [
            record.loaded.engine.load()
            for _, record in sorted(self._records.items())
            if record.state == "loaded" and record.loaded is not None
        ]

    def live_readings(self) -> LiveReadings:
        live = LiveReadings()
        for model_id, record in self._records.items():
            if record.state == "loaded" and record.loaded is not None:
                load = record.loaded.engine.load()
                live.requests[model_id] = (load.in_flight, load.queue_depth)
                live.model_memory[model_id] = record.memory_bytes
        for reading in self.probe.device_health():
            live.device_memory[str(reading.index)] = (reading.vram_used_mb * MIB, reading.vram_free_mb * MIB)
        if not self.probe.gpu_indices:
            from neuron.discovery import read_meminfo

            memory = read_meminfo()
            total, free = memory.get("MemTotal", 0), memory.get("MemAvailable", 0)
            live.device_memory["cpu"] = (total - free, free)
        return live

    # --- load ------------------------------------------------------------------------------

    async def load(self, spec: ModelSpec) -> ModelInfo:
        """Load (single-flight per id) and return once resident; a loaded model is a no-op success."""
        if spec.harness != HARNESS:
            raise ApiError(
                400,
                f"unknown harness '{spec.harness}' for model '{spec.model_id}'; this neuron runs ['{HARNESS}']",
                code="unknown_harness",
                param="harness",
            )
        if not spec.model_id.strip():
            raise ApiError(400, "model_id is empty", code="invalid_model_id", param="model_id")
        model_id = spec.served_id
        record = self._records.get(model_id)
        if record is not None and record.state == "unloading":
            raise ApiError(
                503,
                f"model '{model_id}' is being unloaded; retry shortly",
                code="model_unloading",
                retry_after=RETRY_AFTER_SECS,
            )
        if record is not None and record.state == "poisoned":
            raise ApiError(
                409,
                f"model '{model_id}' is poisoned; unload it first, then load it again",
                code="model_poisoned",
            )
        if record is None or record.state == "failed":
            # No await between the membership check and the insert: this is what makes it single-flight.
            record = ModelRecord(spec=spec, state="loading", requested_at=self._clock())
            self._records[model_id] = record
            record.task = asyncio.create_task(self._run_load(model_id, record), name=f"load {model_id}")
            # The outcome is kept in the record; mark it retrieved for when every waiter went away.
            record.task.add_done_callback(_retrieve)
        if record.task is not None and record.state == "loading":
            # Shielded: a caller that goes away (HTTP disconnect) does not cancel the load for the others.
            await asyncio.shield(record.task)
        return self._info(model_id, record)

    async def _run_load(self, model_id: str, record: ModelRecord) -> LoadedModel:
        started = time.monotonic()
        try:
            loaded = await self._load_steps(model_id, record)
        except ApiError as exc:
            self._fail(model_id, record, exc.message)
            raise
        except asyncio.CancelledError:
            self._fail(model_id, record, "the load was cancelled (the neuron is shutting down)")
            raise
        except Exception as exc:  # translated, never swallowed: the caller gets it as an ApiError
            message = f"loading model '{model_id}' failed: {type(exc).__name__}: {exc}"
            log.exception("%s", message)
            self._fail(model_id, record, message)
            raise ApiError(500, message, code="load_failed") from exc
        record.load_seconds = time.monotonic() - started
        record.loaded = loaded
        record.loaded_at = self._clock()
        record.state = "loaded"
        self.metrics.load_duration.labels(model_id).observe(record.load_seconds)
        self._count_loaded()
        log.info("model %s loaded on %s in %.1f s", model_id, device_name(record.device), record.load_seconds)
        return loaded

    def _fail(self, model_id: str, record: ModelRecord, message: str) -> None:
        record.state = "failed"
        record.error = message
        self.metrics.load_failures.labels(model_id).inc()
        log.warning("model %s failed to load: %s", model_id, message)

    def _free_bytes(self, device: int | None) -> int:
        return self.probe.free_bytes(device) - self._reserved.get(device, 0)

    def _placement(self, model_id: str, spec: ModelSpec) -> Placement:
        free_by_gpu = {index: self._free_bytes(index) for index in self.probe.gpu_indices}
        device = choose_device(model_id, spec.devices, free_by_gpu, self.probe.cuda_unavailable_reason)
        if device is None:
            return Placement(None, self._free_bytes(None), "this host's memory (CPU)")
        return Placement(device, free_by_gpu[device], f"GPU {device}")

    @contextlib.contextmanager
    def _reservation(self, model_id: str, weights: dict[int | None, tuple[int, str]]) -> Iterator[None]:
        """Check the fit again and hold the memory until the load ends; `weights` maps each
        device to the weight bytes it will hold and how to name it in a refusal.

        Pre-flight checked against free memory before an await (downloads, file reads); another
        load may have claimed that memory since. Checking and reserving here with no await in
        between means two loads can never both count the same free bytes.
        """
        for device, (weight_bytes, where) in weights.items():
            check_fit(model_id, weight_bytes, self._free_bytes(device), where)
        # The headroom pre-flight demands (weights plus runtime overhead) is what gets held.
        held = {device: required_bytes(weight_bytes) for device, (weight_bytes, _) in weights.items()}
        for device, amount in held.items():
            self._reserved[device] = self._reserved.get(device, 0) + amount
        try:
            yield
        finally:
            for device, amount in held.items():
                self._reserved[device] -= amount

    async def _load_steps(self, model_id: str, record: ModelRecord) -> LoadedModel:
        tp_devices = self._tensor_parallel_devices(model_id, record.spec)
        if tp_devices is not None:
            return await self._load_tensor_parallel(model_id, record, tp_devices)
        placement = self._placement(model_id, record.spec)
        record.device = placement.device
        prepared: PreparedModel = await self.preparer.prepare(
            record.spec.model_id, record.spec.quant, placement
        )
        worker = self.devices.worker(placement.device)
        with self._reservation(model_id, {placement.device: (prepared.weight_bytes, placement.description)}):
            checkpoint = await worker.run(
                load_checkpoint, prepared.folder, prepared.gguf_file, placement.device
            )
            # Built on the owner thread, which sizes the K/V pool from the device's free memory
            # and allocates it there, before the reservation ends: a concurrent load's
            # pre-flight then sees the pool's memory taken, not free.
            engine = await worker.run(
                self._engine_factory,
                checkpoint,
                worker,
                self.config.engine,
                model_id,
                self._device_fault_reporter(model_id, record),
            )
        # Weights plus the K/V pool (engines that hold one say how big it is).
        record.memory_bytes = checkpoint.memory_bytes + int(getattr(engine, "kv_cache_bytes", 0))
        devices = [] if placement.device is None else [placement.device]
        return self._serving_model(model_id, record, prepared.folder, checkpoint, engine, worker, devices)

    def _serving_model(
        self,
        model_id: str,
        record: ModelRecord,
        folder: Path,
        parts: LoadedCheckpoint | CheckpointMetadata,
        engine: Engine,
        worker: DeviceWorker,
        devices: list[int],
    ) -> LoadedModel:
        """What the serving layer gets: tokenizer, template, defaults, and the engine metered."""
        metered = MeteredEngine(
            engine,
            on_request=self.metrics.requests.labels(model_id).inc,
            on_tokens=self.metrics.tokens_generated.labels(model_id).inc,
        )
        return LoadedModel(
            model_id=model_id,
            spec=record.spec,
            path=folder,
            tokenizer=parts.tokenizer,
            hf_config=parts.hf_config,
            generation_config=parts.generation_config,
            chat_template=parts.chat_template,
            engine=metered,
            worker=worker,
            devices=devices,
        )

    def _tensor_parallel_devices(self, model_id: str, spec: ModelSpec) -> list[int] | None:
        """Each rank's device when the spec asks for more than one, else None (imports torch lazily)."""
        if (spec.tensor_parallel or 1) <= 1 and len(spec.devices or []) <= 1:
            return None
        from neuron.tp import TensorParallelPlacementError, tensor_parallel_devices

        best_first = sorted(self.probe.gpu_indices, key=lambda index: -self.probe.free_bytes(index))
        try:
            return tensor_parallel_devices(spec.devices, spec.tensor_parallel, best_first)
        except TensorParallelPlacementError as exc:
            raise ApiError(
                422, f"model '{model_id}': {exc}", code="tensor_parallel_unavailable", param="tensor_parallel"
            ) from exc

    async def _load_tensor_parallel(
        self, model_id: str, record: ModelRecord, devices: list[int]
    ) -> LoadedModel:
        """Rank 0 on this process's owner thread for devices[0]; the other ranks are worker processes."""
        from neuron.engine import TorchEngine
        from neuron.tp import UnshardableModel, UnsupportedBackend, choose_backend, start_tensor_parallel

        on_gpu = bool(self.probe.gpu_indices)
        allow_cpu = self.config.allow_cpu_tensor_parallel
        try:
            choose_backend(cuda_available=on_gpu, allow_cpu=allow_cpu)
        except UnsupportedBackend as exc:
            raise ApiError(
                422, f"model '{model_id}': {exc}", code="tensor_parallel_unavailable", param="tensor_parallel"
            ) from exc
        if on_gpu:
            free = sum(self._free_bytes(index) for index in devices)
            placement = Placement(devices[0], free, f"GPUs {devices}")
        else:
            placement = Placement(None, self._free_bytes(None), "this host's memory (CPU)")
        record.device, record.devices = placement.device, list(devices)
        prepared = await self.preparer.prepare(record.spec.model_id, record.spec.quant, placement)
        if prepared.gguf_file:
            raise ApiError(
                422,
                f"model '{model_id}' is a GGUF file; tensor parallel needs a safetensors checkpoint",
                code="tensor_parallel_unavailable",
                param="tensor_parallel",
            )
        record.memory_bytes = prepared.weight_bytes
        worker = self.devices.worker(placement.device)
        loop = asyncio.get_running_loop()

        def on_failure(reason: str) -> None:  # runs on the TP watchdog's thread
            loop.call_soon_threadsafe(self._poison, model_id, record, reason)

        metadata = await worker.run(read_metadata, prepared.folder)
        config_dtype = getattr(metadata.hf_config, "dtype", None)
        dtype = choose_dtype(
            placement.device,
            None if config_dtype is None else str(config_dtype),
            # Every rank computes in one dtype: bf16 only if every card has it.
            bf16_supported=on_gpu and all(self.probe.supports_bf16(d) for d in devices),
        )
        rank_bytes = tensor_parallel_rank_bytes(
            prepared.weight_bytes,
            replicated_weight_bytes(metadata.hf_config, torch_itemsize(dtype)),
            len(devices),
        )
        weights: dict[int | None, tuple[int, str]] = (
            {d: (rank_bytes, f"GPU {d} (one rank of GPUs {devices})") for d in devices}
            if on_gpu
            else {None: (rank_bytes * len(devices), f"{placement.description}, {len(devices)} ranks")}
        )
        try:
            with self._reservation(model_id, weights):
                runner = await worker.run(
                    start_tensor_parallel,
                    prepared.folder,
                    devices,
                    cuda_available=on_gpu,
                    allow_cpu=allow_cpu,
                    engine_config=self.config.engine,
                    dtype=dtype,
                    step_timeout_s=self.config.tensor_parallel_step_timeout_secs,
                    on_failure=on_failure,
                )
        except UnshardableModel as exc:
            raise ApiError(
                422, f"model '{model_id}': {exc}", code="tensor_parallel_unavailable", param="tensor_parallel"
            ) from exc
        engine = TorchEngine(
            runner,
            worker=worker,
            config=self.config.engine,
            model_id=model_id,
            on_device_fault=self._device_fault_reporter(model_id, record),
        )
        return self._serving_model(model_id, record, prepared.folder, metadata, engine, worker, list(devices))

    def _poison(self, model_id: str, record: ModelRecord, reason: str) -> None:
        """A device fault (e.g. a tensor-parallel rank died): refuse requests until unload + load."""
        if self._records.get(model_id) is not record or record.state != "loaded":
            return
        record.state = "poisoned"
        record.error = reason
        self._count_loaded()
        log.error("model %s is poisoned: %s", model_id, reason)

    def _device_fault_reporter(self, model_id: str, record: ModelRecord) -> Callable[[str], None]:
        """What an engine calls, from its owner thread, when its device became unusable."""
        loop = asyncio.get_running_loop()

        def report(reason: str) -> None:
            try:
                loop.call_soon_threadsafe(self._poison_device, model_id, record, reason)
            except RuntimeError:  # the loop is closed: the daemon is shutting down anyway
                log.error("device fault in model %s after shutdown began: %s", model_id, reason)

        return report

    def _poison_device(self, model_id: str, record: ModelRecord, reason: str) -> None:
        """A sticky device error in one model's step: that device's context is unusable, so
        every model on it is poisoned, each naming the model and the error that did it."""
        if self._records.get(model_id) is not record:
            return
        faulty = {record.device, *record.devices}
        where = ", ".join(
            device_name(device) for device in sorted(faulty, key=lambda d: -1 if d is None else d)
        )
        for other_id, other in list(self._records.items()):
            if {other.device, *other.devices} & faulty:
                self._poison(
                    other_id, other, f"device {where} failed in a step of model '{model_id}': {reason}"
                )

    def _count_loaded(self) -> None:
        self.metrics.models_loaded.set(sum(1 for r in self._records.values() if r.state == "loaded"))

    # --- unload ----------------------------------------------------------------------------

    async def unload(self, model_id: str) -> None:
        record = self._records.get(model_id)
        if record is None:
            raise ApiError(
                404,
                f"model '{model_id}' is not loaded on this neuron; loaded: {self._loaded_ids()}",
                code="model_not_found",
                param="model_id",
            )
        if record.state == "loading":
            raise ApiError(
                503,
                f"model '{model_id}' is still loading; unload it once the load has finished",
                code="model_loading",
                retry_after=RETRY_AFTER_SECS,
            )
        if record.state == "failed":
            del self._records[model_id]
            return
        if record.unload_task is None:
            record.state = "unloading"
            record.unload_task = asyncio.create_task(
                self._run_unload(model_id, record), name=f"unload {model_id}"
            )
        await asyncio.shield(record.unload_task)

    async def _run_unload(self, model_id: str, record: ModelRecord) -> None:
        # Every path from this manager to the weights goes before the memory is released: the
        # record's loaded model and its finished load task (whose result is the same model).
        loaded, record.loaded, record.task = record.loaded, None, None
        returned: int | None = None
        try:
            if loaded is not None:
                try:
                    # Closing frees the runner's weights and pool, so a request handler that
                    # still holds the LoadedModel keeps nothing on the device.
                    await asyncio.wait_for(loaded.engine.close(), ENGINE_CLOSE_TIMEOUT_SECS)
                except TimeoutError:
                    log.error(
                        "engine of %s did not stop within %.0f s; dropping it",
                        model_id,
                        ENGINE_CLOSE_TIMEOUT_SECS,
                    )
                worker = loaded.worker
                del loaded
                # Collected and the device's cache emptied on the owner thread (CUDA context locality).
                returned = await worker.run(release_memory, record.device)
        finally:
            self._records.pop(model_id, None)
            self._count_loaded()
        if returned is None:
            log.info("model %s unloaded", model_id)
        else:
            log.info(
                "model %s unloaded; %d MiB returned to %s",
                model_id,
                returned // MIB,
                device_name(record.device),
            )

    # --- default models and shutdown -------------------------------------------------------

    def start_activation(self, specs: Sequence[ModelSpec]) -> asyncio.Task[None]:
        """Begin loading the default models in the background; /health shows `pre_warming` at once."""
        self.activation = ActivationStatus(
            state="pre_warming" if specs else "ready", pending=[spec.served_id for spec in specs]
        )
        return asyncio.create_task(self._activate(specs), name="activate default models")

    async def _activate(self, specs: Sequence[ModelSpec]) -> None:
        """One after another (they compete for memory); a failure does not stop the rest."""
        for spec in specs:
            self.activation.pending.remove(spec.served_id)
            self.activation.in_progress = spec.served_id
            try:
                await self._prewarm(spec)
            except ApiError as exc:
                self.activation.failed.append(ActivationFailure(model_id=spec.served_id, error=exc.message))
            else:
                self.activation.completed.append(spec.served_id)
        self.activation.in_progress = None
        self.activation.state = "ready"

    async def _prewarm(self, spec: ModelSpec) -> None:
        """Load a default model; an unreachable source is tried again with a capped back-off."""
        retry = self.prewarm_retry
        for attempt in range(1, retry.attempts + 1):
            try:
                await self.load(spec)
                return
            except ApiError as exc:
                if exc.code not in SOURCE_UNREACHABLE or attempt == retry.attempts:
                    raise
                delay = retry.delay(attempt)
                log.warning(
                    "pre-warming %s: %s; trying again in %.0f s (%d of %d)",
                    spec.served_id,
                    exc.message,
                    delay,
                    attempt + 1,
                    retry.attempts,
                )
                await retry.sleep(delay)

    async def close(self) -> None:
        """Unload everything (loads in progress are cancelled) and stop the device threads."""
        for record in list(self._records.values()):
            if record.task is not None and not record.task.done():
                record.task.cancel()
        for model_id, record in list(self._records.items()):
            if record.state in ("loaded", "poisoned", "unloading"):
                try:
                    await self.unload(model_id)
                except ApiError as exc:
                    log.error("unloading %s at shutdown failed: %s", model_id, exc.message)
        self._records.clear()
        self.devices.close()
