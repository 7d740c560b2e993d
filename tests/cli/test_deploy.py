"""deploy/: the Prometheus scrape example and the Grafana dashboard query real metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Metric

from cortex_gateway.metrics import GatewayMetrics
from neuron.metrics import NeuronMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Families collected at scrape time from live readings (neuron/metrics.py _LiveCollector).
NEURON_LIVE = {
    "neuron_requests_running",
    "neuron_requests_waiting",
    "neuron_model_memory_bytes",
    "neuron_device_memory_used_bytes",
    "neuron_device_memory_free_bytes",
}


def sample_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    metric: Metric
    for metric in registry.collect():
        names.add(metric.name)
        names.update(f"{metric.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [var["definition"] for var in dashboard["templating"]["list"] if "definition" in var]
    return {name for expr in exprs for name in re.findall(r"\b((?:cortex|neuron)_[a-z_]+)", expr)}


def test_every_dashboard_metric_is_exported() -> None:
    known = sample_names(GatewayMetrics().registry) | sample_names(NeuronMetrics().registry) | NEURON_LIVE
    used = dashboard_metrics()
    assert {name for name in used if name.startswith("cortex_")}, "no gateway panels"
    assert {name for name in used if name.startswith("neuron_")}, "no neuron panels"
    assert used - known == set()


def test_dashboard_panels_have_unique_ids_and_a_datasource_variable() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert any(var["name"] == "datasource" for var in dashboard["templating"]["list"])


def test_prometheus_example_scrapes_both_ports() -> None:
    text = (DEPLOY / "prometheus.yml").read_text()
    assert ":31314" in text and ":13131" in text
    assert "job_name: cortex" in text and "job_name: neuron" in text
