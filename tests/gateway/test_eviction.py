"""Table tests for the eviction policy (pure: residents + free memory in, victims out)."""

from __future__ import annotations

import pytest

from cortex_gateway.eviction import (
    MemoryNeed,
    Resident,
    Strategy,
    blocked_by_residency,
    choose_devices,
    may_displace,
    plan_eviction,
)

NOW = 10_000.0
RESIDENCY = 60.0


def res(
    model_id: str,
    *,
    mb: int | None = 10_000,
    device: int = 0,
    priority: int = 100,
    idle: bool = True,
    pinned: bool = False,
    loaded_ago: float = 3600.0,
    used_ago: float | None = 100.0,
    status: str = "loaded",
) -> Resident:
    return Resident(
        model_id=model_id,
        priority=priority,
        idle=idle,
        pinned_here=pinned,
        memory_mb=mb,
        devices=(device,),
        loaded_at=NOW - loaded_ago,
        last_used=None if used_ago is None else NOW - used_ago,
        status=status,
    )


ONE_GPU = MemoryNeed(per_device_mb=12_000, count=1, eligible=(0,))
TWO_GPUS = MemoryNeed(per_device_mb=12_000, count=1, eligible=(0, 1))

CASES = [
    # (name, residents, free, need, incoming priority, incoming pinned here, expected victims or None)
    ("fits free: nothing evicted", [res("a")], {0: 20_000}, ONE_GPU, 100, False, ()),
    (
        "lru: least recently used goes",
        [res("a", used_ago=10), res("b", used_ago=500)],
        {0: 5_000},
        ONE_GPU,
        100,
        False,
        ("b",),
    ),
    (
        "never used goes before any used",
        [res("a", used_ago=999), res("b", used_ago=None)],
        {0: 5_000},
        ONE_GPU,
        100,
        False,
        ("b",),
    ),
    (
        "only as many as needed",
        [res("a", used_ago=1), res("b", used_ago=2), res("c", used_ago=3)],
        {0: 3_000},
        ONE_GPU,
        100,
        False,
        ("c",),
    ),
    (
        "two needed when one is not enough",
        [res("a", mb=5_000, used_ago=1), res("b", mb=5_000, used_ago=2)],
        {0: 3_000},
        ONE_GPU,
        100,
        False,
        ("b", "a"),
    ),
    ("busy resident stays", [res("a", idle=False)], {0: 5_000}, ONE_GPU, 100, False, None),
    (
        "recently loaded stays (thrash guard)",
        [res("a", loaded_ago=10)],
        {0: 5_000},
        ONE_GPU,
        100,
        False,
        None,
    ),
    ("residency just over: evictable", [res("a", loaded_ago=60)], {0: 5_000}, ONE_GPU, 100, False, ("a",)),
    (
        "lower priority first even if used recently",
        [res("lo", priority=50, used_ago=1), res("hi", used_ago=999)],
        {0: 5_000},
        ONE_GPU,
        100,
        False,
        ("lo",),
    ),
    (
        "higher priority never displaced by lower",
        [res("a", priority=200)],
        {0: 5_000},
        ONE_GPU,
        100,
        False,
        None,
    ),
    ("equal priority swaps (>=)", [res("a", priority=200)], {0: 5_000}, ONE_GPU, 200, False, ("a",)),
    (
        "pinned here stays for an unpinned incoming",
        [res("a", pinned=True)],
        {0: 5_000},
        ONE_GPU,
        100,
        False,
        None,
    ),
    (
        "pinned here yields to another pinned-here model of >= priority",
        [res("a", pinned=True)],
        {0: 5_000},
        ONE_GPU,
        100,
        True,
        ("a",),
    ),
    ("unknown footprint frees nothing", [res("a", mb=None)], {0: 5_000}, ONE_GPU, 100, False, None),
    ("loading model is never a victim", [res("a", status="loading")], {0: 5_000}, ONE_GPU, 100, False, None),
    (
        "victim on the device that helps, not the LRU on the other device",
        [res("a", device=0, used_ago=999, mb=1_000), res("b", device=1, used_ago=5, mb=10_000)],
        {0: 4_000, 1: 4_000},
        TWO_GPUS,
        100,
        False,
        ("b",),
    ),
    ("cannot fit even after evicting all", [res("a", mb=2_000)], {0: 5_000}, ONE_GPU, 100, False, None),
]


