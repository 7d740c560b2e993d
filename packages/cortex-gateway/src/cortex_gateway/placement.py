"""Placement: where a request for a model should go. A pure function of its inputs.

`place(model_id, catalogue, snapshot, now, policy)` returns one of:
- `ServeOn(nodes)`: the model is loaded on healthy nodes; least busy first, ties by name.
- `ColdLoad(node, evict, devices)`: load it on `node` after unloading `evict`; when the
  model is already loading there (`join_existing`), wait for that load instead.
- `Refuse(status, code, message, retry_after)`: why not. 404 when no neuron can ever host
  it (with each node's reason), 503 + Retry-After when it will fit later (a node is
  unhealthy, residents are busy or within their minimum residency, the model is recovering),
  502 when its last load on every candidate failed recently (with the neuron's reason).

Feasibility of a node (filter), in the GPUStack filter → score style:
- `pinned_on` empty or naming the node;
- GPU node: at least `min_devices` devices, each of total memory >= `min_device_vram_mb`
  and >= its share of `vram_mb` (vram_mb / min_devices);
- CPU-only node (discovery lists no devices): only models with `min_devices <= 1` and no
  `min_device_vram_mb`, when the host's total memory (if reported) holds `vram_mb`. Its memory
  is one pool (fleet.HOST_MEMORY). This is how the embedded default model runs on a laptop.
Then memory (score): fits free memory now, else after the eviction policy's victims; nodes
needing fewer evictions first, then most free memory, then name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.limits import echoed
from cortex_gateway.eviction import MemoryNeed, Resident, Strategy, blocked_by_residency, plan_eviction
from cortex_gateway.fleet import HOST_MEMORY, RECOVERING, ROUTABLE, FleetSnapshot, ModelView, NodeView


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    min_residency_secs: float = 60.0
    eviction_strategy: Strategy = "priority"
    # After a load failed on a node, new requests get that failure instead of a new attempt
    # for this long (a broken model must not trigger one load per request).
    failed_load_backoff_secs: float = 30.0
    unhealthy_retry_after: float = 3.0
    busy_retry_after: float = 5.0
    no_healthy_retry_after: float = 5.0


@dataclass(frozen=True, slots=True)
class ServeOn:
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ColdLoad:
    node: str
    evict: tuple[str, ...] = ()
    devices: tuple[int, ...] = ()
    join_existing: bool = False


@dataclass(frozen=True, slots=True)
class Refuse:
    status: int
    code: str
    message: str
    retry_after: float | None = None


Decision = ServeOn | ColdLoad | Refuse


def place(
    model_id: str,
    catalogue: ModelCatalogue,
    snapshot: FleetSnapshot,
    now: float,
    policy: PlacementPolicy,
) -> Decision:
    healthy = snapshot.healthy_nodes
    replicas = [
        (node, view)
        for node in healthy
        if (view := node.models.get(model_id)) is not None and view.status == ROUTABLE
    ]
    if replicas:
        replicas.sort(key=lambda pair: (pair[0].busy_score(pair[1]), pair[0].name))
        return ServeOn(tuple(node.name for node, _ in replicas))
    loading = sorted(
        node.name
        for node in healthy
        if (view := node.models.get(model_id)) is not None and view.status == "loading"
    )
    if loading:
        return ColdLoad(node=loading[0], join_existing=True)
    profile = catalogue.get(model_id)
    if profile is None:
        return _not_in_catalogue(model_id, snapshot, now, policy)
    if not healthy:
        return Refuse(
            503,
            "service_unavailable",
            f"no healthy neuron is available to serve '{model_id}' right now",
            policy.no_healthy_retry_after,
        )
    return _cold_load(profile, catalogue, snapshot, now, policy)


def _not_in_catalogue(model_id: str, snapshot: FleetSnapshot, now: float, policy: PlacementPolicy) -> Refuse:
    """A model the catalogue does not know can only be served where a neuron has it."""
    for node in snapshot.nodes:
        view = node.models.get(model_id)
        if view is None:
            continue
        if not node.healthy:
            return Refuse(
                503,
                "service_unavailable",
                f"model '{model_id}' is only on neuron '{node.name}', which is unhealthy; retry shortly",
                policy.unhealthy_retry_after,
            )
        transient = _status_refusal(model_id, node.name, view, now, policy)
        if transient is not None:
            return transient
    return Refuse(
        404,
        "model_not_found",
        f"The model '{echoed(model_id)}' does not exist on any neuron and is not in the catalogue; "
        "GET /v1/models lists the models this gateway can serve.",
    )


def _status_refusal(
    model_id: str, node: str, view: ModelView, now: float, policy: PlacementPolicy
) -> Refuse | None:
    status, error, failed_at = view.status, view.error, view.failed_at
    if status == RECOVERING:
        detail = f" ({error})" if error else ""
        wait = (view.retry_at - now) if view.retry_at is not None else policy.busy_retry_after
        return Refuse(
            503,
            "model_recovering",
            f"model '{model_id}' failed on neuron '{node}'{detail} and is being reloaded "
            f"(attempt {view.attempts + 1}); retry shortly",
            max(1.0, wait),
        )
    if status == "poisoned":
        detail = f": {error}" if error else ""
        return Refuse(
            503,
            "model_recovering",
            f"model '{model_id}' is poisoned on neuron '{node}'{detail}; it must be reloaded — retry shortly",
            policy.busy_retry_after,
        )
    if status == "unloading":
        return Refuse(
            503,
            "service_unavailable",
            f"model '{model_id}' is being unloaded from neuron '{node}'; retry shortly",
            policy.busy_retry_after,
        )
    if status == "failed":
        remaining = policy.failed_load_backoff_secs - (now - (failed_at if failed_at is not None else now))
        return Refuse(
            502,
            "model_load_failed",
            f"loading '{model_id}' on neuron '{node}' failed: {error or 'no reason given'}",
            max(1.0, remaining),
        )
    return None


def topology_problem(profile: ModelProfile, node: NodeView) -> str | None:
    """Why this node can never host the model (None: it can, given free memory)."""
    if profile.pinned_on and node.name not in profile.pinned_on:
        return f"pinned to {', '.join(profile.pinned_on)}"
    assert node.discovery is not None
    if node.cpu_only:
        if profile.min_devices > 1 or profile.min_device_vram_mb is not None:
            return f"needs {profile.min_devices} GPU(s); the neuron is CPU-only"
        total = node.discovery.host_memory_total_mb
        if profile.vram_mb and total and total < profile.vram_mb:
            return f"needs {profile.vram_mb} MB; the host has {total} MB of memory"
        return None
    per_device = _per_device_mb(profile)
    floor = max(profile.min_device_vram_mb or 0, per_device)
    big_enough = [d for d in node.discovery.devices if d.vram_total_mb >= floor]
    if len(big_enough) < profile.min_devices:
        return (
            f"needs {profile.min_devices} device(s) with at least {floor} MB each; "
            f"it has {len(big_enough)} of {len(node.discovery.devices)}"
        )
    return None


def _per_device_mb(profile: ModelProfile) -> int:
    return math.ceil((profile.vram_mb or 0) / profile.min_devices)


def _need(profile: ModelProfile, node: NodeView) -> MemoryNeed:
    assert node.discovery is not None
    if node.cpu_only:
        return MemoryNeed(per_device_mb=profile.vram_mb or 0, count=1, eligible=(HOST_MEMORY,))
    floor = max(profile.min_device_vram_mb or 0, _per_device_mb(profile))
    eligible = tuple(d.index for d in node.discovery.devices if d.vram_total_mb >= floor)
    return MemoryNeed(per_device_mb=_per_device_mb(profile), count=profile.min_devices, eligible=eligible)


def residents_of(node: NodeView, catalogue: ModelCatalogue) -> list[Resident]:
    residents = []
    for view in node.models.values():
        profile = catalogue.get(view.id)
        memory = view.memory_mb if view.memory_mb is not None else (profile.vram_mb if profile else None)
        devices = view.devices or ((HOST_MEMORY,) if node.cpu_only else ())
        residents.append(
            Resident(
                model_id=view.id,
                priority=catalogue.priority(view.id),
                idle=node.idle(view),
                pinned_here=bool(profile and node.name in profile.pinned_on),
                memory_mb=memory,
                devices=devices,
                loaded_at=view.loaded_at,
                last_used=node.last_used(view),
                status=view.status,
            )
        )
    return residents


def _cold_load(
    profile: ModelProfile,
    catalogue: ModelCatalogue,
    snapshot: FleetSnapshot,
    now: float,
    policy: PlacementPolicy,
) -> Decision:
    model_id = profile.id
    never: list[str] = []  # permanent reasons, per node
    later: list[Refuse] = []  # transient refusals, per node
    options: list[tuple[tuple[int, int, str], ColdLoad]] = []
    for node in snapshot.nodes:
        if node.discovery is None:
            later.append(
                Refuse(
                    503,
                    "service_unavailable",
                    f"cannot place '{model_id}' yet: neuron '{node.name}' has not reported its topology",
                    policy.unhealthy_retry_after,
                )
            )
            continue
        problem = topology_problem(profile, node)
        if problem is not None:
            never.append(f"{node.name}: {problem}")
            continue
        if not node.healthy:
            later.append(
                Refuse(
                    503,
                    "service_unavailable",
                    f"model '{model_id}' fits neuron '{node.name}', which is currently unhealthy; retry shortly",
                    policy.unhealthy_retry_after,
                )
            )
            continue
        view = node.models.get(model_id)
        if view is not None:
            refusal = _status_refusal(model_id, node.name, view, now, policy)
            backoff_over = (
                view.status == "failed"
                and view.failed_at is not None
                and now - view.failed_at >= policy.failed_load_backoff_secs
            )
            if refusal is not None and not backoff_over:
                later.append(refusal)
                continue
        residents = [r for r in residents_of(node, catalogue) if r.model_id != model_id]
        free = node.free_by_device()
        need = _need(profile, node)
        plan = plan_eviction(
            residents,
            free,
            need,
            incoming_priority=profile.priority,
            incoming_pinned_here=node.name in profile.pinned_on,
            now=now,
            min_residency_secs=policy.min_residency_secs,
            strategy=policy.eviction_strategy,
        )
        if plan is None:
            wait = blocked_by_residency(residents, now=now, min_residency_secs=policy.min_residency_secs)
            best = max((free.get(d, 0) for d in need.eligible), default=0)
            later.append(
                Refuse(
                    503,
                    "insufficient_memory",
                    f"model '{model_id}' needs {need.per_device_mb} MB on {need.count} device(s) of neuron "
                    f"'{node.name}' (best has {best} MB free) and the residents that could make room are "
                    "busy, pinned, of higher priority or recently loaded; retry shortly",
                    max(1.0, wait) if wait is not None else policy.busy_retry_after,
                )
            )
            continue
        least_free = min((free.get(d, 0) for d in plan.devices), default=0)
        decision = ColdLoad(
            node=node.name,
            evict=plan.victims,
            devices=() if node.cpu_only else plan.devices,
        )
        options.append(((len(plan.victims), -least_free, node.name), decision))
    if options:
        return min(options, key=lambda option: option[0])[1]
    if later:
        # Prefer the most actionable transient reason: a failed load says why, others say when.
        later.sort(key=lambda r: (r.status != 502, r.retry_after or 0.0))
        return later[0]
    reasons = "; ".join(never) if never else "no neurons are configured"
    return Refuse(
        404,
        "model_not_placeable",
        f"model '{model_id}' is in the catalogue but no neuron can host it ({reasons})",
    )
