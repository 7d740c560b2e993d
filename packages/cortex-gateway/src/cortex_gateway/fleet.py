"""FleetState: the one object that owns what the gateway knows about each neuron.

Everything changes through its methods (the poller records answers, the router records
loads, unloads and requests); placement reads immutable `FleetSnapshot`s, so a decision
never sees state change under it. All methods are synchronous and run on the event loop,
which makes each of them atomic with respect to the others.

Memory bookkeeping: a neuron's measured free memory (from /health) lags behind what the
gateway just did. A load the gateway started reserves the profile's estimate on the chosen
devices, and an eviction credits the victim's footprint back, until the next /health reading
measures the truth (reference gotcha G6: never evict twice on one stale reading).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from cortex_core.config.gateway import NeuronEndpoint
from cortex_core.neuron_api import DeviceHealth, DiscoveryResponse, HealthResponse, ModelInfo, ModelLimit

# The memory pool of a CPU-only host (no GPU devices) is keyed like a device.
HOST_MEMORY = -1

# Statuses a model can have in the gateway's view. The neuron reports loading / loaded /
# failed / poisoned / unloading; the gateway sets `loading` for loads it started and
# `unloading` while it evicts. Only `loaded` is routable.
ROUTABLE = "loaded"


@dataclass(frozen=True, slots=True)
class ModelView:
    id: str
    status: str
    devices: tuple[int, ...] = ()
    memory_mb: int | None = None
    capabilities: tuple[str, ...] = ()
    limit: ModelLimit | None = None
    tool_call: bool = False
    reasoning: bool = False
    error: str | None = None
    # Load reported by the neuron's /health (all clients of that neuron, slightly stale).
    neuron_in_flight: int = 0
    queue_depth: int = 0
    # Requests this gateway has in flight on this replica right now (exact).
    gateway_in_flight: int = 0
    loaded_at: float | None = None
    last_used: float | None = None
    # When the gateway first saw this entry `failed` (for the retry back-off).
    failed_at: float | None = None

    @property
    def busy_score(self) -> int:
        """Least busy replica wins: our own exact count or the neuron's, plus its queue."""
        return max(self.gateway_in_flight, self.neuron_in_flight) + self.queue_depth

    @property
    def idle(self) -> bool:
        return self.gateway_in_flight == 0 and self.neuron_in_flight == 0 and self.queue_depth == 0


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    endpoint: str
    healthy: bool
    consecutive_failures: int
    last_error: str | None
    last_poll: float | None
    discovery: DiscoveryResponse | None
    device_health: tuple[DeviceHealth, ...]
    host_memory_free_mb: int
    models: Mapping[str, ModelView]
    # Memory the gateway expects to differ from the last reading, by device (HOST_MEMORY for
    # a CPU host): negative for loads it started, positive for models it evicted.
    memory_adjust_mb: Mapping[int, int]

    @property
    def cpu_only(self) -> bool:
        return self.discovery is not None and not self.discovery.devices

    def free_by_device(self) -> dict[int, int]:
        """Free memory per device as the gateway best knows it (never below zero)."""
        if self.discovery is None:
            return {}
        if self.cpu_only:
            free = {HOST_MEMORY: self.host_memory_free_mb or self.discovery.host_memory_total_mb}
        else:
            measured = {reading.index: reading.vram_free_mb for reading in self.device_health}
            # Before the first /health reading, assume the whole device is free: the neuron's
            # pre-flight still refuses a load that does not fit.
            free = {d.index: measured.get(d.index, d.vram_total_mb) for d in self.discovery.devices}
        for device, delta in self.memory_adjust_mb.items():
            if device in free:
                free[device] = max(0, free[device] + delta)
        return free


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    nodes: tuple[NodeView, ...]
    taken_at: float

    def node(self, name: str) -> NodeView | None:
        for node in self.nodes:
            if node.name == name:
                return node
        return None

    @property
    def healthy_nodes(self) -> tuple[NodeView, ...]:
        return tuple(node for node in self.nodes if node.healthy)


@dataclass
class _Node:
    name: str
    endpoint: str
    healthy: bool = False
    consecutive_failures: int = 0
    last_error: str | None = None
    last_poll: float | None = None
    discovery: DiscoveryResponse | None = None
    device_health: tuple[DeviceHealth, ...] = ()
    host_memory_free_mb: int = 0
    uptime_secs: float = 0.0
    models: dict[str, ModelView] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)
    # model id → (devices, MB) reserved by a load the gateway started.
    reservations: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    # device → MB freed by evictions since the last /health reading.
    credits: dict[int, int] = field(default_factory=dict)


