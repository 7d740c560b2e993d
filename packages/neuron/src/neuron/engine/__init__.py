"""The inference engine: a continuous-batching scheduler per loaded model.

`build_engine` is what model loading calls once the transformers model is on its device:

    engine = build_engine(model, worker=worker, engine_config=config.engine, model_id="org/name")

`device` defaults to the device of the model's parameters. All torch work (packing the
model's CPU linears, then every forward) runs on `worker`'s thread. `max_context` defaults to the
model's `max_position_embeddings`. Close with `await engine.close()` (frees the runner).
"""

from __future__ import annotations

from typing import Any

import torch

from cortex_core.config.neuron import EngineConfig
from neuron.device import DeviceWorker
from neuron.engine.engine import TokenStream, TorchEngine
from neuron.engine.hf_runner import SingleDeviceRunner


def build_engine(
    model: Any,
    *,
    worker: DeviceWorker,
    device: torch.device | str | None = None,
    engine_config: EngineConfig | None = None,
    model_id: str = "",
    max_context: int | None = None,
) -> TorchEngine:
    """A TorchEngine over a loaded transformers causal LM (eval mode, on `device`)."""
    config = engine_config or EngineConfig()
    runner = SingleDeviceRunner(
        model,
        device=device if device is not None else next(model.parameters()).device,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
        prefix_cache_entries=config.prefix_cache_entries,
        max_context=max_context,
    )
    # Packing runs on the owner thread, ahead of any step (the worker runs jobs in order); a
    # failure here surfaces again in the first request, which retries it.
    worker.submit(runner.prepare)
    return TorchEngine(runner, worker=worker, config=config, model_id=model_id)


__all__ = ["SingleDeviceRunner", "TokenStream", "TorchEngine", "build_engine"]
