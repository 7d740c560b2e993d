"""A seeded, randomized drive of the control plane over fake neurons.

Hundreds of concurrent requests for models of different sizes; loads that fail (a neuron
error that recovery retries, a refusal it does not), loads that take a while, neurons that
vanish and come back, polls and clock jumps in between, all in an order chosen by a seeded
random generator. The fake neurons are the ground truth: a load that would not fit on its
device is refused and recorded there (what a real neuron's pre-flight does), as is a load
of a model that is already loading there.

Invariants: no device is ever over-committed, no load is duplicated, and every request
ends — with a lease or with a clear refusal (an ApiError of a known status and code).
Concurrency comes from events the driver sets, never from sleeps.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest
from support.fake_neuron import FakeClock, FakeNeuron, gateway

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.errors import ApiError
from cortex_gateway.router import Router

SIZES_MB = {
    "org/a2": 2_000,
    "org/b4": 4_000,
    "org/c6": 6_000,
    "org/d8": 8_000,
    "org/e10": 10_000,
    "org/f12": 12_000,
    "org/g16": 16_000,
    "org/h20": 20_000,
    "org/i22": 22_000,
    "org/j30": 30_000,
    "org/k5-broken": 5_000,
    "org/l3-refused": 3_000,
}
CATALOGUE = ModelCatalogue(
    [
        ModelProfile(id=model, vram_mb=size, residency_priority=100 if model == "org/a2" else 50)
        for model, size in SIZES_MB.items()
    ],
    {},
)
REQUESTS = 400
# What a request may end with besides a lease: each is a clear, documented refusal.
REFUSALS = {
    (429, "rate_limit_exceeded"),
    (502, "model_load_failed"),
    (503, "model_load_failed"),
    (503, "model_loading"),
    (503, "model_recovering"),
    (503, "insufficient_memory"),
    (503, "service_unavailable"),
}


@dataclass
class Outcome:
    model: str
    node: str | None = None
    refusal: tuple[int, str | None] | None = None
    message: str = ""


def neurons() -> list[FakeNeuron]:
    fleet = [
        FakeNeuron("n1", devices_mb=[24_000], sizes_mb=SIZES_MB),
        FakeNeuron("n2", devices_mb=[24_000, 24_000], sizes_mb=SIZES_MB),
        FakeNeuron("n3", devices_mb=[32_000], sizes_mb=SIZES_MB),
    ]
    for neuron in fleet:
        neuron.fail_loads["org/k5-broken"] = (500, "CUDA error: device-side assert")
        neuron.fail_loads["org/l3-refused"] = (422, "architecture 'mamba2' is not supported")
    return fleet


async def one_request(router: Router, model: str, done: asyncio.Event) -> Outcome:
    try:
        lease = await router.acquire(model)
    except ApiError as error:
        return Outcome(model, refusal=(error.status, error.code), message=error.message)
    upstream = lease.candidates[0]
    lease.use(upstream)
    try:
        await done.wait()  # the request is "generating" until the driver ends its wave
    finally:
        lease.release()
    return Outcome(model, node=upstream.node)


async def drive(seed: int) -> tuple[list[Outcome], list[FakeNeuron]]:
    """One randomized run; returns how every request ended and the fake neurons (ground truth)."""
    rng = random.Random(seed)
    fleet = neurons()
    clock = FakeClock()
    models = list(SIZES_MB)
    waves = [asyncio.Event() for _ in range(16)]
    async with gateway(
        fleet,
        CATALOGUE,
        clock=clock,
        router={"max_waiting_per_model": 48, "recovery_backoff_secs": 10.0, "recovery_max_attempts": 3},
        eviction={"min_residency_secs": 30.0},
        poller={"unhealthy_after": 2},
    ) as (app, _http):
        router: Router = app.state.router
        poller = app.state.poller
        finished = asyncio.Event()
        finished.set()
        requests: list[asyncio.Task[Outcome]] = []
        back_at: dict[str, int] = {}  # a vanished neuron returns at this step
        step = 0
        while len(requests) < REQUESTS:
            step += 1
            for neuron in fleet:
                if back_at.get(neuron.name) == step:
                    neuron.down = False
            for _ in range(rng.randint(1, 6)):
                model = rng.choice(models)
                # Most requests are short; some stay in flight until their wave ends, which
                # keeps their model busy (not evictable) meanwhile.
                until = rng.choice(waves) if rng.random() < 0.3 else finished
                requests.append(asyncio.create_task(one_request(router, model, until)))
            action = rng.random()
            neuron = rng.choice(fleet)
            if action < 0.2:
                neuron.hold_loads.clear()
            elif action < 0.4:
                neuron.hold_loads.set()
            elif action < 0.45 and not neuron.down:
                neuron.down = True
                back_at[neuron.name] = step + rng.randint(1, 6)
            elif action < 0.7:
                clock.advance(rng.choice([1.0, 15.0, 40.0]))
            else:
                # A wave of requests ends; a new one starts in its place (later requests
                # may join it).
                index = rng.randrange(len(waves))
                waves[index].set()
                waves[index] = asyncio.Event()
            # Polls land between whatever the requests are doing: they are concurrent, not
            # serialised with them, as in the running gateway.
            await poller.poll_once()
        # Wind down: every neuron back and loading, every wave over, until all have ended.
        for neuron in fleet:
            neuron.down = False
            neuron.hold_loads.set()
        for wave in waves:
            wave.set()
        # Nothing left can block a request now (its load is released, its wave is over):
        # one that has not ended within the guard is a hang.
        async with asyncio.timeout(60):  # a hang guard, not a speed assertion
            outcomes = await asyncio.gather(*requests)
            await router.settle()
    return outcomes, fleet


@pytest.mark.parametrize("seed", range(12))
async def test_randomized_requests_faults_and_polls_never_overcommit_or_duplicate(seed: int) -> None:
    outcomes, fleet = await drive(seed)
    served = [o for o in outcomes if o.node is not None]
    refused = [o for o in outcomes if o.refusal is not None]
    assert len(served) + len(refused) == len(outcomes) >= REQUESTS
    assert {o.refusal for o in refused} <= REFUSALS
    for neuron in fleet:
        assert neuron.overcommitted == [], f"{neuron.name} was asked to over-commit memory"
        assert neuron.duplicate_loads == [], f"{neuron.name} got the same load twice"
    # Not vacuous: the drive loaded many models, served them, and broken ones never served.
    assert len(served) > REQUESTS // 4
    assert len({o.model for o in served}) >= 6
    assert not any(o.model in ("org/k5-broken", "org/l3-refused") for o in served)


async def test_the_drives_exercise_evictions_failures_and_recoveries() -> None:
    """What the invariants above are checked against: the seeds do evict, fail and recover."""
    evictions = broken_loads = refused_loads = 0
    refusals: set[tuple[int, str | None] | None] = set()
    for seed in range(6):
        outcomes, fleet = await drive(seed)
        evictions += sum(len(n.unload_calls) for n in fleet)
        calls = [call["model_id"] for n in fleet for call in n.load_calls]
        broken_loads += calls.count("org/k5-broken")
        refused_loads += calls.count("org/l3-refused")
        refusals |= {o.refusal for o in outcomes if o.refusal is not None}
    assert evictions >= 10
    assert broken_loads >= 6 and refused_loads >= 6
    assert {(503, "insufficient_memory"), (503, "model_recovering"), (502, "model_load_failed")} <= refusals
