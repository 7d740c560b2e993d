"""Eviction policy: which residents of one node to unload so an incoming model fits. Pure.

Rules, in order:
- Only idle residents (no request in flight, nothing queued) that are `loaded` can go.
- A resident loaded less than `min_residency_secs` ago stays: two models alternating on a
  node that holds one of them cannot thrash it (each would evict the other on every request).
- A resident pinned on this node (`pinned_on` names it) is only displaced by an incoming
  model that is itself pinned here; pins express "this model lives here".
- `may_displace(incoming, resident)`: incoming priority >= resident priority. Equal classes
  may swap both ways (the reference's fix 158a89fa); a higher class is never displaced by a
  lower one.
- Order (`[eviction].strategy`): "priority" takes lower `residency_priority` first, then
  the least recently used (never used first); "lru" takes the least recently used first,
  whatever its class (classes still decide who may displace whom).
- Only as many as needed: victims are added one at a time until the model fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Strategy = Literal["lru", "priority"]


@dataclass(frozen=True, slots=True)
class Resident:
    model_id: str
    priority: int
    idle: bool
    pinned_here: bool
    # Footprint; None when neither the neuron nor the catalogue knows it (frees nothing known).
    memory_mb: int | None
    # Devices it occupies (fleet.HOST_MEMORY for a CPU host).
    devices: tuple[int, ...]
    loaded_at: float | None = None
    last_used: float | None = None
    status: str = "loaded"


@dataclass(frozen=True, slots=True)
class MemoryNeed:
    """What the incoming model needs: `count` devices among `eligible`, each with `per_device_mb` free."""

    per_device_mb: int
    count: int
    eligible: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    victims: tuple[str, ...]
    devices: tuple[int, ...]


def may_displace(incoming_priority: int, resident_priority: int) -> bool:
    return incoming_priority >= resident_priority


def choose_devices(free_by_device: Mapping[int, int], need: MemoryNeed) -> tuple[int, ...] | None:
    """The `count` eligible devices with the most free memory, if each has enough; else None."""
    ranked = sorted(need.eligible, key=lambda d: (-free_by_device.get(d, 0), d))[: need.count]
    if len(ranked) < need.count:
        return None
    if any(free_by_device.get(d, 0) < need.per_device_mb for d in ranked):
        return None
    return tuple(sorted(ranked))


def evictable(
    residents: Sequence[Resident],
    *,
    incoming_priority: int,
    incoming_pinned_here: bool,
    now: float,
    min_residency_secs: float,
    strategy: Strategy = "priority",
) -> list[Resident]:
    """Residents the incoming model may evict, best victim first."""
    allowed = [
        r
        for r in residents
        if r.status == "loaded"
        and r.idle
        and (not r.pinned_here or incoming_pinned_here)
        and may_displace(incoming_priority, r.priority)
        and (r.loaded_at is None or now - r.loaded_at >= min_residency_secs)
    ]
    # None sorts first: a resident nobody has used since it loaded is the best victim.
    if strategy == "lru":
        return sorted(
            allowed, key=lambda r: (r.last_used is not None, r.last_used or 0.0, r.priority, r.model_id)
        )
    return sorted(
        allowed, key=lambda r: (r.priority, r.last_used is not None, r.last_used or 0.0, r.model_id)
    )


def plan_eviction(
    residents: Sequence[Resident],
    free_by_device: Mapping[int, int],
    need: MemoryNeed,
    *,
    incoming_priority: int,
    incoming_pinned_here: bool,
    now: float,
    min_residency_secs: float,
    strategy: Strategy = "priority",
) -> EvictionPlan | None:
    """The fewest victims (in policy order) after which the model fits; None if it cannot."""
    devices = choose_devices(free_by_device, need)
    if devices is not None:
        return EvictionPlan(victims=(), devices=devices)
    candidates = [
        r
        for r in evictable(
            residents,
            incoming_priority=incoming_priority,
            incoming_pinned_here=incoming_pinned_here,
            now=now,
            min_residency_secs=min_residency_secs,
            strategy=strategy,
        )
        # One whose footprint is unknown frees nothing we can count on.
        if r.memory_mb and r.devices and any(d in need.eligible for d in r.devices)
    ]
    chosen: list[Resident] = []
    for resident in candidates:
        chosen.append(resident)
        if _fits_after(free_by_device, chosen, need) is not None:
            break
    else:
        return None
    # Greedy order can pick a victim on the wrong device first; drop any the fit does not need.
    for resident in list(chosen[:-1]):
        rest = [r for r in chosen if r is not resident]
        if _fits_after(free_by_device, rest, need) is not None:
            chosen = rest
    devices = _fits_after(free_by_device, chosen, need)
    assert devices is not None
    return EvictionPlan(victims=tuple(r.model_id for r in chosen), devices=devices)


def _fits_after(
    free_by_device: Mapping[int, int], victims: Sequence[Resident], need: MemoryNeed
) -> tuple[int, ...] | None:
    free = dict(free_by_device)
    for victim in victims:
        assert victim.memory_mb is not None
        for device in victim.devices:
            free[device] = free.get(device, 0) + victim.memory_mb // len(victim.devices)
    return choose_devices(free, need)


def blocked_by_residency(
    residents: Sequence[Resident], *, now: float, min_residency_secs: float
) -> float | None:
    """Seconds until the earliest resident's minimum residency ends (for Retry-After)."""
    waits = [
        min_residency_secs - (now - r.loaded_at)
        for r in residents
        if r.loaded_at is not None and now - r.loaded_at < min_residency_secs
    ]
    return min(waits) if waits else None
