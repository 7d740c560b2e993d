"""Router: the one owner of placement decisions, and the edge that carries them out.

A request sends it an intent — `acquire(requested_model)` — and awaits a lease. The
decision and the memory it spends are made in one synchronous step (`_decide`): placement
(`placement.place`, pure) reads the fleet snapshot and, before anything can interleave, a
cold load is claimed in `FleetState.reserve_load` (victims marked `unloading`, the model
`loading`, its memory reserved). All of it runs on the event loop without an `await`, so
it is a serialised section: two requests can never spend the same free memory, and a
second request for a model that is being loaded finds it `loading` and joins that load.

Then, outside the section:
- ServeOn → a Lease over those replicas (inference URLs cached per replica);
- ColdLoad → one task per (node, model) unloads the claimed victims and loads the model
  (single-flight: every request for that pair awaits the same task), then the request
  decides again (the model is now loaded, so the next decision serves it);
- Refuse → the ApiError the HTTP edge renders.

Neuron calls go through an injected `Effects` (effects.py). Waiting for a load is bounded
twice: at most `max_waiting_per_model` requests wait per model (one more gets 429 +
Retry-After), and each waits at most `load_wait_secs` (then 503 + Retry-After; the load
itself goes on). A failed load reaches every waiter with the neuron's reason. A load task
is shielded from the requests that wait on it, so a client that goes away never cancels a
load others wait for.

Recovery: after every poll cycle `start_recoveries()` reloads the failed and poisoned
catalogue models whose back-off is over (FleetState keeps the attempts and the capped
exponential back-off; a poisoned model is unloaded first). The reload is claimed through
the same step as any cold load, restricted to the model's node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.errors import ApiError
from cortex_core.neuron_api import ModelSpec
from cortex_gateway.effects import Effects
from cortex_gateway.fleet import ROUTABLE, FleetSnapshot, FleetState
from cortex_gateway.lease import ControlPlaneObserver, Lease, NullObserver, Upstream
from cortex_gateway.neuron_client import NeuronError
from cortex_gateway.placement import ColdLoad, PlacementPolicy, Refuse, ServeOn, place

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
        effects: Effects,
        *,
        policy: PlacementPolicy,
        limits: RouterLimits,
        clock: Callable[[], float],
        observer: ControlPlaneObserver | None = None,
    ) -> None:
        self._fleet = fleet
        self._catalogue = catalogue
        self._effects = effects
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

    def waiting_for_load(self, model_id: str) -> int:
        """How many requests wait for `model_id`'s load now (what max_waiting_per_model bounds)."""
        return self._waiting.get(model_id, 0)

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
            step = self._decide(model_id, self._fleet.snapshot())
            if isinstance(step, ServeOn):
                lease = await self._lease(requested_model, model_id, step.nodes, cold, started)
                if lease is not None:
                    return lease
                continue
            if step is not None:
                cold = True
                await self._wait_for_load(model_id, step, started)
        raise self._kept_changing(model_id)

    def _kept_changing(self, model_id: str) -> ApiError:
        """Every decision lost its claim to a concurrent one, MAX_ROUNDS times over."""
        return ApiError(
            503,
            f"model '{model_id}' could not be placed: the fleet kept changing; retry shortly",
            code="service_unavailable",
            retry_after=self._policy.busy_retry_after,
        )

    def _decide(self, model_id: str, snapshot: FleetSnapshot) -> ServeOn | _PendingLoad | None:
        """Place and reserve in one synchronous step (no await: nothing interleaves).

        Returns where to serve, the load to wait for, or None when the claim lost a race
        (the caller decides again). Raises the refusal.
        """
        decision = place(model_id, self._catalogue, snapshot, self._clock(), self._policy)
        if isinstance(decision, Refuse):
            raise _refusal(decision)
        if isinstance(decision, ServeOn):
            return decision
        key = (decision.node, model_id)
        task = self._loads.get(key)
        if task is not None:
            return _PendingLoad(decision.node, task)
        profile = self._catalogue.get(model_id) or ModelProfile(id=model_id)
        if decision.join_existing:
            # The neuron is loading it on its own (a pre-warm, another gateway): load again,
            # which the neuron joins, so this gateway learns when it is done.
            self._fleet.load_started(decision.node, model_id, decision.devices, profile.vram_mb or 0)
        elif not self._fleet.reserve_load(
            decision.node,
            model_id,
            evict=decision.evict,
            devices=decision.devices,
            memory_mb=profile.vram_mb or 0,
        ):
            return None
        task = asyncio.create_task(
            self._cold_load(profile, decision), name=f"load {model_id} on {decision.node}"
        )
        self._track(decision.node, model_id, task)
        return _PendingLoad(decision.node, task)

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
            url = await self._effects.inference_url(node, model_id)
        except NeuronError as exc:
            log.warning("no inference endpoint for %s on %s: %s", model_id, node, exc.message)
            return None
        self._fleet.set_inference_url(node, model_id, url)
        return url

    def _upstream_failed(self, upstream: Upstream, reason: str, unreachable: bool) -> None:
        log.warning(
            "request to %s on %s failed before the first byte: %s", upstream.model_id, upstream.node, reason
        )
        if unreachable and self._fleet.connection_failed(upstream.node, reason):
            # A dead node leaves the rotation at once instead of costing every request a
            # connect failure until the poller notices; the poll after the cool-down probes it.
            log.warning("circuit breaker of neuron %s opened: %s", upstream.node, reason)

    async def _wait_for_load(self, model_id: str, pending: _PendingLoad, started: float) -> None:
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
        remaining = self._limits.load_wait_secs - (self._clock() - started)
        self._waiting[model_id] = waiting + 1
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                await asyncio.shield(pending.task)
        except TimeoutError as exc:
            raise ApiError(
                503,
                f"model '{model_id}' is still loading on neuron '{pending.node}'; "
                f"gave up waiting after {self._limits.load_wait_secs:g} s — retry shortly",
                code="model_loading",
                retry_after=self._policy.busy_retry_after,
            ) from exc
        finally:
            self._waiting[model_id] -= 1
            if not self._waiting[model_id]:
                del self._waiting[model_id]

    def _track(self, node: str, model_id: str, task: asyncio.Task[None]) -> None:
        """Single flight: the one load (or reload) of `model_id` on `node` everyone awaits."""
        key = (node, model_id)
        self._loads[key] = task
        task.add_done_callback(lambda done: self._load_done(key, done))

    def _load_done(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._loads.pop(key, None)
        # Waiters saw any error already; retrieving it keeps asyncio from logging it again
        # when every waiter had given up.
        if not task.cancelled():
            task.exception()

    # ---- the side effects ------------------------------------------------------------------

    async def _cold_load(self, profile: ModelProfile, decision: ColdLoad) -> None:
        """Unload the claimed victims, then load; raises ApiError (with the neuron's reason)."""
        model_id, node = profile.id, decision.node
        for index, victim in enumerate(decision.evict):
            try:
                await self._unload(node, victim)
            except BaseException:
                # The load will not happen: its reservation goes, and the victims not yet
                # unloaded are residents again.
                for untouched in decision.evict[index + 1 :]:
                    self._fleet.unload_failed(node, untouched)
                self._fleet.load_failed(node, model_id, f"could not make room: unloading '{victim}' failed")
                raise
        if not decision.join_existing:
            self._observer.cold_start(model_id, node)
        self.load_calls += 1
        log.info("loading %s on %s (devices %s)", model_id, node, list(decision.devices) or "default")
        started = self._clock()
        try:
            await self._effects.load(node, load_spec(profile, decision.devices))
        except NeuronError as exc:
            self._observer.load_finished(model_id, node, self._clock() - started, False)
            # A neuron that refused (4xx: unsupported, does not fit) will refuse again; only
            # an unreachable neuron or its own failure (5xx) is worth a reload later.
            refused = exc.status is not None and 400 <= exc.status < 500
            self._fleet.load_failed(node, model_id, exc.message, recover=not refused)
            log.warning("loading %s on %s failed: %s", model_id, node, exc.message)
            raise _load_failure(model_id, node, exc) from exc
        except BaseException:
            self._fleet.load_failed(node, model_id, "the load was interrupted (gateway shutting down)")
            raise
        seconds = self._clock() - started
        self._observer.load_finished(model_id, node, seconds, True)
        self._fleet.load_finished(node, model_id, profile.vram_mb)
        log.info("loaded %s on %s in %.1f s", model_id, node, seconds)

    async def _unload(
        self, node: str, model_id: str, *, status: str = ROUTABLE, evicted: bool = True
    ) -> None:
        """Unload a model already claimed (`unloading`) and credit its memory back."""
        view = self._fleet.snapshot().node(node)
        footprint = None
        if view is not None and (resident := view.models.get(model_id)) is not None:
            footprint = resident.memory_mb
        if footprint is None and (profile := self._catalogue.get(model_id)) is not None:
            footprint = profile.vram_mb
        try:
            await self._effects.unload(node, model_id)
        except NeuronError as exc:
            if exc.status != 404:  # 404: already gone, which is what we wanted
                self._fleet.unload_failed(node, model_id, status=status)
                raise ApiError(
                    503,
                    f"unloading '{model_id}' from neuron '{node}' failed: {exc.message}",
                    code="service_unavailable",
                    retry_after=self._policy.busy_retry_after,
                ) from exc
        except BaseException:
            self._fleet.unload_failed(node, model_id, status=status)
            raise
        self._fleet.unload_finished(node, model_id, credit_mb=footprint)
        if evicted:
            self._observer.evicted(model_id, node)
        log.info("unloaded %s from %s", model_id, node)

    # ---- recovery ------------------------------------------------------------------------

    def start_recoveries(self) -> None:
        """Start the reloads whose back-off is over (called after every poll cycle)."""
        for node, model_id, status in self._fleet.recoveries_due():
            if (node, model_id) in self._loads:
                continue
            profile = self._catalogue.get(model_id)
            if profile is None:
                continue
            self._fleet.recovery_attempted(node, model_id)
            task = asyncio.create_task(
                self._recover(profile, node, poisoned=status == "poisoned"),
                name=f"recover {model_id} on {node}",
            )
            self._track(node, model_id, task)

    async def _recover(self, profile: ModelProfile, node: str, *, poisoned: bool) -> None:
        model_id = profile.id
        log.info("recovering %s on %s (%s)", model_id, node, "poisoned" if poisoned else "failed")
        if poisoned:
            # A poisoned model still holds its memory; the neuron wants it unloaded first.
            if not self._fleet.begin_unload(node, model_id, any_state=True, keep_recovery=True):
                return
            try:
                await self._unload(node, model_id, status="poisoned", evicted=False)
            except ApiError as error:
                self._fleet.load_failed(node, model_id, error.message)
                return
        else:
            self._fleet.clear_broken(node, model_id)
        snapshot = self._fleet.snapshot()
        only_here = FleetSnapshot(
            nodes=tuple(n for n in snapshot.nodes if n.name == node), taken_at=snapshot.taken_at
        )
        decision = place(model_id, self._catalogue, only_here, self._clock(), self._policy)
        if not isinstance(decision, ColdLoad) or decision.join_existing:
            reason = decision.message if isinstance(decision, Refuse) else "placement changed"
            self._fleet.load_failed(node, model_id, f"reload deferred: {reason}")
            return
        if not self._fleet.reserve_load(
            node, model_id, evict=decision.evict, devices=decision.devices, memory_mb=profile.vram_mb or 0
        ):
            self._fleet.load_failed(node, model_id, "reload deferred: the room it needed was taken")
            return
        with contextlib.suppress(ApiError):  # load_failed has booked the next attempt
            await self._cold_load(profile, decision)

    # ---- admin ---------------------------------------------------------------------------

    async def load_by_hand(self, requested_model: str, node: str | None) -> str:
        """`cortex models load`: place (or use the given node) and wait; returns the node."""
        model_id = self._catalogue.resolve_alias(requested_model)
        started = self._clock()
        for _ in range(MAX_ROUNDS):
            snapshot = self._fleet.snapshot()
            if node is not None:
                self._require_node(node)
                view = snapshot.node(node)
                assert view is not None
                resident = view.models.get(model_id)
                if resident is not None and resident.status == ROUTABLE:
                    return node
                snapshot = FleetSnapshot(nodes=(view,), taken_at=snapshot.taken_at)
            step = self._decide(model_id, snapshot)
            if isinstance(step, ServeOn):
                return step.nodes[0]
            if step is not None:
                await self._wait_for_load(model_id, step, started)
        raise self._kept_changing(model_id)

    async def unload_by_hand(self, requested_model: str, node: str | None) -> list[str]:
        """`cortex models unload`, in every state; returns the nodes it was unloaded from.

        A loaded, failed, poisoned or recovering entry is unloaded (recovery stops); a load
        in progress is waited for, then unloaded.
        """
        model_id = self._catalogue.resolve_alias(requested_model)
        if node is not None:
            self._require_node(node)
        snapshot = self._fleet.snapshot()
        nodes = [n.name for n in snapshot.nodes if (node is None or n.name == node) and model_id in n.models]
        if not nodes:
            where = f"neuron '{node}'" if node else "any neuron"
            raise ApiError(
                404, f"model '{model_id}' is not loaded on {where}", code="model_not_loaded", param="model"
            )
        for name in nodes:
            load = self._loads.get((name, model_id))
            if load is not None:
                # The operator wants it gone: let the load finish (or fail) first.
                with contextlib.suppress(ApiError):
                    await asyncio.shield(load)
            view = self._fleet.snapshot().node(name)
            resident = view.models.get(model_id) if view is not None else None
            if resident is None:
                continue
            status = resident.status
            if not self._fleet.begin_unload(name, model_id, any_state=True):
                raise ApiError(
                    409,
                    f"model '{model_id}' on neuron '{name}' is {status}"
                    f"{' with requests in flight' if status == ROUTABLE else ''}; unload it when it is idle",
                    code="model_busy",
                    param="model",
                )
            await self._unload(name, model_id, status=status, evicted=False)
        return nodes

    def _require_node(self, node: str) -> None:
        if node not in self._fleet.node_names:
            known = ", ".join(self._fleet.node_names) or "none configured"
            raise ApiError(
                404, f"unknown neuron '{node}' (known: {known})", code="node_not_found", param="node"
            )


@dataclass(frozen=True, slots=True)
class _PendingLoad:
    """A load (ours, single-flight per node and model) a request waits for."""

    node: str
    task: asyncio.Task[None]


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
