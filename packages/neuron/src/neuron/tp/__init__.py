"""Tensor parallel over torch.distributed: rank 0 in the daemon, N-1 worker processes.

See docs/tensor-parallel.md. Entry points: `tensor_parallel_devices(...)` and `start_tensor_parallel(...)` for model
loading, `TensorParallelRunner` (a ModelRunner), and `neuron.tp.smoke.run_smoke(...)` for
`neuron tp-smoke`.
"""

from neuron.tp.group import UnsupportedBackend, choose_backend, rank_devices
from neuron.tp.leader import TensorParallelError
from neuron.tp.loading import TensorParallelPlacementError, start_tensor_parallel, tensor_parallel_devices
from neuron.tp.protocol import ModelSource
from neuron.tp.runner import TensorParallelRunner
from neuron.tp.shard import UnshardableModel, plan_shards

__all__ = [
    "ModelSource",
    "TensorParallelError",
    "TensorParallelPlacementError",
    "TensorParallelRunner",
    "UnshardableModel",
    "UnsupportedBackend",
    "choose_backend",
    "plan_shards",
    "rank_devices",
    "start_tensor_parallel",
    "tensor_parallel_devices",
]
