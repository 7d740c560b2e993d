"""The `torch` harness: models in this process, on one device or tensor parallel over several.

What is torch's alone lives here: choosing the device, reading and placing the checkpoint
on the device's owner thread, building the engine there (which sizes its K/V pool from
what is free), starting tensor-parallel ranks, and freeing the memory on unload. The
lifecycle around it (states, single flight, reservations, poisoning, drain) is the
lifecycle manager's (manager.py), which any harness shares.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeAlias

from cortex_core.config.neuron import EngineConfig, NeuronConfig, VisionConfig
from cortex_core.errors import ApiError
from cortex_core.harness import LoadTicket
from cortex_core.neuron_api import ModelSpec
from neuron.device import DeviceWorker
from neuron.discovery import HostProbe
from neuron.engine.api import Engine
from neuron.loaded_model import LoadedModel
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
from neuron.preflight import replicated_weight_bytes, tensor_parallel_rank_bytes, torch_itemsize
from neuron.prepare import ModelPreparer, Placement, PreparedModel
from neuron.sources import effective_sources

log = logging.getLogger(__name__)

TORCH = "torch"
MIB = 1024 * 1024
# An engine that does not stop within this long on unload is abandoned (its memory with it).
ENGINE_CLOSE_TIMEOUT_SECS = 20.0


# Builds an engine over a loaded checkpoint on the device's owner thread. The harness passes
# the arguments by position, as `default_engine_factory` (which names them) takes them.
EngineFactory: TypeAlias = Callable[
    [LoadedCheckpoint, DeviceWorker, EngineConfig, str, Callable[[str], None]], Engine
]


def default_engine_factory(
    checkpoint: LoadedCheckpoint,
    worker: DeviceWorker,
    config: EngineConfig,
    model_id: str,
    on_device_fault: Callable[[str], None],
) -> Engine:
    """The continuous-batching engine of `neuron.engine` (imported late: it pulls in torch).

    The engine calls `on_device_fault(reason)` (from any thread) when a step hits an error
    that leaves the device unusable."""
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


def _tensor_parallel_refusal(model_id: str, exc: Exception) -> ApiError:
    return ApiError(
        422, f"model '{model_id}': {exc}", code="tensor_parallel_unavailable", param="tensor_parallel"
    )


class TorchHarness:
    """Implements cortex_core.harness.Harness[LoadedModel] with torch in this process."""

    def __init__(
        self,
        config: NeuronConfig,
        probe: HostProbe,
        *,
        engine_factory: EngineFactory = default_engine_factory,
        preparer: ModelPreparer | None = None,
        devices: DevicePool | None = None,
    ) -> None:
        self.config = config
        self.probe = probe
        self._engine_factory = engine_factory
        self.preparer = preparer or ModelPreparer(effective_sources(config), config.default_source)
        self.devices = devices or DevicePool()
        # Each loaded model's owner-thread device (None = CPU), whose memory its unload frees.
        # Not LoadedModel.devices: a tensor-parallel model on the CPU lists its ranks there.
        self._home: dict[str, int | None] = {}

    @property
    def name(self) -> str:
        return TORCH

    # --- load ------------------------------------------------------------------------------

    async def load(self, ticket: LoadTicket) -> LoadedModel:
        tp_devices = self._tensor_parallel_devices(ticket.model_id, ticket.spec)
        if tp_devices is not None:
            return await self._load_tensor_parallel(ticket, tp_devices)
        model_id, spec = ticket.model_id, ticket.spec
        placement = self._placement(ticket)
        ticket.placed(placement.device)
        prepared: PreparedModel = await self.preparer.prepare(spec.model_id, spec.quant, placement)
        worker = self.devices.worker(placement.device)
        with ticket.reserve({placement.device: (prepared.weight_bytes, placement.description)}):
            checkpoint = await worker.run(
                load_checkpoint, prepared.folder, prepared.gguf_file, placement.device
            )
            # Built on the owner thread, which sizes the K/V pool from the device's free memory
            # and allocates it there, before the reservation ends: a concurrent load's
            # pre-flight then sees the pool's memory taken, not free.
            engine = await worker.run(
                self._engine_factory, checkpoint, worker, self.config.engine, model_id, ticket.device_fault()
            )
        # Weights plus the K/V pool (engines that hold one say how big it is).
        ticket.sized(checkpoint.memory_bytes + int(getattr(engine, "kv_cache_bytes", 0)))
        devices = [] if placement.device is None else [placement.device]
        self._home[model_id] = placement.device
        return _loaded_model(ticket, prepared.folder, checkpoint, engine, worker, devices, self.config.vision)

    def _placement(self, ticket: LoadTicket) -> Placement:
        free_by_gpu = {index: ticket.free_bytes(index) for index in self.probe.gpu_indices}
        device = choose_device(
            ticket.model_id, ticket.spec.devices, free_by_gpu, self.probe.cuda_unavailable_reason
        )
        if device is None:
            return Placement(None, ticket.free_bytes(None), "this host's memory (CPU)")
        return Placement(device, free_by_gpu[device], f"GPU {device}")

    def _tensor_parallel_devices(self, model_id: str, spec: ModelSpec) -> list[int] | None:
        """Each rank's device when the spec asks for more than one, else None (imports torch lazily)."""
        tensor_parallel, requested = spec.tensor_parallel, spec.devices
        if (tensor_parallel or 1) <= 1 and len(requested or []) <= 1:
            return None
        from neuron.tp import TensorParallelPlacementError, tensor_parallel_devices

        best_first = sorted(self.probe.gpu_indices, key=lambda index: -self.probe.free_bytes(index))
        try:
            return tensor_parallel_devices(requested, tensor_parallel, best_first)
        except TensorParallelPlacementError as exc:
            raise _tensor_parallel_refusal(model_id, exc) from exc

    async def _load_tensor_parallel(self, ticket: LoadTicket, devices: list[int]) -> LoadedModel:
        """Rank 0 on this process's owner thread for devices[0]; the other ranks are worker processes."""
        from neuron.engine import TorchEngine
        from neuron.tp import UnshardableModel, UnsupportedBackend, choose_backend, start_tensor_parallel

        model_id, spec = ticket.model_id, ticket.spec
        on_gpu = bool(self.probe.gpu_indices)
        allow_cpu = self.config.allow_cpu_tensor_parallel
        try:
            choose_backend(cuda_available=on_gpu, allow_cpu=allow_cpu)
        except UnsupportedBackend as exc:
            raise _tensor_parallel_refusal(model_id, exc) from exc
        if on_gpu:
            free = sum(ticket.free_bytes(index) for index in devices)
            placement = Placement(devices[0], free, f"GPUs {devices}")
        else:
            placement = Placement(None, ticket.free_bytes(None), "this host's memory (CPU)")
        ticket.placed(placement.device, devices)
        prepared = await self.preparer.prepare(spec.model_id, spec.quant, placement)
        if prepared.gguf_file:
            raise ApiError(
                422,
                f"model '{model_id}' is a GGUF file; tensor parallel needs a safetensors checkpoint",
                code="tensor_parallel_unavailable",
                param="tensor_parallel",
            )
        ticket.sized(prepared.weight_bytes)
        worker = self.devices.worker(placement.device)
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
            with ticket.reserve(weights):
                runner = await worker.run(
                    start_tensor_parallel,
                    prepared.folder,
                    devices,
                    cuda_available=on_gpu,
                    allow_cpu=allow_cpu,
                    engine_config=self.config.engine,
                    dtype=dtype,
                    step_timeout_s=self.config.tensor_parallel_step_timeout_secs,
                    # A rank that fails (the watchdog's thread) poisons this model alone.
                    on_failure=ticket.model_fault(),
                )
        except UnshardableModel as exc:
            raise _tensor_parallel_refusal(model_id, exc) from exc
        engine = TorchEngine(
            runner,
            worker=worker,
            config=self.config.engine,
            model_id=model_id,
            on_device_fault=ticket.device_fault(),
        )
        self._home[model_id] = placement.device
        return _loaded_model(
            ticket, prepared.folder, metadata, engine, worker, list(devices), self.config.vision
        )

    # --- unload ----------------------------------------------------------------------------

    async def unload(self, model: LoadedModel) -> None:
        model_id = model.model_id
        try:
            # Closing frees the runner's weights and pool, so a request handler that still
            # holds the LoadedModel keeps nothing on the device.
            await asyncio.wait_for(model.engine.close(), ENGINE_CLOSE_TIMEOUT_SECS)
        except TimeoutError:
            log.error(
                "engine of %s did not stop within %.0f s; dropping it", model_id, ENGINE_CLOSE_TIMEOUT_SECS
            )
        worker = model.worker
        device = self._home.pop(model_id, None)
        del model
        # Collected and the device's cache emptied on the owner thread (CUDA context locality).
        returned = await worker.run(release_memory, device)
        if returned is None:
            log.info("model %s unloaded", model_id)
        else:
            log.info(
                "model %s unloaded; %d MiB returned to %s", model_id, returned // MIB, device_name(device)
            )

    async def close(self) -> None:
        self.devices.close()


def _loaded_model(
    ticket: LoadTicket,
    folder: Path,
    parts: LoadedCheckpoint | CheckpointMetadata,
    engine: Engine,
    worker: DeviceWorker,
    devices: list[int],
    vision: VisionConfig,
) -> LoadedModel:
    """What the serving layer gets: tokenizer, template, defaults and the engine; and, for
    a checkpoint loaded with its vision tower, its image processor under `vision`'s rules."""
    images = None
    if getattr(parts, "vision", False) and getattr(engine, "vision", False):
        from neuron.vision.prepare import ImagePreparer

        images = ImagePreparer.for_neuron(folder, parts.hf_config, vision)
    return LoadedModel(
        model_id=ticket.model_id,
        spec=ticket.spec,
        path=folder,
        tokenizer=parts.tokenizer,
        hf_config=parts.hf_config,
        generation_config=parts.generation_config,
        chat_template=parts.chat_template,
        engine=engine,
        worker=worker,
        devices=devices,
        capabilities=["text", "vision"] if images is not None else ["text"],
        images=images,
    )
