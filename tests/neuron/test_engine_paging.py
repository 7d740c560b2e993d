"""Paged K/V under the scheduler: memory follows tokens in flight, joins copy nothing, long
prompts are chunked between decode steps, a full pool queues or preempts (output unchanged),
and a conversation's earlier turns come back from the prefix cache."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support.engine_harness import collect, load_model, reference_greedy, runner_with_blocks

from cortex_core.config.neuron import EngineConfig
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, TorchEngine
from neuron.engine.api import GenerationRequest, SamplingParams, TokenEvent
from neuron.engine.blocks import blocks_for
from neuron.engine.sampling import SamplerState
from neuron.engine.scheduler import Scheduler, SeqState

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama: Path) -> tuple[Any, Any]:
    return load_model(tiny_llama)


class ListSink:
    def __init__(self) -> None:
        self.items: list[TokenEvent | BaseException] = []

    def put(self, item: TokenEvent | BaseException) -> None:
        self.items.append(item)

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.items if isinstance(e, TokenEvent) and e.token_id is not None]


def sequence(seq_id: int, prompt: list[int], max_new: int) -> SeqState:
    return SeqState(
        seq_id=seq_id,
        request=GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new, sampling=GREEDY),
        sink=ListSink(),
        sampler=SamplerState.create(GREEDY),
        max_new_tokens=max_new,
    )


def prompt_of(length: int, salt: int = 0) -> list[int]:
    return [(i * 37 + salt * 11) % 300 + 5 for i in range(length)]


def tokens_of(seq: SeqState) -> list[int]:
    sink = seq.sink
    assert isinstance(sink, ListSink)
    return sink.tokens


def test_memory_follows_tokens_in_flight_and_joins_copy_nothing(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, _ = model_and_tokenizer
    runner = SingleDeviceRunner(model, device="cpu")
    scheduler = Scheduler(
        runner, max_batch_size=8, prefill_budget_tokens=512, on_finished=lambda s: None, prefix_caching=False
    )
    # Very different lengths, joining at different steps: a padded batch cache would hold
    # rows x the longest; the pool holds what each sequence has.
    plan = {
        0: (prompt_of(150, 1), 20),
        3: (prompt_of(5, 2), 30),
        6: (prompt_of(40, 3), 10),
        9: (prompt_of(3, 4), 25),
    }
    sequences: list[SeqState] = []
    step = 0
    while step == 0 or scheduler.has_work():
        if step in plan:
            prompt, max_new = plan[step]
            sequences.append(sequence(step, prompt, max_new))
            scheduler.incoming.append(sequences[-1])
        scheduler.step(lambda: None)
        active = [*scheduler.prefilling, *scheduler.running]
        held = sum(len(seq.table.blocks) for seq in active)
        assert scheduler.blocks.in_use == held
        for seq in active:
            # Exactly the blocks for its prompt, or for what it computed (the next token's
            # block is taken when the next step needs it).
            assert len(seq.table.blocks) == blocks_for(max(seq.prefill_target, seq.computed), 16)
        step += 1
    assert scheduler.blocks.in_use == 0
    assert [len(tokens_of(s)) for s in sequences] == [20, 30, 10, 25]
    # Every K/V slot ever written is a newly computed token: nothing moved on a join or leave.
    computed = sum(len(s.request.prompt_ids) + s.max_new_tokens - 1 for s in sequences)
    assert runner.pool is not None and runner.pool.slots_written == runner.layers * computed


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    model, _ = model_and_tokenizer
    runner = SingleDeviceRunner(model, device="cpu")
    scheduler = Scheduler(runner, max_batch_size=8, prefill_budget_tokens=32, on_finished=lambda s: None)
    streams = [sequence(i, prompt_of(6, i), 40) for i in range(3)]
    scheduler.incoming.extend(streams)
    scheduler.step(lambda: None)
    assert len(scheduler.running) == 3
    long = sequence(9, prompt_of(200, 9), 3)
    scheduler.incoming.append(long)
    steps_until_first_token = 0
    while not tokens_of(long):
        before = [len(tokens_of(s)) for s in streams]
        scheduler.step(lambda: None)
        steps_until_first_token += 1
        # Every step gave each running stream its token while the long prompt waited its turn.
        assert [len(tokens_of(s)) for s in streams] == [n + 1 for n in before]
    assert steps_until_first_token == blocks_for(200, 32)  # one 32-token chunk a step
    while scheduler.has_work():
        scheduler.step(lambda: None)
    expected, _ = reference_greedy(model, prompt_of(200, 9), 3, stop_at_eos=False)
    assert tokens_of(long) == expected


def test_a_full_pool_preempts_the_youngest_and_the_output_is_unchanged(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    model, _ = model_and_tokenizer
    # 10 blocks of 16: room for about two of these sequences at their full length (64 positions).
    runner = runner_with_blocks(model, usable_blocks=10)
    scheduler = Scheduler(runner, max_batch_size=4, prefill_budget_tokens=512, on_finished=lambda s: None)
    sequences = [sequence(i, prompt_of(20, i), 44) for i in range(4)]
    scheduler.incoming.extend(sequences)
    while scheduler.has_work():
        scheduler.step(lambda: None)
        assert scheduler.blocks.in_use <= scheduler.blocks.usable_blocks
    assert scheduler.preemptions > 0
    assert any(s.preemptions for s in sequences)
    for seq in sequences:
        expected, _ = reference_greedy(model, seq.request.prompt_ids, 44, stop_at_eos=False)
        assert tokens_of(seq) == expected


async def test_a_burst_beyond_the_pool_queues_instead_of_failing(
    model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker
) -> None:
    model, _ = model_and_tokenizer
    runner = runner_with_blocks(model, usable_blocks=12)  # 192 positions: one long prompt at a time
    engine = TorchEngine(runner, worker=worker, config=EngineConfig(max_batch_size=8), model_id="tiny")
    try:
        assert engine.max_context == min(runner.max_context, 12 * 16)
        prompts = [prompt_of(150, salt) for salt in range(4)]
        requests = [GenerationRequest(prompt_ids=p, max_new_tokens=8, sampling=GREEDY) for p in prompts]
        results = await asyncio.gather(*(collect(engine.generate(r)) for r in requests))
        assert engine.load().kv_blocks_used == 0 and engine.load().kv_blocks_total == 12
    finally:
        await engine.close()
    for prompt, got in zip(prompts, results, strict=True):
        assert got.tokens == reference_greedy(model, prompt, 8, stop_at_eos=False)[0]


async def test_conversations_reuse_every_earlier_turn(
    model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker
) -> None:
    """Several conversations, turns interleaved: each turn finds the previous turn's prompt
    and answer in the prefix cache (whole blocks), however many other sessions ran between."""
    model, _ = model_and_tokenizer
    engine = TorchEngine(
        SingleDeviceRunner(model, device="cpu"), worker=worker, config=EngineConfig(), model_id="t"
    )
    histories = {c: prompt_of(30 + 7 * c, c) for c in range(6)}
    previous: dict[int, int] = {}
    try:
        for turn in range(3):
            for conversation, history in histories.items():
                request = GenerationRequest(prompt_ids=history, max_new_tokens=6, sampling=GREEDY)
                got = await collect(engine.generate(request))
                if turn > 0:
                    # At least every full block of the previous turn's prompt (its answer too,
                    # but for the last token, whose K/V is never computed).
                    assert got.cached_tokens >= previous[conversation] // 16 * 16 > 0
                previous[conversation] = len(history)
                # The next turn: this prompt, the answer, and a new user message.
                histories[conversation] = [*history, *got.tokens, *prompt_of(9, 50 + turn)]
    finally:
        await engine.close()
