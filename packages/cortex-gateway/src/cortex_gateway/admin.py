"""Wire types of the gateway's own read-outs, and pure builders from a fleet snapshot.

- `GET /admin/fleet` → `FleetReport`: what `cortex status` prints (nodes, devices, memory,
  models with state, in-flight and last use). The CLI decodes it with these Structs; this
  module imports nothing heavy (msgspec, cortex_core config and neuron_api types only).
- `GET /v1/models` → `ModelList` of `ModelEntry` (the OpenAI list shape plus where each model
  is loaded and where it could be); `GET /v1/models/{id}` → one `ModelEntry`. For Anthropic's
  SDKs (`anthropic-version`): `AnthropicModelPage` of `AnthropicModel`, and one `AnthropicModel`.
- `GET /health` → `FleetHealth`.
- `POST /admin/models/load|unload` take `ModelAction` and answer `ModelActionResult`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import msgspec

from cortex_core.config.catalogue import ModelCatalogue
from cortex_core.neuron_api import ModelLimit
from cortex_gateway.fleet import RECOVERING, ROUTABLE, FleetSnapshot, ModelView, NodeView
from cortex_gateway.placement import topology_problem

FleetStatus = Literal["ok", "degraded", "impaired"]
# A model's state across the fleet: loaded somewhere; loading somewhere; could be loaded on a
# healthy neuron (available); failed / poisoned where it was tried; or nowhere to put it.
ModelStateName = Literal["loaded", "loading", "recovering", "available", "failed", "poisoned", "unavailable"]


class DeviceReport(msgspec.Struct, kw_only=True):
    index: int
    name: str
    total_mb: int
    free_mb: int | None = None
    utilization_pct: int | None = None
    temp_c: int | None = None


class ModelReport(msgspec.Struct, kw_only=True):
    id: str
    status: str
    devices: list[int]
    memory_mb: int | None
    # Requests this gateway has in flight on it; the neuron's own count and queue.
    in_flight: int
    neuron_in_flight: int
    queue_depth: int
    priority: int
    pinned: bool
    loaded_at: float | None = None
    last_used: float | None = None
    error: str | None = None
    # A `recovering` model: reloads tried so far and when the next is due (epoch seconds).
    attempts: int = 0
    retry_at: float | None = None


class NodeReport(msgspec.Struct, kw_only=True):
    name: str
    endpoint: str
    healthy: bool
    consecutive_failures: int
    last_error: str | None
    last_poll: float | None
    hostname: str | None
    cpu_only: bool | None
    host_memory_total_mb: int | None
    host_memory_free_mb: int | None
    devices: list[DeviceReport]
    models: list[ModelReport]


class LoadInProgress(msgspec.Struct, kw_only=True):
    node: str
    model: str


class FleetReport(msgspec.Struct, kw_only=True):
    status: FleetStatus
    generated_at: float
    nodes: list[NodeReport]
    loads_in_progress: list[LoadInProgress]


class NodeCounts(msgspec.Struct, kw_only=True):
    healthy: int
    total: int


class Unservable(msgspec.Struct, kw_only=True):
    node: str
    model: str
    status: str
    reason: str | None


class FleetHealth(msgspec.Struct, kw_only=True):
    status: FleetStatus
    nodes: NodeCounts
    models_loaded: int
    unhealthy_nodes: list[str]
    unservable: list[Unservable]


class Location(msgspec.Struct, kw_only=True):
    node: str
    status: str
    vram_estimate_mb: int | None = None


class ModelEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One model of `/v1/models`; the optional keys are omitted, not null, when unknown."""

    id: str
    object: str
    created: int
    owned_by: str
    loaded: bool
    state: ModelStateName
    feasible_on: list[str]
    locations: list[Location]
    capabilities: list[str]
    tool_call: bool
    reasoning: bool
    # For an alias: the concrete model it stands for.
    alias_of: str | None = None
    limit: ModelLimit | None = None
    max_model_len: int | None = None


