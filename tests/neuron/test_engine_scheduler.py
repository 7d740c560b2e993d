"""Engine behaviour: finishes, stops, cancellation, admission, context limits, seeds, close."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from support.engine_harness import HANG_GUARD_SECS, collect, load_model, reference_greedy

from cortex_core.config.neuron import EngineConfig
from cortex_core.errors import ApiError
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, TorchEngine
from neuron.engine.api import GenerationRequest, SamplingParams
from neuron.engine.paged import ForwardRow
from neuron.engine.sampling import SampledToken, SamplerState
from neuron.engine.scheduler import Scheduler, SeqState

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_qwen3: Path) -> tuple[Any, Any]:
    return load_model(tiny_qwen3)


@pytest.fixture
async def make_engine(model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker) -> AsyncIterator[Any]:
    engines: list[TorchEngine] = []

    def make(runner: SingleDeviceRunner | None = None, **config: Any) -> TorchEngine:
        runner = runner or SingleDeviceRunner(model_and_tokenizer[0], device="cpu")
        engine = TorchEngine(runner, worker=worker, config=EngineConfig(**config), model_id="tiny")
        engines.append(engine)
        return engine

    yield make
    for engine in engines:  # a failed test must not leave steps running for the next one
        await asyncio.wait_for(engine.close(), HANG_GUARD_SECS)


@pytest.fixture
def prompt(model_and_tokenizer: tuple[Any, Any]) -> list[int]:
    return list(model_and_tokenizer[1].encode("The capital of France is"))


def greedy(prompt: list[int], max_new: int, stops: frozenset[int] = frozenset()) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new, sampling=GREEDY, stop_token_ids=stops)


async def events_of(stream: AsyncIterator[Any]) -> list[Any]:
    async def run() -> list[Any]:
        return [event async for event in stream]

    return await asyncio.wait_for(run(), HANG_GUARD_SECS)


async def test_length_finish_carries_the_last_token(make_engine: Any, prompt: list[int]) -> None:
    engine = make_engine()
    events = await events_of(engine.generate(greedy(prompt, 5)))
    await engine.close()
    assert [e.finish_reason for e in events] == [None, None, None, None, "length"]
    assert all(e.token_id is not None for e in events)
    assert [e.completion_tokens for e in events] == [1, 2, 3, 4, 5]
    assert {e.prompt_tokens for e in events} == {len(prompt)}


async def test_zero_max_tokens_still_yields_one(make_engine: Any, prompt: list[int]) -> None:
    engine = make_engine()
    events = await events_of(engine.generate(greedy(prompt, 0)))
    await engine.close()
    assert len(events) == 1 and events[0].finish_reason == "length"


async def test_stop_token_ends_with_stop_and_is_never_emitted(
    make_engine: Any, model_and_tokenizer: tuple[Any, Any], prompt: list[int]
) -> None:
    model, _ = model_and_tokenizer
    reference = reference_greedy(model, prompt, 20)[0]
    stop = reference[5]
    first = reference.index(stop)
    engine = make_engine()
    events = await events_of(engine.generate(greedy(prompt, 20, frozenset({stop, 10_000}))))
    await engine.close()
    assert [e.token_id for e in events[:-1]] == reference[:first]
    assert events[-1].token_id is None
    assert events[-1].finish_reason == "stop"
    assert events[-1].completion_tokens == first


async def test_cancelled_stream_frees_its_slot(make_engine: Any, prompt: list[int]) -> None:
    engine = make_engine(max_batch_size=1, max_queue_depth=4)
    long_one = engine.generate(greedy(prompt, 900))
    await anext(long_one)
    waiting = engine.generate(greedy(prompt, 4))
    load = engine.load()
    assert (load.in_flight, load.queue_depth, load.max_in_flight) == (1, 1, 1)
    await long_one.aclose()
    got = await collect(waiting)
    assert got.finish_reason == "length" and len(got.tokens) == 4
    assert (engine.load().in_flight, engine.load().queue_depth) == (0, 0)
    await engine.close()


async def test_dropped_stream_frees_its_slot(make_engine: Any, prompt: list[int]) -> None:
    engine = make_engine(max_batch_size=1, max_queue_depth=4)
    forgotten = engine.generate(greedy(prompt, 900))
    await anext(forgotten)
    del forgotten
    gc.collect()
    got = await collect(engine.generate(greedy(prompt, 3)))
    assert len(got.tokens) == 3
    await engine.close()


async def test_full_queue_is_503_with_retry_after(make_engine: Any, prompt: list[int]) -> None:
    engine = make_engine(max_batch_size=1, max_queue_depth=1)
    running = engine.generate(greedy(prompt, 900))
    queued = engine.generate(greedy(prompt, 900))
    with pytest.raises(ApiError) as refused:
        engine.generate(greedy(prompt, 5))
    assert refused.value.status == 503
    assert refused.value.code == "queue_full"
    assert "retry-after" in refused.value.headers()
    await running.aclose()
    await queued.aclose()
    # Once the slots are free, requests are accepted again.
    assert len((await collect(engine.generate(greedy(prompt, 2)))).tokens) == 2
    await engine.close()


async def test_context_overflow_is_400_naming_both_numbers(make_engine: Any, prompt: list[int]) -> None:
    engine = make_engine()
    limit = engine.runner.max_context
    with pytest.raises(ApiError) as refused:
        engine.generate(greedy(prompt, limit))
    assert refused.value.status == 400
    assert refused.value.code == "context_length_exceeded"
    assert str(limit) in refused.value.message
    assert str(len(prompt) + limit) in refused.value.message
    # Exactly at the limit is fine.
    got = await collect(engine.generate(greedy(prompt[:2], 3)))
    assert len(got.tokens) == 3
    with pytest.raises(ApiError) as empty:
        engine.generate(greedy([], 3))
    assert empty.value.status == 400
    await engine.close()


async def test_seed_reproduces_alone_and_batched(make_engine: Any, prompt: list[int]) -> None:
    engine = make_engine(max_batch_size=4)

    def seeded(seed: int) -> GenerationRequest:
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed, repetition_penalty=1.1)
        return GenerationRequest(prompt_ids=prompt, max_new_tokens=24, sampling=params)

    alone = await collect(engine.generate(seeded(42)))
    again = await collect(engine.generate(seeded(42)))
    other = await collect(engine.generate(seeded(43)))
    companions = [
        GenerationRequest(
            prompt_ids=prompt[:3], max_new_tokens=30, sampling=SamplingParams(temperature=0.7, seed=1)
        ),
        greedy(prompt + prompt, 10),
        GenerationRequest(prompt_ids=prompt[1:], max_new_tokens=5, sampling=SamplingParams(temperature=2.0)),
    ]
    batched = await asyncio.gather(*(collect(engine.generate(r)) for r in [*companions, seeded(42)]))
    await engine.close()
    assert alone.tokens == again.tokens == batched[-1].tokens
    assert other.tokens != alone.tokens


class FailingRunner(SingleDeviceRunner):
    """A forward fails when it starts a prompt whose first token is 7."""

    def forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
        if any(row.start == 0 and row.tokens[0] == 7 for row in rows):
            raise RuntimeError("prefill exploded")
        return super().forward(rows)


async def test_a_failed_prefill_fails_only_its_request(
    make_engine: Any, model_and_tokenizer: tuple[Any, Any], prompt: list[int]
) -> None:
    engine = make_engine(FailingRunner(model_and_tokenizer[0], device="cpu"))
    healthy = engine.generate(greedy(prompt, 6))
    doomed = engine.generate(greedy([7, *prompt], 6))
    with pytest.raises(RuntimeError, match="prefill exploded"):
        await collect(doomed)
    assert len((await collect(healthy)).tokens) == 6
    assert engine.load().queue_depth == 0
    await engine.close()


class ListSink:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def put(self, item: Any) -> None:
        self.items.append(item)


def sequence(seq_id: int, prompt: list[int], max_new: int, sampling: SamplingParams = GREEDY) -> SeqState:
    """A sequence as the engine queues it, its events kept in a ListSink; `sampling` builds
    its sampler (the request it carries is greedy)."""
    return SeqState(
        seq_id=seq_id,
        request=greedy(prompt, max_new),
        sink=ListSink(),
        sampler=SamplerState.create(sampling),
        max_new_tokens=max_new,
    )


def test_a_failed_batched_prefill_is_retried_one_by_one(
    model_and_tokenizer: tuple[Any, Any], prompt: list[int]
) -> None:
    """Admitted in the same step, the healthy request survives its companion's failure."""
    finished: list[int] = []
    runner = FailingRunner(model_and_tokenizer[0], device="cpu")
    scheduler = Scheduler(
        runner, max_batch_size=8, prefill_budget_tokens=512, on_finished=lambda s: finished.append(s.seq_id)
    )
    sequences = [sequence(i, p, 3) for i, p in enumerate([prompt, [7, *prompt], prompt[1:]])]
    scheduler.incoming.extend(sequences)
    while scheduler.has_work():
        scheduler.step(lambda: None)
    healthy, doomed, other = (seq.sink.items for seq in sequences)  # type: ignore[attr-defined]
    assert isinstance(doomed[0], RuntimeError) and "prefill exploded" in str(doomed[0])
    assert [e.token_id is not None for e in healthy] == [True, True, True]
    assert len(other) == 3 and other[-1].finish_reason == "length"
    assert sorted(finished) == [0, 1, 2]


