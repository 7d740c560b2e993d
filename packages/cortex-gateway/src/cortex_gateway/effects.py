"""Effects: the neuron calls the control plane makes, behind one small interface.

The router decides and keeps the books; everything that leaves the process goes through an
`Effects` object, so the decision logic can be driven by fakes and the real one is a thin
mapping of node names onto `NeuronClient` calls. Every method raises `NeuronError` when the
neuron cannot be reached or refuses.
"""

from __future__ import annotations

from typing import Protocol

from cortex_core.neuron_api import ModelSpec
from cortex_gateway.fleet import FleetState
from cortex_gateway.neuron_client import NeuronClient


class Effects(Protocol):
    async def load(self, node: str, spec: ModelSpec) -> None:
        """Returns once the model is resident on `node`."""
        ...

    async def unload(self, node: str, model_id: str) -> None: ...

    async def inference_url(self, node: str, model_id: str) -> str: ...


class NeuronEffects:
    """`Effects` over HTTP: the node's configured endpoint from the fleet, the call from the client."""

    def __init__(self, client: NeuronClient, fleet: FleetState) -> None:
        self._client = client
        self._fleet = fleet

    async def load(self, node: str, spec: ModelSpec) -> None:
        await self._client.load(self._fleet.endpoint_of(node), spec)

    async def unload(self, node: str, model_id: str) -> None:
        await self._client.unload(self._fleet.endpoint_of(node), model_id)

    async def inference_url(self, node: str, model_id: str) -> str:
        return await self._client.inference_url(self._fleet.endpoint_of(node), model_id)
