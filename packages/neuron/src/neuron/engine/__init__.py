"""The inference engine: a continuous-batching scheduler per loaded model.

`build_engine` is what model loading calls once the transformers model is on its device:

    engine = build_engine(model, worker=worker, engine_config=config.engine, model_id="org/name")

`device` defaults to the device of the model's parameters. All torch work (packing the
model's CPU linears, allocating the K/V pool, then every forward) runs on `worker`'s thread.
The pool takes `kv_cache_fraction` of the device memory free now (the weights are loaded),
at most `kv_cache_max_gib`; the engine serves `max_context` (default: the model's
`max_position_embeddings`) or what the pool holds, whichever is less. Close with `await engine.close()` (frees the runner).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cortex_core.config.neuron import EngineConfig
from neuron.device import DeviceWorker
from neuron.engine.engine import TokenStream, TorchEngine
from neuron.engine.hf_runner import SingleDeviceRunner

GIB = 1 << 30


def kv_cache_budget(free_bytes: int, config: EngineConfig) -> int:
    """Bytes for a model's K/V pool: a share of the memory free after its weights, capped."""
    return int(min(free_bytes * config.kv_cache_fraction, config.kv_cache_max_gib * GIB))


def free_device_bytes(device: torch.device) -> int:
    """Memory free on `device` now (for the CPU: the host's available memory)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    from neuron.discovery import read_meminfo

    return read_meminfo().get("MemAvailable", 0)


def build_engine(
    model: Any,
    *,
    worker: DeviceWorker,
    device: torch.device | str | None = None,
    engine_config: EngineConfig | None = None,
    model_id: str = "",
    max_context: int | None = None,
    on_device_fault: Callable[[str], None] | None = None,
) -> TorchEngine:
    """A TorchEngine over a loaded transformers causal LM (eval mode, on `device`)."""
    config = engine_config or EngineConfig()
    where = torch.device(device) if device is not None else next(model.parameters()).device
    runner = SingleDeviceRunner(
        model,
        device=where,
        kv_cache_bytes=kv_cache_budget(free_device_bytes(where), config),
        kv_block_size=config.kv_block_size,
        max_batch_size=config.max_batch_size,
        max_context=max_context,
    )
    # Packing and the pool's allocation run on the owner thread: right here when this is it
    # (the neuron's manager builds engines there, so the pool exists before the next load's
    # pre-flight reads the free memory), else queued ahead of any step (the worker runs jobs
    # in order; a failure then surfaces again in the first request, which retries it).
    if worker.is_current:
        runner.prepare()
    else:
        worker.submit(runner.prepare)
    return TorchEngine(
        runner, worker=worker, config=config, model_id=model_id, on_device_fault=on_device_fault
    )


__all__ = ["SingleDeviceRunner", "TokenStream", "TorchEngine", "build_engine", "kv_cache_budget"]
