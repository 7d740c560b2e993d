"""Router: carries out placement decisions (the side-effect edge of the control plane).

`acquire(requested_model)` resolves the alias, asks `placement.place` what to do with a
fresh fleet snapshot, and then:
- ServeOn → a Lease over those replicas (inference URLs cached per replica);
- ColdLoad → evictions (POST /models/unload) then POST /models/load, single-flight per
  (node, model): every request for that pair awaits the same task. Then it places again
  (the model is now loaded, so the next decision serves it);
- Refuse → the ApiError the HTTP edge renders.

Waiting for a load is bounded twice: at most `max_waiting_per_model` requests wait per model
(one more gets 429 + Retry-After), and each waits at most `load_wait_secs` (then 503 +
Retry-After; the load itself goes on and later requests find it loaded). A failed load
reaches every waiter with the neuron's reason. A load task is shielded from the requests
that wait on it, so a client that goes away never cancels a load others wait for.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.errors import ApiError
from cortex_core.neuron_api import ModelSpec
from cortex_gateway.fleet import FleetState
from cortex_gateway.neuron_client import NeuronClient, NeuronError
from cortex_gateway.placement import ColdLoad, PlacementPolicy, Refuse, ServeOn, place
from cortex_gateway.routing import ControlPlaneObserver, Lease, NullObserver, Upstream

log = logging.getLogger(__name__)

# Placement → action rounds per request: load, then serve; a round more for a lost race
# (a victim got busy, a replica vanished between snapshot and lease).
MAX_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class RouterLimits:
    max_waiting_per_model: int = 64
    load_wait_secs: float = 600.0


class Router:
    def __init__(
        self,
        fleet: FleetState,
        catalogue: ModelCatalogue,
        client: NeuronClient,
        *,
        policy: PlacementPolicy,
        limits: RouterLimits,
        clock: Callable[[], float],
        observer: ControlPlaneObserver | None = None,
    ) -> None:
        self._fleet = fleet
        self._catalogue = catalogue
        self._client = client
        self._policy = policy
        self._limits = limits
        self._clock = clock
        self._observer: ControlPlaneObserver = observer or NullObserver()
        self._loads: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._waiting: dict[str, int] = {}
        self.load_calls = 0

    @property
    def loads_in_flight(self) -> list[tuple[str, str]]:
        return sorted(self._loads)

    async def settle(self) -> None:
        """Wait until the loads in flight now have finished (successfully or not)."""
        await asyncio.gather(*self._loads.values(), return_exceptions=True)

    async def close(self) -> None:
        tasks = list(self._loads.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- the request path ------------------------------------------------------------------

    async def acquire(self, requested_model: str) -> Lease:
        model_id = self._catalogue.resolve_alias(requested_model)
        started = self._clock()
        cold = False
        for _ in range(MAX_ROUNDS):
            decision = place(model_id, self._catalogue, self._fleet.snapshot(), self._clock(), self._policy)
            if isinstance(decision, Refuse):
                raise _refusal(decision)
            if isinstance(decision, ServeOn):
                lease = await self._lease(requested_model, model_id, decision.nodes, cold, started)
                if lease is not None:
                    return lease
                continue
            cold = True
            await self._wait_for_load(model_id, decision, started)
        raise ApiError(
            503,
            f"model '{model_id}' could not be placed: the fleet kept changing; retry shortly",
            code="service_unavailable",
            retry_after=self._policy.busy_retry_after,
        )

    async def _lease(
        self, requested: str, model_id: str, nodes: tuple[str, ...], cold: bool, started: float
    ) -> Lease | None:
        candidates = []
        for node in nodes:
            url = self._fleet.inference_url(node, model_id)
            if url is None:
                url = await self._resolve_url(node, model_id)
            if url is not None:
                candidates.append(Upstream(node=node, base_url=url, model_id=model_id))
        if not candidates:
            return None
        waited = self._clock() - started if cold else 0.0
        if cold:
            self._observer.queue_wait(model_id, waited)
        return Lease(
            requested_model=requested,
            model_id=model_id,
            candidates=candidates,
            cold_start=cold,
            waited_secs=waited,
            on_use=lambda u: self._fleet.request_started(u.node, u.model_id),
            on_done=lambda u: self._fleet.request_finished(u.node, u.model_id),
            on_failure=self._upstream_failed,
        )

    async def _resolve_url(self, node: str, model_id: str) -> str | None:
        try:
            url = await self._client.inference_url(self._fleet.endpoint_of(node), model_id)
        except NeuronError as exc:
            log.warning("no inference endpoint for %s on %s: %s", model_id, node, exc.message)
            return None
        self._fleet.set_inference_url(node, model_id, url)
        return url

    def _upstream_failed(self, upstream: Upstream, reason: str, unreachable: bool) -> None:
        log.warning(
            "request to %s on %s failed before the first byte: %s", upstream.model_id, upstream.node, reason
        )
        if unreachable:
            # Counts like a failed poll: a dead node leaves the rotation after N in a row
            # instead of costing every request a connect timeout until the next poll.
            self._fleet.record_failure(upstream.node, reason)

    async def _wait_for_load(self, model_id: str, decision: ColdLoad, started: float) -> None:
        waiting = self._waiting.get(model_id, 0)
        if waiting >= self._limits.max_waiting_per_model:
            raise ApiError(
                429,
                f"too many requests are waiting for '{model_id}' to load "
                f"({waiting}, the limit is router.max_waiting_per_model); retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                retry_after=self._policy.busy_retry_after,
            )
        task = self._load_task(model_id, decision)
        remaining = self._limits.load_wait_secs - (self._clock() - started)
        self._waiting[model_id] = waiting + 1
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                await asyncio.shield(task)
        except _Replan as exc:
            log.info("placing %s again: %s", model_id, exc)
        except TimeoutError as exc:
            raise ApiError(
                503,
                f"model '{model_id}' is still loading on neuron '{decision.node}'; "
                f"gave up waiting after {self._limits.load_wait_secs:g} s — retry shortly",
                code="model_loading",
                retry_after=self._policy.busy_retry_after,
            ) from exc
        finally:
            self._waiting[model_id] -= 1
            if not self._waiting[model_id]:
                del self._waiting[model_id]

    def _load_task(self, model_id: str, decision: ColdLoad) -> asyncio.Task[None]:
        key = (decision.node, model_id)
        task = self._loads.get(key)
        if task is None:
            task = asyncio.create_task(
                self._cold_load(model_id, decision), name=f"load {model_id} on {decision.node}"
            )
            self._loads[key] = task
            task.add_done_callback(lambda done: self._load_done(key, done))
        return task

    def _load_done(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._loads.pop(key, None)
        # Waiters saw any error already; retrieving it keeps asyncio from logging it again
        # when every waiter had given up.
        if not task.cancelled():
            task.exception()

    # ---- the side effects ------------------------------------------------------------------

    async def _cold_load(self, model_id: str, decision: ColdLoad) -> None:
        """Evict, then load; raises ApiError (with the neuron's reason) when it cannot."""
        profile = self._catalogue.get(model_id)
        node = decision.node
        endpoint = self._fleet.endpoint_of(node)
        if profile is None:
            # Joining a load the neuron started itself (a pre-warm) of an unlisted model.
            profile = ModelProfile(id=model_id)
        for victim in decision.evict:
            await self._evict(node, victim)
        spec = load_spec(profile, decision.devices)
        self._fleet.load_started(node, model_id, decision.devices, profile.vram_mb or 0)
        if not decision.join_existing:
            self._observer.cold_start(model_id, node)
        self.load_calls += 1
        log.info("loading %s on %s (devices %s)", model_id, node, list(decision.devices) or "default")
        started = self._clock()
        try:
            await self._client.load(endpoint, spec)
        except NeuronError as exc:
            self._observer.load_finished(model_id, node, self._clock() - started, False)
            self._fleet.load_failed(node, model_id, exc.message)
            log.warning("loading %s on %s failed: %s", model_id, node, exc.message)
            raise _load_failure(model_id, node, exc) from exc
        except BaseException:
            self._fleet.load_failed(node, model_id, "the load was interrupted (gateway shutting down)")
            raise
        seconds = self._clock() - started
        self._observer.load_finished(model_id, node, seconds, True)
        self._fleet.load_finished(node, model_id, profile.vram_mb)
        log.info("loaded %s on %s in %.1f s", model_id, node, seconds)

    async def _evict(self, node: str, model_id: str) -> None:
        if not self._fleet.begin_unload(node, model_id):
            # A request started on it since the decision: every waiter places again.
            raise _Replan(f"'{model_id}' on '{node}' became busy")
        view = self._fleet.snapshot().node(node)
        footprint = None
        if view is not None and (resident := view.models.get(model_id)) is not None:
            footprint = resident.memory_mb
        if footprint is None and (profile := self._catalogue.get(model_id)) is not None:
            footprint = profile.vram_mb
        try:
            await self._client.unload(self._fleet.endpoint_of(node), model_id)
        except NeuronError as exc:
            if exc.status != 404:  # 404: already gone, which is what we wanted
                self._fleet.unload_failed(node, model_id)
                raise ApiError(
                    503,
                    f"could not make room on neuron '{node}': unloading '{model_id}' failed: {exc.message}",
                    code="service_unavailable",
                    retry_after=self._policy.busy_retry_after,
                ) from exc
        self._fleet.unload_finished(node, model_id, credit_mb=footprint)
        self._observer.evicted(model_id, node)
        log.info("evicted %s from %s", model_id, node)

    # ---- admin ---------------------------------------------------------------------------

    async def load_by_hand(self, requested_model: str, node: str | None) -> str:
        """`cortex models load`: place (or use the given node) and wait; returns the node."""
        model_id = self._catalogue.resolve_alias(requested_model)
        started = self._clock()
        if node is None:
            decision = place(model_id, self._catalogue, self._fleet.snapshot(), started, self._policy)
            if isinstance(decision, Refuse):
                raise _refusal(decision)
            if isinstance(decision, ServeOn):
                return decision.nodes[0]
            await self._wait_for_load(model_id, decision, started)
            return decision.node
        self._require_node(node)
        view = self._fleet.snapshot().node(node)
        assert view is not None
        resident = view.models.get(model_id)
        if resident is not None and resident.status == "loaded":
            return node
        devices: tuple[int, ...] = ()
        profile = self._catalogue.get(model_id)
        if profile is not None and view.discovery is not None and view.discovery.devices:
            devices = tuple(d.index for d in view.discovery.devices)[: profile.min_devices]
        decision = ColdLoad(
            node=node, devices=devices, join_existing=resident is not None and resident.status == "loading"
        )
        await self._wait_for_load(model_id, decision, started)
        return node

    async def unload_by_hand(self, requested_model: str, node: str | None) -> list[str]:
        """`cortex models unload`: from `node`, or from every node that has it; returns the nodes."""
        model_id = self._catalogue.resolve_alias(requested_model)
        if node is not None:
            self._require_node(node)
        snapshot = self._fleet.snapshot()
        nodes = [
            n.name
            for n in snapshot.nodes
            if (node is None or n.name == node)
            and (m := n.models.get(model_id)) is not None
            and m.status == "loaded"
        ]
        if not nodes:
            where = f"neuron '{node}'" if node else "any neuron"
            raise ApiError(
                404, f"model '{model_id}' is not loaded on {where}", code="model_not_loaded", param="model"
            )
        for name in nodes:
            try:
                await self._evict(name, model_id)
            except _Replan as exc:
                raise ApiError(
                    409,
                    f"model '{model_id}' on neuron '{name}' has requests in flight; unload it when it is idle",
                    code="model_busy",
                    param="model",
                ) from exc
        return nodes

    def _require_node(self, node: str) -> None:
        if node not in self._fleet.node_names:
            known = ", ".join(self._fleet.node_names) or "none configured"
            raise ApiError(
                404, f"unknown neuron '{node}' (known: {known})", code="node_not_found", param="node"
            )


class _Replan(Exception):
    """The decision went stale before it could be carried out; place again."""


def load_spec(profile: ModelProfile, devices: tuple[int, ...]) -> ModelSpec:
    """The body of POST /models/load for a catalogue profile."""
    return ModelSpec(
        model_id=profile.load_id,
        # A mirror-sourced model (`helexa:Org/X`) must still be listed as the catalogue id.
        served_model_name=profile.id if profile.load_id != profile.id else None,
        harness=profile.harness,
        quant=profile.quant,
        tensor_parallel=profile.min_devices if profile.min_devices > 1 else None,
        devices=list(devices) or None,
    )


def _refusal(decision: Refuse) -> ApiError:
    return ApiError(
        decision.status,
        decision.message,
        type="invalid_request_error" if decision.status == 404 else None,
        code=decision.code,
        param="model" if decision.status == 404 else None,
        retry_after=None if decision.retry_after is None else math.ceil(decision.retry_after),
    )


def _load_failure(model_id: str, node: str, exc: NeuronError) -> ApiError:
    """An unreachable neuron is transient (503); a neuron that refused says why (502)."""
    if exc.status is None:
        return ApiError(
            503,
            f"loading '{model_id}' on neuron '{node}' failed: {exc.message}",
            code="model_load_failed",
            retry_after=5,
        )
    return ApiError(
        502,
        f"loading '{model_id}' on neuron '{node}' failed: {exc.message}",
        code="model_load_failed",
    )
