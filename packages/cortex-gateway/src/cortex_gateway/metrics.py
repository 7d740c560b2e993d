"""Prometheus metrics of one gateway app: its own registry, no process globals.

Names keep the reference's (`cortex_requests_total`, `cortex_time_to_first_token_seconds`,
`cortex_tokens_per_second`, ...) so existing dashboards carry over; docs/metrics.md lists
every series. Labels are `model` (the concrete id, never the alias) and `node`, plus
`status` on the per-status counter; the `cortex_key_*` counters are by `key` (the key's
name, never its secret) and `model`.

The proxy reports each finished request as a `RequestOutcome`; `derive_timings` turns it
into the observed quantities (a pure function, table-tested). The router reports cold
starts, loads, evictions and queue waits through the `ControlPlaneObserver` methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp

from cortex_gateway.fleet import FleetSnapshot
from cortex_gateway.observers import Observation

MB = 1024 * 1024

LABELS = ("model", "node")
KEY_LABELS = ("key", "model")

# The reference's buckets, with finer ones added at the fast end where a healthy
# gateway on a LAN lives.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
TOKENS_PER_SECOND_BUCKETS = (1, 2.5, 5, 10, 15, 20, 30, 40, 60, 80, 120, 200, 300, 500, 1000)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
QUEUE_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOAD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)

# Below this the decode window is too short to divide by; tokens/s then uses the whole
# request time (the reference's rule).
MIN_DECODE_WINDOW_SECS = 0.1

# The status label of a request whose client went away before the end (nginx's convention).
CLIENT_CLOSED = 499


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """One proxied request, as the proxy saw it. Times are perf_counter seconds."""

    status: int
    started_at: float
    # When the request to the (last) upstream left; None if no upstream was reachable.
    sent_at: float | None
    # Last byte received from the upstream, and when the last byte went to the client.
    last_upstream_byte_at: float | None
    finished_at: float
    # True when the gateway itself failed the request (unreachable, stalled, cut mid-stream).
    error: bool
    observation: Observation | None = None
    # The request waited for a cold load first: its time before sending is not overhead.
    cold_start: bool = False


@dataclass(frozen=True, slots=True)
class Timings:
    duration: float
    overhead: float | None
    ttft: float | None
    time_per_output_token: float | None
    tokens_per_second: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None


def derive_timings(outcome: RequestOutcome) -> Timings:
    """The quantities a finished request contributes to the histograms and counters."""
    obs = outcome.observation
    usage = obs.usage if obs is not None else None
    prompt = usage.prompt_tokens if usage is not None else None
    completion = usage.completion_tokens if usage is not None else None
    cached = usage.cached_tokens if usage is not None else None

    overhead = None
    if not outcome.cold_start and outcome.sent_at is not None and outcome.last_upstream_byte_at is not None:
        before = outcome.sent_at - outcome.started_at
        after = outcome.finished_at - outcome.last_upstream_byte_at
        overhead = max(0.0, before) + max(0.0, after)

    ttft = tpot = tps = None
    first = obs.first_token_at if obs is not None else None
    last = obs.last_token_at if obs is not None else None
    if first is not None:
        ttft = first - outcome.started_at
    if completion is not None and completion > 0:
        if first is not None and last is not None and completion > 1 and last > first:
            tpot = (last - first) / (completion - 1)
        window = (last - first) if first is not None and last is not None else 0.0
        if window < MIN_DECODE_WINDOW_SECS:
            window = (last if last is not None else outcome.finished_at) - outcome.started_at
        if window > 0:
            tps = completion / window
    return Timings(
        duration=outcome.finished_at - outcome.started_at,
        overhead=overhead,
        ttft=ttft,
        time_per_output_token=tpot,
        tokens_per_second=tps,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
    )


class TargetMetrics:
    """The label children of one (model, node): resolved once, reused by every request."""

    __slots__ = (
        "_model",
        "_node",
        "_responses",
        "cached_tokens",
        "completion_tokens",
        "duration",
        "errors",
        "in_flight",
        "overhead",
        "prompt_tokens",
        "requests",
        "responses",
        "tokens_per_second",
        "tpot",
        "ttft",
        "upstream_failures",
    )

    def __init__(self, metrics: GatewayMetrics, model: str, node: str) -> None:
        self.requests = metrics.requests.labels(model, node)
        self._responses = metrics.responses
        self._model, self._node = model, node
        self.responses: dict[int, Counter] = {}
        self.errors = metrics.errors.labels(model, node)
        self.upstream_failures = metrics.upstream_failures.labels(model, node)
        self.in_flight = metrics.in_flight.labels(model, node)
        self.duration = metrics.duration.labels(model, node)
        self.overhead = metrics.overhead.labels(model, node)
        self.ttft = metrics.ttft.labels(model, node)
        self.tpot = metrics.tpot.labels(model, node)
        self.tokens_per_second = metrics.tokens_per_second.labels(model, node)
        self.prompt_tokens = metrics.prompt_tokens.labels(model, node)
        self.completion_tokens = metrics.completion_tokens.labels(model, node)
        self.cached_tokens = metrics.cached_tokens.labels(model, node)

    def response(self, status: int) -> Counter:
        counter = self.responses.get(status)
        if counter is None:
            counter = self.responses[status] = self._responses.labels(self._model, self._node, str(status))
        return counter


class GatewayMetrics:
    """Every cortex_* series of one app, in a registry of its own.

    Implements `lease.ControlPlaneObserver` (cold_start, load_finished, evicted,
    queue_wait) for the router.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cortex_requests_total", "Proxied requests, counted when they finish.", LABELS, registry=r
        )
        self.responses = Counter(
            "cortex_responses_total",
            "Proxied requests by the HTTP status the client got (499: the client went away).",
            (*LABELS, "status"),
            registry=r,
        )
        self.errors = Counter(
            "cortex_request_errors_total",
            "Requests the gateway failed: upstream unreachable, stalled, or cut mid-response.",
            LABELS,
            registry=r,
        )
        self.upstream_failures = Counter(
            "cortex_upstream_failures_total",
            "Attempts on a replica that failed before the first byte (each may fail over).",
            LABELS,
            registry=r,
        )
        self.in_flight = Gauge(
            "cortex_requests_in_flight", "Requests being relayed right now.", LABELS, registry=r
        )
        self.duration = Histogram(
            "cortex_request_duration_seconds",
            "End-to-end time of a proxied request, until its last byte reached the client.",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "cortex_gateway_overhead_seconds",
            "Time the gateway adds: before the upstream request is sent, plus after its last byte.",
            LABELS,
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "cortex_time_to_first_token_seconds",
            "Time from the request reaching the proxy to the first generated token (streams only).",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "cortex_time_per_output_token_seconds",
            "Mean time between output tokens after the first (streams only).",
            LABELS,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "cortex_tokens_per_second",
            "Completion tokens per second of generation.",
            LABELS,
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "cortex_prompt_tokens_total", "Prompt tokens, from the response's usage.", LABELS, registry=r
        )
        self.completion_tokens = Counter(
            "cortex_completion_tokens_total",
            "Completion tokens, from the response's usage.",
            LABELS,
            registry=r,
        )
        self.cached_tokens = Counter(
            "cortex_cached_prompt_tokens_total",
            "Prompt tokens served from the prefix cache, from the response's usage.",
            LABELS,
            registry=r,
        )
        self.cold_starts = Counter(
            "cortex_cold_starts_total", "Model loads started to serve a request.", LABELS, registry=r
        )
        self.load_duration = Histogram(
            "cortex_model_load_duration_seconds",
            "Time a model load took on a node, successful or not.",
            LABELS,
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.load_failures = Counter(
            "cortex_model_load_failures_total", "Model loads that failed.", LABELS, registry=r
        )
        self.evictions = Counter(
            "cortex_evictions_total", "Models unloaded to make room for another.", LABELS, registry=r
        )
        self.queue_wait_seconds = Histogram(
            "cortex_queue_wait_seconds",
            "Time a request waited for its model to finish loading.",
            ("model",),
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.poller_errors = Counter(
            "cortex_poller_errors_total",
            "Unexpected errors while polling a neuron (logged with a traceback; polling goes on).",
            ("node",),
            registry=r,
        )
        # By API key *name* (never the secret) and model: bounded by the keys file.
        self.key_requests = Counter(
            "cortex_key_requests_total", "Relayed requests by API key name.", KEY_LABELS, registry=r
        )
        self.key_prompt_tokens = Counter(
            "cortex_key_prompt_tokens_total", "Prompt tokens by API key name.", KEY_LABELS, registry=r
        )
        self.key_completion_tokens = Counter(
            "cortex_key_completion_tokens_total", "Completion tokens by API key name.", KEY_LABELS, registry=r
        )
        self._targets: dict[tuple[str, str], TargetMetrics] = {}

    def target(self, model: str, node: str) -> TargetMetrics:
        # One entry per (model, node) pair the fleet has ever served: bounded by the fleet.
        key = (model, node)
        found = self._targets.get(key)
        if found is None:
            found = self._targets[key] = TargetMetrics(self, model, node)
        return found

    def record(self, model: str, node: str, outcome: RequestOutcome) -> None:
        target = self.target(model, node)
        target.requests.inc()
        target.response(outcome.status).inc()
        if outcome.error:
            target.errors.inc()
        t = derive_timings(outcome)
        target.duration.observe(t.duration)
        if t.overhead is not None:
            target.overhead.observe(t.overhead)
        if t.ttft is not None:
            target.ttft.observe(t.ttft)
        if t.time_per_output_token is not None:
            target.tpot.observe(t.time_per_output_token)
        if t.tokens_per_second is not None:
            target.tokens_per_second.observe(t.tokens_per_second)
        if t.prompt_tokens:
            target.prompt_tokens.inc(t.prompt_tokens)
        if t.completion_tokens:
            target.completion_tokens.inc(t.completion_tokens)
        if t.cached_tokens:
            target.cached_tokens.inc(t.cached_tokens)

    def key_used(self, key: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.key_requests.labels(key, model).inc()
        if prompt_tokens:
            self.key_prompt_tokens.labels(key, model).inc(prompt_tokens)
        if completion_tokens:
            self.key_completion_tokens.labels(key, model).inc(completion_tokens)

    # ControlPlaneObserver (cortex_gateway.lease)
    def cold_start(self, model: str, node: str) -> None:
        self.cold_starts.labels(model, node).inc()

    def load_finished(self, model: str, node: str, seconds: float, ok: bool) -> None:
        self.load_duration.labels(model, node).observe(seconds)
        if not ok:
            self.load_failures.labels(model, node).inc()

    def evicted(self, model: str, node: str) -> None:
        self.evictions.labels(model, node).inc()

    def queue_wait(self, model: str, seconds: float) -> None:
        self.queue_wait_seconds.labels(model).observe(seconds)

    def poller_error(self, node: str) -> None:
        self.poller_errors.labels(node).inc()

    def watch_fleet(self, snapshot: Callable[[], FleetSnapshot]) -> None:
        """Re-export what every neuron last reported, read at scrape time (one scrape, whole fleet)."""
        self.registry.register(FleetCollector(snapshot))

    def asgi_app(self) -> ASGIApp:
        """The exposition app for the `metrics_listen` port (any path answers)."""
        app: ASGIApp = make_asgi_app(registry=self.registry)
        return app


class FleetCollector(Collector):
    """`cortex_neuron_*`: the neurons' own per-model and per-device readings, as last polled.

    Read from the fleet snapshot when Prometheus scrapes, so the values are the poller's
    latest and nothing is updated twice. Labels: `model` and `node`, and `device` (the
    device index, or "host" for a CPU-only neuron's memory) on the memory series.
    """

    def __init__(self, snapshot: Callable[[], FleetSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # the label sets are only known at scrape time

    def collect(self) -> Iterator[Metric]:
        fleet = self._snapshot()
        up = GaugeMetricFamily("cortex_neuron_up", "1 when the neuron answers its polls.", labels=["node"])
        in_flight = GaugeMetricFamily(
            "cortex_neuron_requests_in_flight",
            "Requests a neuron runs for a model (from every client), as last polled.",
            labels=["model", "node"],
        )
        queued = GaugeMetricFamily(
            "cortex_neuron_queue_depth",
            "Requests a neuron queues for a model, as last polled.",
            labels=["model", "node"],
        )
        prefill = GaugeMetricFamily(
            "cortex_neuron_prefill_tokens_per_second",
            "Prompt tokens per second a neuron reports for a model.",
            labels=["model", "node"],
        )
        decode = GaugeMetricFamily(
            "cortex_neuron_decode_tokens_per_second",
            "Generated tokens per second a neuron reports for a model.",
            labels=["model", "node"],
        )
        used = GaugeMetricFamily(
            "cortex_neuron_memory_used_bytes",
            "Device (or host) memory in use, as last polled.",
            labels=["node", "device"],
        )
        total = GaugeMetricFamily(
            "cortex_neuron_memory_total_bytes", "Device (or host) memory in all.", labels=["node", "device"]
        )
        for node in fleet.nodes:
            up.add_metric([node.name], 1.0 if node.healthy else 0.0)
            for view in node.models.values():
                labels = [view.id, node.name]
                in_flight.add_metric(labels, view.neuron_in_flight)
                queued.add_metric(labels, view.queue_depth)
                prefill.add_metric(labels, view.tok_s_prefill)
                decode.add_metric(labels, view.tok_s_decode)
            discovery = node.discovery
            if discovery is None:
                continue
            totals = {d.index: d.vram_total_mb for d in discovery.devices}
            for reading in node.device_health:
                device = str(reading.index)
                used.add_metric([node.name, device], reading.vram_used_mb * MB)
                if reading.index in totals:
                    total.add_metric([node.name, device], totals[reading.index] * MB)
            if not discovery.devices and discovery.host_memory_total_mb:
                host_total = discovery.host_memory_total_mb
                used.add_metric([node.name, "host"], max(0, host_total - node.host_memory_free_mb) * MB)
                total.add_metric([node.name, "host"], host_total * MB)
        yield from (up, in_flight, queued, prefill, decode, used, total)
