"""Poller: keeps FleetState in step with every neuron.

Each cycle polls all neurons concurrently (a dead one costs its own timeout, not everyone's):
`/discovery` once (again after the neuron restarted), then `/models` and `/health` together.
`/models` decides health: an answer makes the node healthy at once; a node turns unhealthy
only after `unhealthy_after` failures in a row (debounce, reference gotcha G3). A `/health`
failure keeps the previous reading and never changes health on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cortex_gateway.fleet import FleetState
from cortex_gateway.neuron_client import NeuronClient, NeuronError

log = logging.getLogger(__name__)


class Poller:
    def __init__(self, fleet: FleetState, client: NeuronClient, *, interval_secs: float) -> None:
        self._fleet = fleet
        self._client = client
        self._interval = interval_secs
        self._task: asyncio.Task[None] | None = None
        self.cycles = 0

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll_node(name) for name in self._fleet.node_names))
        self.cycles += 1

    async def _poll_node(self, name: str) -> None:
        endpoint = self._fleet.endpoint_of(name)
        if not self._fleet.has_discovery(name):
            try:
                self._fleet.record_discovery(name, await self._client.discovery(endpoint))
            except NeuronError as exc:
                log.debug("discovery of %s failed: %s", name, exc.message)
        models, health = await asyncio.gather(
            self._client.models(endpoint), self._client.health(endpoint), return_exceptions=True
        )
        if isinstance(models, NeuronError):
            if self._fleet.record_failure(name, models.message):
                log.warning("neuron %s is unhealthy: %s", name, models.message)
        elif isinstance(models, BaseException):
            raise models
        else:
            self._fleet.record_models(name, models)
        if isinstance(health, NeuronError):
            log.debug("health of %s failed: %s", name, health.message)
        elif isinstance(health, BaseException):
            raise health
        elif self._fleet.record_health(name, health):
            log.info("neuron %s restarted; fetching its topology again", name)
            self._fleet.forget_discovery(name)

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cortex-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
