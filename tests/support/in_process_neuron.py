"""The neuron app in process over a real lifecycle manager on a CPU-only host, for the tests
that serve a real (tiny) model through its HTTP API without starting a process."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2

from cortex_core.config.neuron import NeuronConfig
from neuron.app import create_app
from neuron.discovery import HostProbe
from neuron.manager import ModelManager
from support.engine_harness import HANG_GUARD_SECS
from support.local_models import neuron_config


class InProcessNeuron:
    """`client` calls the app; a request that hangs fails at the hang guard."""

    def __init__(self, config: NeuronConfig) -> None:
        probe = HostProbe(None, cuda_unavailable_reason="test host: CPU only")
        self.manager = ModelManager(config, probe)
        self.app = create_app(config, probe=probe, manager=self.manager, activate_defaults=False)
        self.client = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=self.app), base_url="http://test", timeout=HANG_GUARD_SECS
        )

    async def close(self) -> None:
        await self.client.aclose()
        await self.manager.close()


@contextlib.asynccontextmanager
async def serving(model: Path, config: NeuronConfig | None = None) -> AsyncIterator[InProcessNeuron]:
    """A neuron with the model folder `model` loaded through its API, closed afterwards."""
    node = InProcessNeuron(config or neuron_config())
    try:
        loaded = await node.client.post("/models/load", json={"model_id": str(model)})
        assert loaded.status_code == 200, loaded.text
        yield node
    finally:
        await node.close()


def sse_data(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of a streamed answer's `data:` lines, the final [DONE] left out."""
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