def _entry(model_id: str, created: int, feasible_on: list[str], capabilities: list[str]) -> ModelEntry:
    return ModelEntry(
        id=model_id,
        object="model",
        created=created,
        owned_by="cortex",
        loaded=False,
        state="unavailable",
        feasible_on=feasible_on,
        locations=[],
        capabilities=capabilities,
        tool_call=False,
        reasoning=False,
    )


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelEntry]
    object: str = "list"


class AnthropicModel(msgspec.Struct, kw_only=True, tag_field="type", tag="model"):
    """A model as Anthropic's Models API describes one (`anthropic.types.ModelInfo`)."""

    id: str
    display_name: str
    created_at: str  # RFC 3339


class AnthropicModelPage(msgspec.Struct, kw_only=True):
    data: list[AnthropicModel]
    has_more: bool
    first_id: str | None
    last_id: str | None


class ModelAction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    node: str | None = None


class ModelActionResult(msgspec.Struct, kw_only=True):
    model: str
    nodes: list[str]
    status: Literal["loaded", "unloaded"]


# ---- builders ------------------------------------------------------------------------------


def fleet_status(snapshot: FleetSnapshot) -> FleetStatus:
    """degraded: nothing can serve; impaired: a node is down or a model is broken; else ok."""
    healthy = snapshot.healthy_nodes
    if not healthy:
        return "degraded"
    if len(healthy) < len(snapshot.nodes) or _unservable(snapshot):
        return "impaired"
    return "ok"


def _unservable(snapshot: FleetSnapshot) -> list[Unservable]:
    return [
        Unservable(node=node.name, model=view.id, status=view.status, reason=view.error)
        for node in snapshot.healthy_nodes
        for view in node.models.values()
        if view.status in ("failed", "poisoned", RECOVERING)
    ]


def fleet_health(snapshot: FleetSnapshot) -> FleetHealth:
    healthy = snapshot.healthy_nodes
    return FleetHealth(
        status=fleet_status(snapshot),
        nodes=NodeCounts(healthy=len(healthy), total=len(snapshot.nodes)),
        models_loaded=sum(1 for n in healthy for m in n.models.values() if m.status == ROUTABLE),
        unhealthy_nodes=[n.name for n in snapshot.nodes if not n.healthy],
        unservable=_unservable(snapshot),
    )


def _model_report(view: ModelView, node: NodeView, catalogue: ModelCatalogue) -> ModelReport:
    profile = catalogue.get(view.id)
    return ModelReport(
        id=view.id,
        status=view.status,
        devices=list(view.devices),
        memory_mb=view.memory_mb,
        in_flight=node.gateway_in_flight(view.id),
        neuron_in_flight=view.neuron_in_flight,
        queue_depth=view.queue_depth,
        priority=catalogue.priority(view.id),
        pinned=bool(profile and node.name in profile.pinned_on),
        loaded_at=view.loaded_at,
        last_used=node.last_used(view),
        error=view.error,
        attempts=view.attempts,
        retry_at=view.retry_at,
    )


def _node_report(node: NodeView, catalogue: ModelCatalogue) -> NodeReport:
    discovery = node.discovery
    free = {reading.index: reading for reading in node.device_health}
    devices = []
    for device in discovery.devices if discovery else []:
        reading = free.get(device.index)
        devices.append(
            DeviceReport(
                index=device.index,
                name=device.name,
                total_mb=device.vram_total_mb,
                free_mb=reading.vram_free_mb if reading else None,
                utilization_pct=reading.utilization_pct if reading else None,
                temp_c=reading.temp_c if reading else None,
            )
        )
    return NodeReport(
        name=node.name,
        endpoint=node.endpoint,
        healthy=node.healthy,
        consecutive_failures=node.consecutive_failures,
        last_error=node.last_error,
        last_poll=node.last_poll,
        hostname=discovery.hostname if discovery else None,
        cpu_only=node.cpu_only if discovery else None,
        host_memory_total_mb=discovery.host_memory_total_mb if discovery else None,
        host_memory_free_mb=node.host_memory_free_mb if discovery else None,
        devices=devices,
        models=[_model_report(v, node, catalogue) for v in sorted(node.models.values(), key=lambda v: v.id)],
    )