def test_first_tokens_of_prompts_prefilled_together_are_sampled_in_one_batch(
    model_and_tokenizer: tuple[Any, Any], prompt: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One copy back from the device for all of them, and a sampler failure of one request
    (retried one by one) fails only that request."""
    import neuron.engine.scheduler as scheduler_module

    batches: list[int] = []
    batched = scheduler_module.sample_tokens

    def counting(
        logits: torch.Tensor, states: Sequence[SamplerState], masks: Any = None
    ) -> list[SampledToken]:
        batches.append(len(states))
        if any(s.params.top_k == 13 for s in states):
            raise RuntimeError("sampler exploded")
        return batched(logits, states, masks)

    monkeypatch.setattr(scheduler_module, "sample_tokens", counting)
    scheduler = Scheduler(
        SingleDeviceRunner(model_and_tokenizer[0], device="cpu"),
        max_batch_size=8,
        prefill_budget_tokens=512,
        on_finished=lambda s: None,
    )
    sampled = SamplingParams(temperature=0.7, seed=3)
    sequences = [sequence(i, p, 1, sampled) for i, p in enumerate([prompt, prompt[1:], prompt[2:]])]
    scheduler.incoming.extend(sequences)
    scheduler.step(lambda: None)
    assert batches == [3]
    assert all(len(seq.sink.items) == 1 for seq in sequences)  # type: ignore[attr-defined]

    batches.clear()
    doomed = SamplingParams(temperature=0.7, top_k=13)
    more = [
        sequence(10 + i, p, 1, params)
        for i, (p, params) in enumerate([(prompt, sampled), (prompt[1:], doomed)])
    ]
    scheduler.incoming.extend(more)
    scheduler.step(lambda: None)
    # The batch (2) failed on the doomed row; one by one, the healthy one passes, the doomed fails alone.
    assert batches[0] == 2
    healthy, failed = (seq.sink.items for seq in more)  # type: ignore[attr-defined]
    assert healthy[-1].token_id is not None
    assert isinstance(failed[-1], RuntimeError)


async def test_close_fails_running_requests_with_503(make_engine: Any, prompt: list[int]) -> None:
    engine = make_engine()
    running = engine.generate(greedy(prompt, 900))
    await anext(running)
    await asyncio.wait_for(engine.close(), HANG_GUARD_SECS)
    with pytest.raises(ApiError) as unloaded:
        await collect(running)
    assert unloaded.value.status == 503
    with pytest.raises(ApiError) as closed:
        engine.generate(greedy(prompt, 2))
    assert closed.value.status == 503
    await engine.close()  # idempotent


async def test_load_reports_throughput(make_engine: Any, prompt: list[int]) -> None:
    engine = make_engine()
    await collect(engine.generate(greedy(prompt, 8)))
    load = engine.load()
    await engine.close()
    assert load.id == "tiny"
    assert load.tok_s_prefill > 0 and load.tok_s_decode > 0
    assert (load.in_flight, load.queue_depth) == (0, 0)
