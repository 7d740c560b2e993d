"""What model loading needs from tensor parallel: which devices, and a started runner.

`tensor_parallel_devices` is the pure placement decision (None: not a TP load);
`start_tensor_parallel` starts the runner with the engine's settings on every rank. The
model manager wraps the runner in a TorchEngine like a single-device one, and marks the
model poisoned when `on_failure` fires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from cortex_core.config.neuron import EngineConfig
from neuron.tp.group import choose_backend
from neuron.tp.protocol import ModelSource
from neuron.tp.runner import TensorParallelRunner


class TensorParallelPlacementError(ValueError):
    """The spec asks for a tensor-parallel layout this host cannot provide (a client error)."""


def tensor_parallel_devices(
    requested: Sequence[int] | None, tensor_parallel: int | None, gpu_indices: Sequence[int]
) -> list[int] | None:
    """The device of each rank, in rank order, or None for a single-device load.

    `gpu_indices`: this host's GPUs, best first (e.g. most free memory); empty on a CPU host,
    where the indices only number the CPU ranks.
    """
    listed = list(requested or [])
    size = tensor_parallel if tensor_parallel is not None else max(1, len(listed))
    if size < 1:
        raise TensorParallelPlacementError(f"tensor_parallel must be at least 1, got {size}")
    if listed and tensor_parallel is not None and len(listed) != tensor_parallel:
        raise TensorParallelPlacementError(
            f"devices {listed} name {len(listed)} device(s) but tensor_parallel is {tensor_parallel}"
        )
    if size == 1:
        return None
    if len(set(listed)) != len(listed):
        raise TensorParallelPlacementError(f"devices must be distinct, got {listed}")
    if not gpu_indices:
        return listed or list(range(size))
    if listed:
        missing = [d for d in listed if d not in gpu_indices]
        if missing:
            raise TensorParallelPlacementError(
                f"devices {missing} do not exist on this host (GPUs: {list(gpu_indices)})"
            )
        return listed
    if len(gpu_indices) < size:
        raise TensorParallelPlacementError(
            f"tensor_parallel={size} needs {size} GPUs but this host has {len(gpu_indices)}"
        )
    return list(gpu_indices[:size])


def start_tensor_parallel(
    folder: Path,
    devices: Sequence[int],
    *,
    cuda_available: bool,
    allow_cpu: bool,
    engine_config: EngineConfig,
    dtype: str,
    step_timeout_s: float,
    on_failure: Callable[[str], None] | None = None,
) -> TensorParallelRunner:
    """Start the ranks over `devices` (blocking; run it on rank 0's device owner thread).

    Raises UnsupportedBackend (no CUDA and CPU TP not allowed) or UnshardableModel (both
    ValueError, before any process starts), or TensorParallelError when a rank fails.
    """
    backend = choose_backend(cuda_available=cuda_available, allow_cpu=allow_cpu)
    source = ModelSource(
        path=str(folder),
        dtype=dtype,
        # Each rank holds 1/N of every layer's K/V heads: the cap split N ways gives every rank
        # the same number of blocks. (Sized from the cap, not from free memory: the ranks'
        # memory is not known before they load.)
        runner_kwargs={
            "kv_cache_bytes": int(engine_config.kv_cache_max_gib * (1 << 30)) // len(devices),
            "kv_block_size": engine_config.kv_block_size,
            "max_batch_size": engine_config.max_batch_size,
        },
    )
    return TensorParallelRunner.start(
        source,
        devices,
        backend=backend,
        step_timeout_s=step_timeout_s,
        worker_threads=1 if backend == "gloo" else None,
        on_failure=on_failure,
    )
