"""What rank 0 tells its workers, and what they answer.

Messages travel pickled over a private socketpair per worker (multiprocessing Connection):
one setup message after the worker says hello, then one `Call` at a time, each answered by
exactly one `Reply`. Rank 0 only sends the next call after every worker answered the
previous one, so all ranks run the same ops, and hence the same collectives, in the same
order. A worker never returns logits: every rank computes them, only rank 0's are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Op = Literal["forward", "sanity", "close"]


@dataclass(frozen=True)
class ModelSource:
    """A local Hugging Face folder (config.json + safetensors) that every rank loads itself."""

    path: str
    # torch dtype name ("float32", "bfloat16", ...); identical on every rank.
    dtype: str = "float32"
    # Import path "module:callable" building the per-rank inner runner as
    # factory(model, device=..., **runner_kwargs); every rank must build the same one.
    runner_factory: str = "neuron.engine.hf_runner:SingleDeviceRunner"
    runner_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RankSetup:
    rank: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    device: str  # "cpu" or "cuda:N"
    store_port: int
    # Bounds every collective (gloo/NCCL timeout) and the store rendezvous.
    collective_timeout_s: float
    # None: leave torch's thread count alone.
    torch_threads: int | None
    # None: a bare group (the smoke diagnostic), no model.
    model: ModelSource | None


@dataclass(frozen=True)
class Hello:
    pid: int


@dataclass(frozen=True)
class Call:
    op: Op
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Reply:
    ok: bool
    # Small plain values only (the sanity sum, the K/V layout); never tensors.
    value: Any = None
    error: str = ""
