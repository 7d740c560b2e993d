"""Tensor parallel over torch.distributed: rank 0 in the daemon, N-1 worker processes.

See docs/tensor-parallel.md. Entry points: `TensorParallelRunner.start(...)` (a ModelRunner),
`choose_backend(...)` / `rank_devices(...)`, and `run_smoke(...)` for `neuron tp-smoke`.
"""

from neuron.tp.group import UnsupportedBackend, choose_backend, rank_devices
from neuron.tp.leader import TensorParallelError
from neuron.tp.protocol import ModelSource
from neuron.tp.runner import TensorParallelRunner
from neuron.tp.shard import UnshardableModel, plan_shards

__all__ = [
    "ModelSource",
    "TensorParallelError",
    "TensorParallelRunner",
    "UnshardableModel",
    "UnsupportedBackend",
    "choose_backend",
    "plan_shards",
    "rank_devices",
]
