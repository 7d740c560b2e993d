"""Process groups built directly from a store, without torch.distributed's global default group.

The daemon may hold several tensor-parallel models, and a poisoned one must be thrown away
and loaded again; `init_process_group` allows one default group per process and cannot be
torn down reliably after a failed collective. Constructing the backend object ourselves
(ProcessGroupGloo / ProcessGroupNCCL over our own TCPStore) gives one independent group
per model that is simply dropped. gloo and NCCL differ only in the constructor.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Store, TCPStore

from neuron.tp.shard import AllReduce

BACKENDS = ("gloo", "nccl")
LOOPBACK = "127.0.0.1"


class UnsupportedBackend(ValueError):
    pass


def rank_devices(devices: list[int], backend: str) -> list[str]:
    """The torch device each rank owns: one CUDA device per rank for NCCL, the CPU for gloo."""
    if backend not in BACKENDS:
        raise UnsupportedBackend(f"unknown tensor parallel backend {backend!r} (expected one of {BACKENDS})")
    if not devices:
        raise UnsupportedBackend("tensor parallel needs at least one device")
    if len(set(devices)) != len(devices):
        raise UnsupportedBackend(f"tensor parallel devices must be distinct, got {devices}")
    if backend == "nccl":
        return [f"cuda:{index}" for index in devices]
    return ["cpu"] * len(devices)


def choose_backend(*, cuda_available: bool, allow_cpu: bool) -> str:
    """NCCL where there are GPUs; gloo on CPU only when the operator allowed it."""
    if cuda_available:
        return "nccl"
    if allow_cpu:
        return "gloo"
    raise UnsupportedBackend(
        "tensor parallel needs CUDA devices (this host has none); "
        "set allow_cpu_tensor_parallel = true in neuron.toml to run it on CPU ranks with gloo"
    )


def _timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def master_store(world_size: int, timeout_s: float) -> TCPStore:
    """Rank 0's rendezvous store on a free loopback port (port 0: the kernel picks, no race)."""
    return TCPStore(LOOPBACK, 0, world_size, True, _timeout(timeout_s), wait_for_workers=False)


def client_store(port: int, world_size: int, timeout_s: float) -> TCPStore:
    return TCPStore(LOOPBACK, port, world_size, False, _timeout(timeout_s))


def create_group(
    backend: str, store: Store, rank: int, world_size: int, timeout_s: float, device: str
) -> Any:
    """A gloo or NCCL backend object for this rank (blocks until every rank has joined)."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, _timeout(timeout_s))
    if backend == "nccl":
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None or not dist.is_nccl_available():
            raise UnsupportedBackend("this torch build has no NCCL support (a CPU-only wheel?)")
        # In the daemon a collective timeout must fail the step, never tear down the process:
        # "2" makes NCCL abort its communicators only; our watchdog fires first anyway.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        torch.cuda.set_device(torch.device(device))
        options = nccl.Options()
        options.is_high_priority_stream = False
        options._timeout = _timeout(timeout_s)
        return nccl(store, rank, world_size, options)
    raise UnsupportedBackend(f"unknown tensor parallel backend {backend!r} (expected one of {BACKENDS})")


def all_reduce_with(group: Any) -> AllReduce:
    def all_reduce(tensor: torch.Tensor) -> None:
        group.allreduce([tensor]).wait()

    return all_reduce


def sanity_sum(group: Any, device: str) -> int:
    """Every rank contributes 1; each must observe the world size."""
    ones = torch.ones(1, dtype=torch.int32, device=device)
    group.allreduce([ones]).wait()
    return int(ones.item())


def abort_group(group: Any, backend: str) -> None:
    """Unblock a wedged NCCL collective. gloo has no working abort (a blocked gloo op stays
    blocked); it is unblocked by killing the peer ranks, which closes their sockets."""
    if backend == "nccl":
        group.abort()
