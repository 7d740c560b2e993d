"""Process groups built directly from a store, without torch.distributed's global default group.

The daemon may hold several tensor-parallel models, and a poisoned one must be thrown away
and loaded again; `init_process_group` allows one default group per process and cannot be
torn down reliably after a failed collective. Constructing the backend object ourselves
(ProcessGroupGloo / ProcessGroupNCCL over our own TCPStore) gives one independent group
per model that is simply dropped. gloo and NCCL differ only in the constructor.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import MutableMapping
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Store, TCPStore

from neuron.tp.shard import AllReduce

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
LOOPBACK = "127.0.0.1"

# What NCCL must do in a process that is (or serves) the daemon; set, never defaulted, since an
# inherited value (a user's shell, a launcher's defaults) would otherwise decide whether a
# failed collective kills the daemon:
# - async error handling 2 (CleanUpOnly): a failed or timed-out collective aborts its
#   communicators and fails the call; 1 or 3 would tear the whole process down;
# - the heartbeat monitor off: when NCCL's own watchdog thread looks stuck it aborts the
#   process; our watchdog (tp/leader.py) owns hang detection and poisons only the model.
NCCL_DAEMON_ENVIRONMENT = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    "TORCH_NCCL_ENABLE_MONITORING": "0",
}


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


def configure_nccl_environment(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Set NCCL_DAEMON_ENVIRONMENT in `environ` (read by ProcessGroupNCCL when it is built);
    returns the inherited values it replaced."""
    replaced = {k: environ[k] for k, v in NCCL_DAEMON_ENVIRONMENT.items() if environ.get(k, v) != v}
    environ.update(NCCL_DAEMON_ENVIRONMENT)
    return replaced


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
        replaced = configure_nccl_environment(os.environ)
        if replaced:
            log.warning("NCCL settings inherited from the environment overridden: %s", replaced)
        where = torch.device(device)
        torch.cuda.set_device(where)
        options = nccl.Options()
        options.is_high_priority_stream = False
        options._timeout = _timeout(timeout_s)
        group = nccl(store, rank, world_size, options)
        # Bind the communicator to this rank's device now (what init_process_group's device_id
        # does): set-up errors surface at join, and no collective guesses the device later.
        group.eager_connect_single_device(where)
        return group
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


def finish_device_work(device: str) -> None:
    """Wait for the work queued on `device` (CUDA runs kernels asynchronously): a rank answers
    a call only once its GPU work is done, so the watchdog's deadline covers that work and a
    hung kernel is caught by the deadline instead of blocking a later copy with no deadline."""
    where = torch.device(device)
    if where.type == "cuda":
        torch.cuda.synchronize(where)


def abort_group(group: Any, backend: str, timeout_s: float) -> bool:
    """Unblock a wedged NCCL collective, giving up after `timeout_s` (an abort can itself hang
    on a broken device; the model is poisoned either way and the caller must not wait with it).
    gloo has no working abort (a blocked gloo op stays blocked); it is unblocked by killing the
    peer ranks, which closes their sockets. True when nothing is left hanging."""
    if backend != "nccl":
        return True
    done = threading.Event()

    def abort() -> None:
        try:
            group.abort()
        except Exception:  # logged: the group is being thrown away, there is no one to tell
            log.exception("aborting the NCCL group failed")
        finally:
            done.set()

    threading.Thread(target=abort, name="nccl-abort", daemon=True).start()
    if done.wait(timeout_s):
        return True
    log.error("aborting the NCCL group did not finish within %.0f s; leaving it behind", timeout_s)
    return False
