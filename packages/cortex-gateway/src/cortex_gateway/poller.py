"""Poller: keeps FleetState in step with every neuron.

Each cycle polls all neurons concurrently (a dead one costs its own timeout, not everyone's):
`/discovery` once (again after the neuron restarted), then `/models` and `/health` together.
`/models` decides health: an answer makes the node healthy at once; a node turns unhealthy
only after `unhealthy_after` failures in a row (debounce, reference gotcha G3). A `/health`
failure keeps the previous reading and never changes health on its own.

The poller is supervised: an unexpected error while polling one node (a bug, an answer the
fleet cannot digest) is logged with its traceback, counted in
`cortex_poller_errors_total{node}`, and the other nodes and the next cycles go on. A poller
that died silently would freeze the fleet view while the gateway kept answering from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from cortex_gateway.fleet import FleetState
from cortex_gateway.neuron_client import NeuronClient, NeuronError

log = logging.getLogger(__name__)


def _ignore(node: str) -> None:
    return None


class Poller:
    def __init__(
        self,
        fleet: FleetState,
        client: NeuronClient,
        *,
        interval_secs: float,
        on_error: Callable[[str], None] = _ignore,
        after_cycle: Callable[[], None] | None = None,
    ) -> None:
        self._fleet = fleet
        self._client = client
        self._interval = interval_secs
        self._on_error = on_error
        # What acts on a fresh view (the router's recoveries); supervised like the polls.
        self._after_cycle = after_cycle
        self._task: asyncio.Task[None] | None = None
        self.cycles = 0
        self.errors = 0

    async def poll_once(self) -> None:
        names = self._fleet.node_names
        results = await asyncio.gather(*(self._poll_node(name) for name in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                self._failed(name, result)
        self.cycles += 1
        if self._after_cycle is not None:
            self._after_cycle()

    def _failed(self, node: str, error: BaseException) -> None:
        self.errors += 1
        log.error("polling neuron %s failed unexpectedly; polling goes on", node, exc_info=error)
        self._on_error(node)

    async def _poll_node(self, name: str) -> None:
        endpoint = self._fleet.endpoint_of(name)
        if not self._fleet.has_discovery(name):
            try:
                self._fleet.record_discovery(name, await self._client.discovery(endpoint))
            except NeuronError as exc:
                log.debug("discovery of %s failed: %s", name, exc.message)
        # Taken before /health is asked: the reading measures every load settled before it.
        mark = self._fleet.mark()
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
        elif self._fleet.record_health(name, health, mark=mark):
            log.info("neuron %s restarted; fetching its topology again", name)
            self._fleet.forget_discovery(name)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed("*", exc)
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cortex-poller")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
