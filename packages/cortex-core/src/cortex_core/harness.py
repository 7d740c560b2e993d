"""The harness protocol: how a neuron's lifecycle manager has a model runtime load and free models.

The lifecycle rules — states, single-flight loads, memory reservations, poisoning, drain —
are the same whatever runs the model, so one lifecycle manager (neuron.manager) owns them
and a harness only does the runtime's part: put a model on its devices, and take it off.
`torch` (in process) is one harness; tensor parallel rides on it. Another runtime (a
candle process, a vLLM server on a node that wants one, a scripted fake in tests) is
another class with these methods, named by `harness` in models.toml / `/models/load`.

For one load the manager hands the harness a `LoadTicket`: what to load, the memory the
other loads have not claimed, a reservation that holds memory until the load ends, and
the callbacks that report where the model went and when a device failed under it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from cortex_core.neuron_api import ModelSpec

# Per device (None = host memory): the bytes a load will hold there, and how to name the
# device in a refusal ("GPU 0", "this host's memory (CPU)").
Weights = Mapping[int | None, tuple[int, str]]

Model = TypeVar("Model")


class LoadTicket(Protocol):
    """The lifecycle manager's side of one load."""

    @property
    def model_id(self) -> str:
        """The id the model is served under (`spec.served_id`)."""
        ...

    @property
    def spec(self) -> ModelSpec: ...

    def free_bytes(self, device: int | None) -> int:
        """Free memory on `device` less what loads in progress have reserved there."""
        ...

    def reserve(self, weights: Weights) -> AbstractContextManager[None]:
        """Check the fit again and hold the memory until the block ends; raises ApiError
        (422) naming the device when it no longer fits. No await between the check and the
        hold, so two loads never count the same free bytes."""
        ...

    def placed(self, device: int | None, devices: Sequence[int] = ()) -> None:
        """Where the model goes (rank 0's device, and every rank's), as soon as it is known."""
        ...

    def sized(self, memory_bytes: int) -> None:
        """The memory the model holds (weights and caches), for /models and eviction."""
        ...

    def device_fault(self) -> Callable[[str], None]:
        """A reporter, callable from any thread, for a fault that leaves the model's devices
        unusable: every model on them is poisoned."""
        ...

    def model_fault(self) -> Callable[[str], None]:
        """A reporter, callable from any thread, for a fault of this model alone (a
        tensor-parallel rank that died): it is poisoned."""
        ...


class Harness(Protocol[Model]):
    @property
    def name(self) -> str:
        """What `harness = "..."` in models.toml / `/models/load` selects."""
        ...

    async def load(self, ticket: LoadTicket) -> Model:
        """Put the model on its devices and return it ready to serve, or raise ApiError."""
        ...

    async def unload(self, model: Model) -> None:
        """Stop it and give its memory back."""
        ...

    async def close(self) -> None:
        """Release what the harness holds beyond its models (threads, processes)."""
        ...
