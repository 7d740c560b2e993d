"""`cortex status` and `cortex models list`: read the gateway, render tables a person scans.

The fleet comes from the gateway's `GET /admin/fleet`. It is decoded into the small,
lenient Structs below (unknown fields ignored, everything optional but the names) rather
than into the gateway's own types: a workstation has cortex-cli without cortex-gateway, and
an older CLI must still read a newer gateway.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from cortex_cli.client import GatewayClient, GatewayError
from cortex_cli.table import ago, memory, render_table

FLEET_PATH = "/admin/fleet"


class DeviceRow(msgspec.Struct, kw_only=True):
    index: int
    name: str | None = None
    total_mb: int | None = None
    free_mb: int | None = None
    utilization_pct: int | None = None
    temp_c: int | None = None


class ModelRow(msgspec.Struct, kw_only=True):
    id: str
    status: str
    devices: list[int] = msgspec.field(default_factory=list)
    memory_mb: int | None = None
    # This gateway's requests in flight on the replica; the neuron's count covers every client.
    in_flight: int = 0
    neuron_in_flight: int = 0
    queue_depth: int = 0
    pinned: bool = False
    last_used: float | None = None
    loaded_at: float | None = None
    error: str | None = None
    # A `recovering` model: the gateway's reloads so far and when the next one is due.
    attempts: int = 0
    retry_at: float | None = None


class NodeRow(msgspec.Struct, kw_only=True):
    name: str
    endpoint: str = ""
    healthy: bool = False
    last_error: str | None = None
    last_poll: float | None = None
    hostname: str | None = None
    cpu_only: bool | None = None
    host_memory_total_mb: int | None = None
    host_memory_free_mb: int | None = None
    devices: list[DeviceRow] = msgspec.field(default_factory=list)
    models: list[ModelRow] = msgspec.field(default_factory=list)


class Fleet(msgspec.Struct, kw_only=True):
    status: str | None = None
    nodes: list[NodeRow] = msgspec.field(default_factory=list)
    # The gateway's clock when it answered: relative times are computed against it, so a
    # workstation with a skewed clock still reads "12s ago" correctly.
    generated_at: float | None = None


def fetch_fleet(client: GatewayClient) -> Any:
    """The raw JSON of /admin/fleet (what --json prints), checked to be decodable."""
    raw = client.get(FLEET_PATH)
    decode_fleet(raw, source=client.endpoint + FLEET_PATH)
    return raw


def decode_fleet(raw: Any, *, source: str) -> Fleet:
    try:
        return msgspec.convert(raw, Fleet)
    except msgspec.ValidationError as exc:
        raise GatewayError(
            200, f"{source}: unexpected answer ({exc}); is the gateway the same version?"
        ) from exc


def _health(node: NodeRow) -> str:
    if node.healthy:
        return "healthy"
    return f"UNHEALTHY ({node.last_error})" if node.last_error else "UNHEALTHY"


def _node_rows(fleet: Fleet, now: float) -> list[list[str]]:
    return [
        [node.name, node.endpoint, _health(node), str(len(node.models)), ago(node.last_poll, now)]
        for node in fleet.nodes
    ]


def _device_rows(fleet: Fleet) -> list[list[str]]:
    rows: list[list[str]] = []
    for node in fleet.nodes:
        for device in node.devices:
            used = None
            if device.total_mb is not None and device.free_mb is not None:
                used = device.total_mb - device.free_mb
            util = "-" if device.utilization_pct is None else f"{device.utilization_pct}%"
            temp = "-" if device.temp_c is None else f"{device.temp_c}°C"
            label = f"{device.index} {device.name}" if device.name else str(device.index)
            rows.append([node.name, label, memory(used, device.total_mb), util, temp])
        if not node.devices and (node.cpu_only or node.host_memory_total_mb):
            total = node.host_memory_total_mb
            free = node.host_memory_free_mb
            used = total - free if total and free is not None else None
            rows.append([node.name, "cpu (host memory)", memory(used, total), "-", "-"])
    return rows


def _model_rows(fleet: Fleet, now: float) -> list[list[str]]:
    rows: list[list[str]] = []
    for node in fleet.nodes:
        for model in sorted(node.models, key=lambda m: m.id):
            state = model.status + (" (pinned)" if model.pinned else "")
            if model.status == "recovering":
                state += recovery_note(model, now)
            if model.error:
                state += f": {model.error}"
            busy = max(model.in_flight, model.neuron_in_flight)
            in_flight = str(busy) + (f" (+{model.queue_depth} queued)" if model.queue_depth else "")
            size = "-" if model.memory_mb is None else f"{model.memory_mb / 1024:.1f} GiB"
            rows.append([model.id, state, node.name, size, in_flight, ago(model.last_used, now)])
    return rows


def recovery_note(model: ModelRow, now: float) -> str:
    """` (reload 2 in 8s)`: which reload the gateway tries next, and when."""
    when = "" if model.retry_at is None else f" in {max(0, round(model.retry_at - now))}s"
    return f" (reload {model.attempts + 1}{when})"


def render_status(raw: Any, *, endpoint: str) -> str:
    fleet = decode_fleet(raw, source=endpoint + FLEET_PATH)
    now = fleet.generated_at if fleet.generated_at is not None else time.time()
    healthy = sum(node.healthy for node in fleet.nodes)
    status = f" ({fleet.status})" if fleet.status else ""
    lines = [f"cortex at {endpoint}{status}: {healthy}/{len(fleet.nodes)} nodes healthy", ""]
    if not fleet.nodes:
        lines.append("  no neurons configured ([[neurons]] in cortex.toml)")
        return "\n".join(lines)
    lines += [
        "Nodes",
        render_table(["NAME", "ENDPOINT", "HEALTH", "MODELS", "POLLED"], _node_rows(fleet, now)),
    ]
    devices = _device_rows(fleet)
    lines += ["", "Devices"]
    lines.append(
        render_table(["NODE", "DEVICE", "MEMORY USED / TOTAL", "UTIL", "TEMP"], devices)
        if devices
        else "  none reported yet"
    )
    models = _model_rows(fleet, now)
    lines += ["", "Models"]
    lines.append(
        render_table(["MODEL", "STATE", "NODE", "MEMORY", "IN-FLIGHT", "LAST USE"], models)
        if models
        else "  none loaded (cortex models load ORG/NAME, or send a request for a catalogue model)"
    )
    return "\n".join(lines)


def render_models_list(listing: Any) -> str:
    """The gateway's /v1/models as a table: id, loaded, and where (node(status), ...)."""
    entries = listing.get("data", []) if isinstance(listing, dict) else []
    rows: list[list[str]] = []
    for entry in sorted(entries, key=lambda e: str(e.get("id", ""))):
        locations = entry.get("locations") or []
        where = ", ".join(f"{loc.get('node')}({loc.get('status')})" for loc in locations)
        feasible = entry.get("feasible_on") or []
        if not where and feasible:
            where = "can load on " + ", ".join(str(node) for node in feasible)
        rows.append([str(entry.get("id")), "yes" if entry.get("loaded") else "no", where or "-"])
    if not rows:
        return "  no models (add them to models.toml, or load one: cortex models load ORG/NAME)"
    return render_table(["MODEL", "LOADED", "WHERE"], rows)
