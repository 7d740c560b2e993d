"""Fair share: a model's queued requests are served round-robin by key, not first-come."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.fake_neuron import FakeClock, gateway, relaying_neuron
from support.fake_upstream import FakeUpstream, Script

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.errors import ApiError
from cortex_core.keys import KeyLimits, KeysFile, new_key, write_keys
from cortex_gateway.auth import Caller
from cortex_gateway.quota import FairQueue, LimitBook

MODEL = "org/chat"


def serve_next(queue: FairQueue, turns: list[tuple[str, asyncio.Future[None]]]) -> str:
    """Free one slot; the key of the waiter it went to (exactly one turn completes)."""
    queue.leave(MODEL)
    granted = [(key, turn) for key, turn in turns if turn.done()]
    assert len(granted) == 1
    turns.remove(granted[0])
    return granted[0][0]


def queue_up(queue: FairQueue, keys: list[str]) -> list[tuple[str, asyncio.Future[None]]]:
    turns = []
    for key in keys:
        turn = queue.join(MODEL, key)
        assert turn is not None  # every slot is taken: it waits
        turns.append((key, turn))
    return turns


async def test_one_request_of_key_b_is_served_within_two_freed_slots_despite_50_of_key_a() -> None:
    slots = 4
    queue = FairQueue(slots, max_waiting=100, retry_after=1)
    # Key A holds every batch slot and queues the rest of its 50; then B sends one.
    assert all(queue.join(MODEL, "A") is None for _ in range(slots))
    turns = queue_up(queue, ["A"] * (50 - slots) + ["B"])
    first_two = [serve_next(queue, turns), serve_next(queue, turns)]
    assert "B" in first_two
    # The rest are A's, in their order, each freed slot handed on (none given back).
    assert [serve_next(queue, turns) for _ in range(50 - slots - 1)] == ["A"] * (50 - slots - 1)


async def test_round_robin_order_across_three_keys() -> None:
    queue = FairQueue(1, max_waiting=100, retry_after=1)
    assert queue.join(MODEL, "A") is None
    turns = queue_up(queue, ["A", "A", "A", "B", "C", "C"])
    order = [serve_next(queue, turns) for _ in range(6)]
    # Each key's oldest request in turn: A, B, C, then A, C, then A.
    assert order == ["A", "B", "C", "A", "C", "A"]


def observe_joins(queue: FairQueue, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set each time a request joins the queue (clear it before the next one)."""
    joined = asyncio.Event()
    join = queue.join

    def observed(model: str, key: str) -> asyncio.Future[None] | None:
        turn = join(model, key)
        joined.set()
        return turn

    monkeypatch.setattr(queue, "join", observed)
    return joined


async def test_a_cancelled_waiter_leaves_the_queue_and_a_full_queue_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue = FairQueue(1, max_waiting=2, retry_after=3)
    await queue.enter(MODEL, "A")
    joined = observe_joins(queue, monkeypatch)
    joined.clear()
    waiter = asyncio.ensure_future(queue.enter(MODEL, "B"))
    await joined.wait()  # the waiter's task has queued itself
    second = queue.join(MODEL, "C")
    assert second is not None
    with pytest.raises(ApiError) as caught:
        queue.join(MODEL, "D")
    assert (caught.value.status, caught.value.retry_after) == (429, 3)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.waiting(MODEL) == 1
    queue.leave(MODEL)  # the slot skips the cancelled waiter
    assert second.done()
    queue.leave(MODEL)
    assert queue.waiting(MODEL) == 0


def test_limit_book_concurrency_rpm_and_tpm() -> None:
    clock = FakeClock(0.0)
    book = LimitBook(clock)
    caller = Caller(name="k", limits=KeyLimits(concurrent=2, requests_per_minute=3, tokens_per_minute=100))
    book.admit(caller)
    book.admit(caller)
    with pytest.raises(ApiError, match="2 concurrent requests"):
        book.admit(caller)
    book.finished(caller, 60)
    book.finished(caller, 50)  # 110 tokens in the window: over the 100 per minute
    with pytest.raises(ApiError, match="100 tokens per minute") as caught:
        book.admit(caller)
    assert caught.value.retry_after == 60
    clock.advance(61)
    book.admit(caller)
    book.admit(caller)
    book.finished(caller, 0)
    book.admit(caller)
    book.finished(caller, 0)  # one in flight: the third request of this minute is the limit
    with pytest.raises(ApiError, match="3 requests per minute"):
        book.admit(caller)
    unlimited = Caller(name="free")
    for _ in range(1000):
        book.admit(unlimited)
    assert book.in_flight("free") == 0  # nothing is kept for a key without limits


async def test_the_gateway_serves_a_full_model_round_robin_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_entry, a_secret = new_key("a")
    b_entry, b_secret = new_key("b")
    keys_file = tmp_path / "keys.json"
    write_keys(keys_file, KeysFile(keys=[a_entry, b_entry]))
    release = asyncio.Event()
    chunks = [b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}']
    async with FakeUpstream(Script(chunks=chunks, gate=(0, release))) as upstream:
        neuron = relaying_neuron(upstream.base_url, MODEL)
        catalogue = ModelCatalogue([ModelProfile(id=MODEL)], {})
        async with gateway(
            [neuron],
            catalogue,
            auth={"keys_file": str(keys_file)},
            router={"max_concurrent_per_model": 1},
        ) as (app, http):

            def send(secret: str, tag: str) -> asyncio.Future[object]:
                return asyncio.ensure_future(
                    http.post(
                        "/v1/chat/completions",
                        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                        headers={"authorization": f"Bearer {secret}", "x-request-id": tag},
                    )
                )

            joined = observe_joins(app.state.gate.queue, monkeypatch)
            first = send(a_secret, "a1")
            await asyncio.wait_for(upstream.called.wait(), 10)  # a1 holds the only slot
            sent = [first]
            for secret, tag in ((a_secret, "a2"), (a_secret, "a3"), (a_secret, "a4"), (b_secret, "b1")):
                joined.clear()
                sent.append(send(secret, tag))
                await asyncio.wait_for(joined.wait(), 10)  # queued before the next is sent
            release.set()
            responses = await asyncio.wait_for(asyncio.gather(*sent), 10)
    assert all(r.status_code == 200 for r in responses)  # type: ignore[attr-defined]
    order = [{k.lower(): v for k, v in call.headers.items()}["x-request-id"] for call in upstream.calls]
    # First-come would be a1 a2 a3 a4 b1; by key, b1 is served at the second freed slot.
    assert order == ["a1", "a2", "b1", "a3", "a4"]


async def test_a_request_that_never_gets_a_slot_gets_503_with_retry_after() -> None:
    release = asyncio.Event()
    async with FakeUpstream(Script(gate=(0, release))) as upstream:
        neuron = relaying_neuron(upstream.base_url, MODEL)
        catalogue = ModelCatalogue([ModelProfile(id=MODEL)], {})
        async with gateway(
            [neuron], catalogue, router={"max_concurrent_per_model": 1, "load_wait_secs": 0.2}
        ) as (_app, http):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            holder = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
            await asyncio.wait_for(upstream.called.wait(), 10)  # it holds the only slot
            waiter = await http.post("/v1/chat/completions", json=body)
            release.set()
            held = await asyncio.wait_for(holder, 10)
    assert held.status_code == 200
    assert waiter.status_code == 503
    assert waiter.headers["retry-after"] == "5"
    assert "no slot" in waiter.json()["error"]["message"]
    assert len(upstream.calls) == 1
