"""The harness protocol: what a model runtime offers the neuron's lifecycle API.

A harness owns the models it loaded. The neuron's HTTP layer only ever talks to this
surface; `torch` is the one in-process implementation.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cortex_core.neuron_api import ModelInfo, ModelSpec


@runtime_checkable
class Harness(Protocol):
    @property
    def name(self) -> str: ...

    async def load(self, spec: ModelSpec) -> ModelInfo:
        """Load a model (single-flight per id); return once it is resident or raise ApiError."""
        ...

    async def unload(self, model_id: str) -> None:
        """Free the model's memory; raise ApiError(404) when it is not known."""
        ...

    def models(self) -> list[ModelInfo]:
        """Every model this harness knows, in any lifecycle state."""
        ...

    async def close(self) -> None:
        """Unload everything and release devices."""
        ...