class FleetState:
    def __init__(
        self,
        neurons: Iterable[NeuronEndpoint],
        *,
        unhealthy_after: int = 3,
        clock: Callable[[], float],
        forget_failures_after: float = 600.0,
    ) -> None:
        self._nodes = {n.name: _Node(n.name, n.endpoint.rstrip("/")) for n in neurons}
        self._unhealthy_after = unhealthy_after
        self._clock = clock
        self._forget_failures_after = forget_failures_after
        self._snapshot: FleetSnapshot | None = None
        # Node views are rebuilt only for the node that changed (a request start or end
        # touches one node; the hot path should not copy the whole fleet).
        self._views: dict[str, NodeView] = {}

    # ---- reading -------------------------------------------------------------------------

    @property
    def node_names(self) -> list[str]:
        return list(self._nodes)

    def endpoint_of(self, node: str) -> str:
        return self._nodes[node].endpoint

    def has_discovery(self, node: str) -> bool:
        return self._nodes[node].discovery is not None

    def inference_url(self, node: str, model_id: str) -> str | None:
        return self._nodes[node].endpoints.get(model_id)

    def snapshot(self) -> FleetSnapshot:
        """An immutable view; cached until the next change, so the hot path pays once."""
        if self._snapshot is None:
            views = []
            for name, node in self._nodes.items():
                view = self._views.get(name)
                if view is None:
                    view = self._views[name] = self._view(node)
                views.append(view)
            self._snapshot = FleetSnapshot(nodes=tuple(views), taken_at=self._clock())
        return self._snapshot

    def _view(self, node: _Node) -> NodeView:
        adjust: dict[int, int] = dict(node.credits)
        for devices, mb in node.reservations.values():
            for device in devices:
                adjust[device] = adjust.get(device, 0) - mb // max(1, len(devices))
        return NodeView(
            name=node.name,
            endpoint=node.endpoint,
            healthy=node.healthy,
            consecutive_failures=node.consecutive_failures,
            last_error=node.last_error,
            last_poll=node.last_poll,
            discovery=node.discovery,
            device_health=node.device_health,
            host_memory_free_mb=node.host_memory_free_mb,
            models=MappingProxyType(dict(node.models)),
            memory_adjust_mb=MappingProxyType(adjust),
        )

    def _changed(self, node: str) -> None:
        self._snapshot = None
        self._views.pop(node, None)

    # ---- poller --------------------------------------------------------------------------

    def record_discovery(self, node: str, discovery: DiscoveryResponse) -> None:
        self._nodes[node].discovery = discovery
        self._changed(node)

    def forget_discovery(self, node: str) -> None:
        """The neuron restarted (or vanished): its topology must be fetched again."""
        self._nodes[node].discovery = None
        self._changed(node)

    def record_models(self, node_name: str, models: Iterable[ModelInfo]) -> None:
        """A successful /models answer: the node is healthy and this is its resident set."""
        node = self._nodes[node_name]
        now = self._clock()
        seen: dict[str, ModelView] = {}
        for info in models:
            previous = node.models.get(info.id)
            seen[info.id] = self._merge(previous, info, now)
        # Loads the gateway started and the neuron does not list yet stay `loading`; a load
        # that failed is remembered for a while so the back-off and the reason survive.
        for model_id, view in node.models.items():
            if model_id in seen:
                continue
            recent_failure = (
                view.status == "failed"
                and view.failed_at is not None
                and now - view.failed_at < self._forget_failures_after
            )
            if model_id in node.reservations or recent_failure:
                seen[model_id] = view
        for gone in set(node.endpoints) - {m for m, v in seen.items() if v.status == ROUTABLE}:
            del node.endpoints[gone]
        node.models = seen
        node.healthy = True
        node.consecutive_failures = 0
        node.last_error = None
        node.last_poll = now
        self._changed(node_name)

    @staticmethod
    def _merge(previous: ModelView | None, info: ModelInfo, now: float) -> ModelView:
        loaded_at = info.loaded_at
        if loaded_at is None and info.status == ROUTABLE:
            was_loaded = previous is not None and previous.status == ROUTABLE
            loaded_at = previous.loaded_at if was_loaded and previous is not None else now
        last_used = max(
            (t for t in (info.last_used, previous.last_used if previous else None) if t is not None),
            default=None,
        )
        failed_at = None
        if info.status == "failed":
            failed_at = previous.failed_at if previous and previous.failed_at is not None else now
        status: str = info.status
        if previous is not None and previous.status == "unloading" and status == ROUTABLE:
            status = "unloading"  # our eviction is in progress; the neuron has not caught up
        return ModelView(
            id=info.id,
            status=status,
            devices=tuple(info.devices),
            memory_mb=info.vram_used_mb,
            capabilities=tuple(info.capabilities),
            limit=info.limit,
            tool_call=info.tool_call,
            reasoning=info.reasoning,
            error=info.error,
            neuron_in_flight=previous.neuron_in_flight if previous else info.in_flight,
            queue_depth=previous.queue_depth if previous else 0,
            gateway_in_flight=previous.gateway_in_flight if previous else 0,
            loaded_at=loaded_at,
            last_used=last_used,
            failed_at=failed_at,
        )

    def record_health(self, node_name: str, health: HealthResponse) -> bool:
        """Store a /health reading; returns True when the neuron restarted since the last one."""
        node = self._nodes[node_name]
        restarted = 0 < health.uptime_secs < node.uptime_secs
        node.uptime_secs = health.uptime_secs
        node.device_health = tuple(health.devices)
        node.host_memory_free_mb = health.host_memory_free_mb
        load = {m.id: m for m in health.models}
        for model_id, view in node.models.items():
            entry = load.get(model_id)
            node.models[model_id] = replace(
                view,
                neuron_in_flight=entry.in_flight if entry else 0,
                queue_depth=entry.queue_depth if entry else 0,
            )
        # The reading measures every finished load and eviction; only loads still in
        # progress keep their reservation.
        node.credits.clear()
        for model_id in list(node.reservations):
            pending = node.models.get(model_id)
            if pending is None or pending.status != "loading":
                del node.reservations[model_id]
        self._changed(node_name)
        return restarted

    def record_failure(self, node_name: str, reason: str) -> bool:
        """A poll (or a request) could not reach the neuron; unhealthy after N in a row.

        Returns True when this failure turned the node unhealthy.
        """
        node = self._nodes[node_name]
        node.consecutive_failures += 1
        node.last_error = reason
        turned = node.healthy and node.consecutive_failures >= self._unhealthy_after
        if node.consecutive_failures >= self._unhealthy_after:
            node.healthy = False
        self._changed(node_name)
        return turned

    # ---- router --------------------------------------------------------------------------

    def set_inference_url(self, node: str, model_id: str, url: str) -> None:
        self._nodes[node].endpoints[model_id] = url

    def load_started(self, node_name: str, model_id: str, devices: tuple[int, ...], memory_mb: int) -> None:
        node = self._nodes[node_name]
        previous = node.models.get(model_id)
        node.models[model_id] = ModelView(
            id=model_id,
            status="loading",
            devices=devices,
            last_used=previous.last_used if previous else None,
        )
        node.reservations[model_id] = (devices, memory_mb)
        self._changed(node_name)

    def load_finished(self, node_name: str, model_id: str, memory_mb: int | None) -> None:
        node = self._nodes[node_name]
        previous = node.models.get(model_id)
        now = self._clock()
        node.models[model_id] = ModelView(
            id=model_id,
            status=ROUTABLE,
            devices=previous.devices if previous else (),
            memory_mb=memory_mb,
            loaded_at=now,
            last_used=now,
        )
        self._changed(node_name)

    def load_failed(self, node_name: str, model_id: str, error: str) -> None:
        node = self._nodes[node_name]
        node.reservations.pop(model_id, None)
        node.models[model_id] = ModelView(id=model_id, status="failed", error=error, failed_at=self._clock())
        self._changed(node_name)

    def begin_unload(self, node_name: str, model_id: str) -> bool:
        """Claim a resident for eviction; False when a request started on it meanwhile."""
        node = self._nodes[node_name]
        view = node.models.get(model_id)
        if view is None or view.status != ROUTABLE or view.gateway_in_flight > 0:
            return False
        node.models[model_id] = replace(view, status="unloading")
        node.endpoints.pop(model_id, None)
        self._changed(node_name)
        return True

    def unload_finished(self, node_name: str, model_id: str, *, credit_mb: int | None) -> None:
        """Drop the entry at once (gotcha G5: no stale `unloaded` route) and credit its memory."""
        node = self._nodes[node_name]
        view = node.models.pop(model_id, None)
        if view is not None and credit_mb:
            devices = view.devices or (
                (HOST_MEMORY,) if node.discovery and not node.discovery.devices else ()
            )
            for device in devices:
                node.credits[device] = node.credits.get(device, 0) + credit_mb // len(devices)
        self._changed(node_name)

    def unload_failed(self, node_name: str, model_id: str) -> None:
        node = self._nodes[node_name]
        view = node.models.get(model_id)
        if view is not None and view.status == "unloading":
            node.models[model_id] = replace(view, status=ROUTABLE)
        self._changed(node_name)

    def request_started(self, node_name: str, model_id: str) -> None:
        node = self._nodes[node_name]
        view = node.models.get(model_id)
        if view is not None:
            node.models[model_id] = replace(view, gateway_in_flight=view.gateway_in_flight + 1)
            self._changed(node_name)

    def request_finished(self, node_name: str, model_id: str) -> None:
        node = self._nodes[node_name]
        view = node.models.get(model_id)
        if view is not None:
            node.models[model_id] = replace(
                view, gateway_in_flight=max(0, view.gateway_in_flight - 1), last_used=self._clock()
            )
            self._changed(node_name)