@pytest.mark.parametrize(
    ("residents", "free", "need", "priority", "pinned", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan_eviction(
    residents: list[Resident],
    free: dict[int, int],
    need: MemoryNeed,
    priority: int,
    pinned: bool,
    expected: tuple[str, ...] | None,
) -> None:
    plan = plan_eviction(
        residents,
        free,
        need,
        incoming_priority=priority,
        incoming_pinned_here=pinned,
        now=NOW,
        min_residency_secs=RESIDENCY,
    )
    assert (plan.victims if plan else None) == expected


@pytest.mark.parametrize(
    ("incoming", "resident", "allowed"),
    [(100, 100, True), (101, 100, True), (99, 100, False), (1000, 1000, True)],
)
def test_may_displace_is_greater_or_equal(incoming: int, resident: int, allowed: bool) -> None:
    assert may_displace(incoming, resident) is allowed


@pytest.mark.parametrize(
    ("free", "need", "expected"),
    [
        ({0: 10, 1: 30}, MemoryNeed(20, 1, (0, 1)), (1,)),
        ({0: 25, 1: 30, 2: 5}, MemoryNeed(20, 2, (0, 1, 2)), (0, 1)),
        ({0: 25, 1: 30, 2: 5}, MemoryNeed(20, 3, (0, 1, 2)), None),
        ({0: 100}, MemoryNeed(20, 1, (1,)), None),  # the only roomy device is not eligible
        ({-1: 4_000}, MemoryNeed(0, 1, (-1,)), (-1,)),  # unknown size on a CPU host
    ],
)
def test_choose_devices(free: dict[int, int], need: MemoryNeed, expected: tuple[int, ...] | None) -> None:
    assert choose_devices(free, need) == expected


def test_plan_for_tensor_parallel_model_frees_each_device() -> None:
    residents = [
        Resident("tp", 100, True, False, 16_000, (0, 1), loaded_at=0.0, last_used=1.0),
        Resident("small", 100, True, False, 2_000, (0,), loaded_at=0.0, last_used=0.0),
    ]
    need = MemoryNeed(per_device_mb=10_000, count=2, eligible=(0, 1))
    plan = plan_eviction(
        residents,
        {0: 3_000, 1: 3_000},
        need,
        incoming_priority=100,
        incoming_pinned_here=False,
        now=NOW,
        min_residency_secs=RESIDENCY,
    )
    assert plan is not None
    assert plan.victims == ("tp",)  # evicting "small" first is dropped: it does not help alone
    assert plan.devices == (0, 1)


def test_blocked_by_residency_reports_the_earliest_release() -> None:
    residents = [res("a", loaded_ago=10), res("b", loaded_ago=50), res("c", loaded_ago=500)]
    assert blocked_by_residency(residents, now=NOW, min_residency_secs=RESIDENCY) == pytest.approx(10.0)
    assert blocked_by_residency([res("c")], now=NOW, min_residency_secs=RESIDENCY) is None


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [("priority", ("lo-recent",)), ("lru", ("hi-stale",))],
)
def test_strategy_orders_victims(strategy: Strategy, expected: tuple[str, ...]) -> None:
    residents = [res("lo-recent", priority=50, used_ago=1), res("hi-stale", priority=100, used_ago=999)]
    plan = plan_eviction(
        residents,
        {0: 5_000},
        ONE_GPU,
        incoming_priority=100,
        incoming_pinned_here=False,
        now=NOW,
        min_residency_secs=RESIDENCY,
        strategy=strategy,
    )
    assert plan is not None and plan.victims == expected
