"""Prometheus metrics of one neuron (`neuron_` prefix), in a registry owned by its app.

Counters and histograms are updated where things happen (loads, generated tokens); values
that already live elsewhere (engine queue depths, device memory) are read at scrape time by
a collector, so they are never stale and never double-booked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Loads range from a second (tiny model, warm cache) to an hour (a big download).
LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass
class LiveReadings:
    """What the scrape-time collector reads: per model and per device."""

    # model id -> (running, waiting)
    requests: dict[str, tuple[int, int]] = field(default_factory=dict)
    # model id -> bytes its weights take
    model_memory: dict[str, int] = field(default_factory=dict)
    # device label ("0", "1", "cpu") -> (used bytes, free bytes)
    device_memory: dict[str, tuple[int, int]] = field(default_factory=dict)


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], LiveReadings]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        live = self._read()
        running = GaugeMetricFamily(
            "neuron_requests_running", "Sequences in the running batch", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "neuron_requests_waiting", "Requests queued for a batch slot", labels=["model"]
        )
        for model, (run, wait) in sorted(live.requests.items()):
            running.add_metric([model], run)
            waiting.add_metric([model], wait)
        memory = GaugeMetricFamily(
            "neuron_model_memory_bytes", "Memory taken by a loaded model's weights", labels=["model"]
        )
        for model, size in sorted(live.model_memory.items()):
            memory.add_metric([model], size)
        used = GaugeMetricFamily("neuron_device_memory_used_bytes", "Device memory in use", labels=["device"])
        free = GaugeMetricFamily("neuron_device_memory_free_bytes", "Device memory free", labels=["device"])
        for device, (device_used, device_free) in sorted(live.device_memory.items()):
            used.add_metric([device], device_used)
            free.add_metric([device], device_free)
        yield from (running, waiting, memory, used, free)

    def describe(self) -> list[Metric]:
        # Unchecked registration: the families are only known at scrape time.
        return []


class NeuronMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.models_loaded = Gauge(
            "neuron_models_loaded", "Models resident and serving", registry=self.registry
        )
        self.load_duration = Histogram(
            "neuron_model_load_duration_seconds",
            "Time from load request to a servable model (download included)",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.load_failures = Counter(
            "neuron_model_load_failures",
            "Loads that ended in the failed state",
            ["model"],
            registry=self.registry,
        )
        self.requests = Counter(
            "neuron_requests", "Generation requests started", ["model"], registry=self.registry
        )
        self.tokens_generated = Counter(
            "neuron_tokens_generated", "Tokens produced by the engine", ["model"], registry=self.registry
        )

    def watch(self, read: Callable[[], LiveReadings]) -> None:
        """Read live values from `read` at every scrape."""
        self.registry.register(_LiveCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