def fleet_report(
    snapshot: FleetSnapshot, catalogue: ModelCatalogue, loads: list[tuple[str, str]], now: float
) -> FleetReport:
    return FleetReport(
        status=fleet_status(snapshot),
        generated_at=now,
        nodes=[_node_report(node, catalogue) for node in snapshot.nodes],
        loads_in_progress=[LoadInProgress(node=node, model=model) for node, model in loads],
    )


def _state(locations: list[Location], feasible_on: list[str]) -> ModelStateName:
    statuses = {location.status for location in locations}
    if "loaded" in statuses:
        return "loaded"
    if "loading" in statuses:
        return "loading"
    if RECOVERING in statuses:
        return "recovering"
    if feasible_on:
        return "available"
    if "poisoned" in statuses:
        return "poisoned"
    if "failed" in statuses:
        return "failed"
    return "unavailable"


def model_list(snapshot: FleetSnapshot, catalogue: ModelCatalogue, now: float) -> ModelList:
    """Catalogue × topology ∪ resident anywhere ∪ aliases, sorted by id."""
    created = int(now)
    entries: dict[str, ModelEntry] = {}
    for profile in catalogue.profiles:
        feasible = [
            node.name
            for node in snapshot.healthy_nodes
            if node.discovery is not None and topology_problem(profile, node) is None
        ]
        entries[profile.id] = _entry(profile.id, created, feasible, list(profile.capabilities))
    for node in snapshot.nodes:
        for view in sorted(node.models.values(), key=lambda v: v.id):
            entry = entries.setdefault(view.id, _entry(view.id, created, [], []))
            entry.locations.append(
                Location(node=node.name, status=view.status, vram_estimate_mb=view.memory_mb)
            )
            entry.loaded = entry.loaded or (view.status == ROUTABLE and node.healthy)
            entry.capabilities.extend(c for c in view.capabilities if c not in entry.capabilities)
            entry.tool_call = entry.tool_call or view.tool_call
            entry.reasoning = entry.reasoning or view.reasoning
            if view.limit is not None and (entry.limit is None or view.limit.context < entry.limit.context):
                entry.limit = view.limit  # the tightest limit across replicas is the safe one
    for entry in entries.values():
        entry.state = _state(entry.locations, entry.feasible_on)
        entry.max_model_len = entry.limit.context if entry.limit else None
    for alias, target in catalogue.aliases.items():
        concrete = entries.get(target)
        if concrete is not None:
            entries[alias] = msgspec.structs.replace(
                concrete,
                id=alias,
                alias_of=target,
                feasible_on=list(concrete.feasible_on),
                locations=list(concrete.locations),
                capabilities=list(concrete.capabilities),
            )
    return ModelList(data=[entries[key] for key in sorted(entries)])


def find_model(models: ModelList, model_id: str) -> ModelEntry | None:
    """`GET /v1/models/{id}`: the entry of that id (an alias is its own entry)."""
    return next((entry for entry in models.data if entry.id == model_id), None)


def anthropic_model(entry: ModelEntry) -> AnthropicModel:
    created = datetime.fromtimestamp(entry.created, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return AnthropicModel(id=entry.id, display_name=entry.id, created_at=created)


def anthropic_model_page(
    models: ModelList, *, limit: int, after_id: str | None = None, before_id: str | None = None
) -> AnthropicModelPage:
    """Anthropic's paginated list: `limit` entries after `after_id` (or before `before_id`).

    An unknown cursor gives an empty page, as a cursor past the end would.
    """
    ids = [entry.id for entry in models.data]
    entries = models.data
    if after_id is not None:
        entries = entries[ids.index(after_id) + 1 :] if after_id in ids else []
        page = entries[:limit]
        more = len(entries) > limit
    elif before_id is not None:
        entries = entries[: ids.index(before_id)] if before_id in ids else []
        page = entries[-limit:] if limit else []
        more = len(entries) > limit
    else:
        page = entries[:limit]
        more = len(entries) > limit
    return AnthropicModelPage(
        data=[anthropic_model(entry) for entry in page],
        has_more=more,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )
