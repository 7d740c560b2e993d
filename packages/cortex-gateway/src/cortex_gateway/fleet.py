"""FleetState: the one object that owns what the gateway knows about each neuron.

Everything changes through its methods (the poller records answers, the router records
loads, unloads and requests); placement reads immutable `FleetSnapshot`s, so a decision
never sees state change under it. All methods are synchronous and run on the event loop,
which makes each of them atomic with respect to the others.

Memory bookkeeping: a neuron's measured free memory (from /health) lags behind what the
gateway just did. A load the gateway started reserves the profile's estimate on the chosen
devices, and an eviction credits the victim's footprint back, until the next /health reading
measures the truth (reference gotcha G6: never evict twice on one stale reading). A load's
reservation is dropped only by a /health reading asked for after the load settled (`mark()`),
so a reading that crossed the load on the wire cannot make its memory look free again.

The router claims a cold load in one synchronous call (`reserve_load`: victims marked
`unloading`, the model marked `loading`, its memory reserved) in the same step as the
placement decision, so two requests can never spend the same free memory.

Per-request bookkeeping (`request_started` / `request_finished`) is O(1): the counts live in
per-node dicts that node views expose read-only, so a request never rebuilds a node's view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from cortex_core.config.gateway import NeuronEndpoint
from cortex_core.neuron_api import DeviceHealth, DiscoveryResponse, HealthResponse, ModelInfo, ModelLimit

log = logging.getLogger(__name__)

# The memory pool of a CPU-only host (no GPU devices) is keyed like a device.
HOST_MEMORY = -1

# Statuses a model can have in the gateway's view. The neuron reports loading / loaded /
# failed / poisoned / unloading; the gateway sets `loading` for loads it started and
# `unloading` while it evicts, and `recovering` for a failed or poisoned model it will
# reload by itself after a back-off. Only `loaded` is routable.
ROUTABLE = "loaded"
RECOVERING = "recovering"
BROKEN = frozenset({"failed", "poisoned"})

_NO_COUNTS: Mapping[str, int] = MappingProxyType({})
_NO_TIMES: Mapping[str, float] = MappingProxyType({})


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
    tok_s_prefill: float = 0.0
    tok_s_decode: float = 0.0
    loaded_at: float | None = None
    last_used: float | None = None
    # When the gateway first saw this entry `failed` (for the retry back-off).
    failed_at: float | None = None
    # A `recovering` model: reload attempts made so far, and when the next one is due.
    attempts: int = 0
    retry_at: float | None = None


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
    # Requests this gateway has in flight per model here (exact), and when it last finished
    # one: live read-only views of the fleet's counters, so a request never rebuilds a view.
    in_flight: Mapping[str, int] = field(default_factory=lambda: _NO_COUNTS)
    used_at: Mapping[str, float] = field(default_factory=lambda: _NO_TIMES)

    def gateway_in_flight(self, model_id: str) -> int:
        return self.in_flight.get(model_id, 0)

    def busy_score(self, view: ModelView) -> int:
        """Least busy replica wins: our own exact count or the neuron's, plus its queue."""
        return max(self.in_flight.get(view.id, 0), view.neuron_in_flight) + view.queue_depth

    def idle(self, view: ModelView) -> bool:
        return self.in_flight.get(view.id, 0) == 0 and view.neuron_in_flight == 0 and view.queue_depth == 0

    def last_used(self, view: ModelView) -> float | None:
        ours = self.used_at.get(view.id)
        if ours is None or (view.last_used is not None and view.last_used > ours):
            return view.last_used
        return ours

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
class _Reservation:
    devices: tuple[int, ...]
    memory_mb: int
    # The fleet's mark when the load settled (None while it runs): only a /health reading
    # asked for after that mark has measured the loaded model.
    settled: int | None = None


@dataclass
class _Recovery:
    attempts: int
    retry_at: float
    error: str | None
    status: str  # what the neuron reported: failed or poisoned


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    """Reload a failed or poisoned catalogue model after base·2^(n-1) s, at most cap s, n ≤ limit."""

    base_secs: float = 5.0
    cap_secs: float = 300.0
    max_attempts: int = 5

    def delay(self, attempts: int) -> float:
        return min(self.cap_secs, self.base_secs * 2.0 ** max(0, attempts - 1))


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Stop routing to a neuron after `failures` connection failures in a row, for `cooldown_secs`."""

    failures: int = 3
    cooldown_secs: float = 10.0


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
    # Memory reserved by loads the gateway started, by model id.
    reservations: dict[str, _Reservation] = field(default_factory=dict)
    # device → MB freed by evictions since the last /health reading.
    credits: dict[int, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    used_at: dict[str, float] = field(default_factory=dict)
    # Failed or poisoned models the gateway reloads by itself, by model id.
    recovery: dict[str, _Recovery] = field(default_factory=dict)
    # Circuit breaker: connection failures of requests in a row, and while it is open, the
    # end of its cool-down (then the next successful poll — the probe — closes it).
    connect_failures: int = 0
    breaker_open_until: float | None = None


class FleetState:
    def __init__(
        self,
        neurons: Iterable[NeuronEndpoint],
        *,
        unhealthy_after: int = 3,
        clock: Callable[[], float],
        forget_failures_after: float = 600.0,
        recoverable: Callable[[str], bool] = lambda model_id: False,
        recovery: RecoveryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
    ) -> None:
        self._nodes = {n.name: _Node(n.name, n.endpoint.rstrip("/")) for n in neurons}
        self._unhealthy_after = unhealthy_after
        self._clock = clock
        self._forget_failures_after = forget_failures_after
        # Which broken models to reload by itself (the catalogue's), and how patiently.
        self._recoverable = recoverable
        self._recovery_policy = recovery or RecoveryPolicy()
        self._breaker = breaker or BreakerPolicy()
        self._marks = 0
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

    def mark(self) -> int:
        """A point in the fleet's history; pass it with the /health reading asked for after it."""
        self._marks += 1
        return self._marks

    def _view(self, node: _Node) -> NodeView:
        adjust: dict[int, int] = dict(node.credits)
        for reserved in node.reservations.values():
            devices = reserved.devices or ((HOST_MEMORY,) if _cpu_only(node) else ())
            for device in devices:
                adjust[device] = adjust.get(device, 0) - reserved.memory_mb // max(1, len(devices))
        return NodeView(
            name=node.name,
            endpoint=node.endpoint,
            # An open breaker takes the node out of placement like an unhealthy poll does.
            healthy=node.healthy and node.breaker_open_until is None,
            consecutive_failures=node.consecutive_failures,
            last_error=node.last_error,
            last_poll=node.last_poll,
            discovery=node.discovery,
            device_health=node.device_health,
            host_memory_free_mb=node.host_memory_free_mb,
            models=MappingProxyType(dict(node.models)),
            memory_adjust_mb=MappingProxyType(adjust),
            in_flight=MappingProxyType(node.in_flight),
            used_at=MappingProxyType(node.used_at),
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
            seen[info.id] = self._recovering(node, self._merge(previous, info, now), now)
        # Loads the gateway started and the neuron does not list yet stay `loading`; a load
        # that failed is remembered for a while so the back-off and the reason survive, and
        # a model in recovery stays listed until its reload is attempted.
        for model_id, view in node.models.items():
            if model_id in seen:
                continue
            recent_failure = (
                view.status == "failed"
                and view.failed_at is not None
                and now - view.failed_at < self._forget_failures_after
            )
            if model_id in node.reservations or recent_failure or view.status == RECOVERING:
                seen[model_id] = view
        for gone in set(node.endpoints) - {m for m, v in seen.items() if v.status == ROUTABLE}:
            del node.endpoints[gone]
        for model_id in [m for m in node.recovery if m not in seen or seen[m].status == ROUTABLE]:
            del node.recovery[model_id]  # it came back (or was unloaded): the count starts over
        node.models = seen
        node.healthy = True
        if node.breaker_open_until is None:
            node.connect_failures = 0
        elif now >= node.breaker_open_until:
            # The probe after the cool-down answered: trust the node again.
            node.breaker_open_until = None
            node.connect_failures = 0
            log.info("circuit breaker of neuron %s closed: it answered after the cool-down", node_name)
        node.consecutive_failures = 0
        node.last_error = None
        node.last_poll = now
        self._changed(node_name)

    def _recovering(self, node: _Node, view: ModelView, now: float) -> ModelView:
        """A broken model the gateway will reload shows as `recovering` until it gives up."""
        if view.status not in BROKEN or not self._recoverable(view.id):
            return view
        plan = node.recovery.get(view.id)
        if plan is None:
            plan = node.recovery[view.id] = _Recovery(
                attempts=0,
                retry_at=now + self._recovery_policy.delay(1),
                error=view.error,
                status=view.status,
            )
        if plan.attempts >= self._recovery_policy.max_attempts:
            return view  # gave up: the operator sees the neuron's own status and reason
        plan.error, plan.status = view.error, view.status
        return replace(view, status=RECOVERING, attempts=plan.attempts, retry_at=plan.retry_at)

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
        if previous is not None and previous.status == "unloading" and status in (ROUTABLE, *BROKEN):
            status = "unloading"  # our eviction is in progress; the neuron has not caught up
        if previous is not None and previous.status == "loading" and status in BROKEN:
            # A reload the gateway started; the neuron still lists the old broken entry.
            status = "loading"
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
            loaded_at=loaded_at,
            last_used=last_used,
            failed_at=failed_at,
        )

    def record_health(self, node_name: str, health: HealthResponse, *, mark: int | None = None) -> bool:
        """Store a /health reading; returns True when the neuron restarted since the last one.

        `mark` is `mark()` taken before the reading was asked for; without it the reading is
        taken to be fresh (a caller that reads and records in one step).
        """
        node = self._nodes[node_name]
        taken_after = self._marks + 1 if mark is None else mark
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
                tok_s_prefill=entry.tok_s_prefill if entry else 0.0,
                tok_s_decode=entry.tok_s_decode if entry else 0.0,
            )
        # The reading measures every eviction and every load that settled before it was asked
        # for; loads still in progress, or settled while it was on the wire, stay reserved.
        node.credits.clear()
        for model_id, reserved in list(node.reservations.items()):
            if reserved.settled is not None and reserved.settled < taken_after:
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

    def connection_failed(self, node_name: str, reason: str) -> bool:
        """A request could not connect to the neuron; True when this opened its breaker."""
        node = self._nodes[node_name]
        node.connect_failures += 1
        node.last_error = reason
        if node.breaker_open_until is not None or node.connect_failures < self._breaker.failures:
            return False
        node.breaker_open_until = self._clock() + self._breaker.cooldown_secs
        self._changed(node_name)
        return True

    def breaker_open(self, node_name: str) -> bool:
        return self._nodes[node_name].breaker_open_until is not None

    # ---- the owner's serialised step (router) ----------------------------------------------

    def set_inference_url(self, node: str, model_id: str, url: str) -> None:
        self._nodes[node].endpoints[model_id] = url

    def reserve_load(
        self,
        node_name: str,
        model_id: str,
        *,
        evict: tuple[str, ...],
        devices: tuple[int, ...],
        memory_mb: int,
    ) -> bool:
        """Claim a cold load: victims → `unloading`, model → `loading`, its memory reserved.

        All or nothing, in one synchronous step with the decision that chose it. False (and
        nothing changed) when a victim is no longer an idle resident.
        """
        node = self._nodes[node_name]
        for victim in evict:
            view = node.models.get(victim)
            if view is None or view.status != ROUTABLE or node.in_flight.get(victim, 0) > 0:
                return False
        for victim in evict:
            node.models[victim] = replace(node.models[victim], status="unloading")
            node.endpoints.pop(victim, None)
        self.load_started(node_name, model_id, devices, memory_mb)
        return True

    def load_started(self, node_name: str, model_id: str, devices: tuple[int, ...], memory_mb: int) -> None:
        node = self._nodes[node_name]
        previous = node.models.get(model_id)
        node.models[model_id] = ModelView(
            id=model_id,
            status="loading",
            devices=devices,
            last_used=previous.last_used if previous else None,
            attempts=previous.attempts if previous else 0,
        )
        node.reservations[model_id] = _Reservation(devices, memory_mb)
        self._changed(node_name)

    def _settle(self, node: _Node, model_id: str, *, keep: bool) -> None:
        reserved = node.reservations.get(model_id)
        if reserved is None:
            return
        if keep:
            reserved.settled = self.mark()
        else:
            del node.reservations[model_id]

    def load_finished(self, node_name: str, model_id: str, memory_mb: int | None) -> None:
        node = self._nodes[node_name]
        previous = node.models.get(model_id)
        now = self._clock()
        self._settle(node, model_id, keep=True)
        node.recovery.pop(model_id, None)
        node.models[model_id] = ModelView(
            id=model_id,
            status=ROUTABLE,
            devices=previous.devices if previous else (),
            memory_mb=memory_mb,
            loaded_at=now,
            last_used=now,
        )
        self._changed(node_name)

    def load_failed(self, node_name: str, model_id: str, error: str, *, recover: bool = True) -> None:
        """A load failed; `recover=False` when retrying cannot help (the neuron refused it)."""
        node = self._nodes[node_name]
        now = self._clock()
        self._settle(node, model_id, keep=False)
        view = ModelView(id=model_id, status="failed", error=error, failed_at=now)
        plan = node.recovery.get(model_id)
        if not recover:
            # Booked as given up, so that polls listing the failure do not start a recovery.
            node.recovery[model_id] = _Recovery(
                attempts=self._recovery_policy.max_attempts, retry_at=now, error=error, status="failed"
            )
        elif plan is not None:
            # A recovery attempt failed: the next one waits twice as long (up to the cap).
            plan.retry_at = now + self._recovery_policy.delay(plan.attempts + 1)
            plan.error, plan.status = error, "failed"
        node.models[model_id] = self._recovering(node, view, now)
        self._changed(node_name)

    # ---- recovery ------------------------------------------------------------------------

    def recoveries_due(self) -> list[tuple[str, str, str]]:
        """(node, model, neuron status) of the recovering models whose back-off is over, on healthy nodes."""
        now = self._clock()
        return [
            (name, model_id, plan.status)
            for name, node in self._nodes.items()
            if node.healthy
            for model_id, plan in node.recovery.items()
            if plan.retry_at <= now
            and plan.attempts < self._recovery_policy.max_attempts
            and (view := node.models.get(model_id)) is not None
            and view.status == RECOVERING
        ]

    def recovery_attempted(self, node_name: str, model_id: str) -> None:
        """A reload is about to start: one attempt spent."""
        plan = self._nodes[node_name].recovery.get(model_id)
        if plan is not None:
            plan.attempts += 1

    def clear_broken(self, node_name: str, model_id: str) -> None:
        """Drop a failed entry (it holds no memory) so that its reload can be placed; recovery stays."""
        node = self._nodes[node_name]
        view = node.models.get(model_id)
        if view is not None and view.status in (*BROKEN, RECOVERING):
            del node.models[model_id]
            self._changed(node_name)

    def begin_unload(
        self, node_name: str, model_id: str, *, any_state: bool = False, keep_recovery: bool = False
    ) -> bool:
        """Claim a resident for unloading; False when a request started on it meanwhile.

        `any_state` (the operator's unload, a recovery) also claims failed, poisoned and
        recovering entries; the operator's unload ends the recovery, a recovery keeps it.
        """
        node = self._nodes[node_name]
        view = node.models.get(model_id)
        if view is None or node.in_flight.get(model_id, 0) > 0:
            return False
        claimable = view.status == ROUTABLE or (any_state and view.status in (*BROKEN, RECOVERING))
        if not claimable:
            return False
        if not keep_recovery:
            node.recovery.pop(model_id, None)
        node.models[model_id] = replace(view, status="unloading")
        node.endpoints.pop(model_id, None)
        self._changed(node_name)
        return True

    def unload_finished(self, node_name: str, model_id: str, *, credit_mb: int | None) -> None:
        """Drop the entry at once (gotcha G5: no stale `unloaded` route) and credit its memory."""
        node = self._nodes[node_name]
        view = node.models.pop(model_id, None)
        node.used_at.pop(model_id, None)
        if view is not None and credit_mb:
            devices = view.devices or ((HOST_MEMORY,) if _cpu_only(node) else ())
            for device in devices:
                node.credits[device] = node.credits.get(device, 0) + credit_mb // len(devices)
        self._changed(node_name)

    def unload_failed(self, node_name: str, model_id: str, *, status: str = ROUTABLE) -> None:
        """The unload did not happen: the entry gets back the status it had (`status`)."""
        node = self._nodes[node_name]
        view = node.models.get(model_id)
        if view is not None and view.status == "unloading":
            node.models[model_id] = replace(view, status=status)
        self._changed(node_name)

    # ---- per request: O(1), no view rebuilt ------------------------------------------------

    def request_started(self, node_name: str, model_id: str) -> None:
        counts = self._nodes[node_name].in_flight
        counts[model_id] = counts.get(model_id, 0) + 1

    def request_finished(self, node_name: str, model_id: str) -> None:
        node = self._nodes[node_name]
        left = node.in_flight.get(model_id, 0) - 1
        if left > 0:
            node.in_flight[model_id] = left
        else:
            node.in_flight.pop(model_id, None)
        node.used_at[model_id] = self._clock()


def _cpu_only(node: _Node) -> bool:
    return node.discovery is not None and not node.discovery.devices
