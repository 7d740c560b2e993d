"""Golden tests: the engine's greedy tokens equal transformers' greedy generate(), alone and batched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from support.engine_harness import (
    PROMPT_TEXTS,
    bf16_top_agrees,
    collect,
    eos_ids,
    load_model,
    prefill_and_decode_rows,
    reference_greedy,
    run_with_preemptions,
    runner_with_blocks,
)
from support.tiny_models import FAMILIES, build_tokenizer, tiny_family_model

from cortex_core.config.neuron import EngineConfig
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, TorchEngine
from neuron.engine.api import GenerationRequest, SamplingParams
from neuron.engine.paged import ForwardRow

GREEDY = SamplingParams(temperature=0.0)
MAX_NEW = [12, 30, 7, 24, 18, 3, 27, 15]


class RecordingRunner(SingleDeviceRunner):
    """Counts how many sequences each decode forward (one new token per row) carried."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sizes: list[int] = []

    def forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
        if all(len(row.tokens) == 1 for row in rows):
            self.batch_sizes.append(len(rows))
        return super().forward(rows)


@pytest.fixture(scope="module", params=["tiny_qwen3", "tiny_llama"])
def model_and_prompts(request: pytest.FixtureRequest) -> tuple[Any, list[list[int]]]:
    path: Path = request.getfixturevalue(request.param)
    model, tokenizer = load_model(path)
    return model, [tokenizer.encode(text) for text in PROMPT_TEXTS]


class Golden(NamedTuple):
    """What a golden test compares: a tiny model and its prompts, an engine over a recording
    runner of that model, and the model's end-of-sequence ids."""

    model: Any
    prompts: list[list[int]]
    engine: TorchEngine
    runner: RecordingRunner
    stops: frozenset[int]


@pytest.fixture
async def golden(
    model_and_prompts: tuple[Any, list[list[int]]], worker: DeviceWorker
) -> AsyncIterator[Golden]:
    model, prompts = model_and_prompts
    runner = RecordingRunner(model, device="cpu")
    engine = TorchEngine(runner, worker=worker, config=EngineConfig(max_batch_size=8), model_id="tiny")
    yield Golden(model, prompts, engine, runner, eos_ids(model))
    await engine.close()


def request(prompt: list[int], max_new: int, stops: frozenset[int]) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new, sampling=GREEDY, stop_token_ids=stops)


async def test_alone_equals_generate(golden: Golden) -> None:
    for prompt, max_new in zip(golden.prompts[:4], MAX_NEW[:4], strict=True):
        expected, finish = reference_greedy(golden.model, prompt, max_new)
        got = await collect(golden.engine.generate(request(prompt, max_new, golden.stops)))
        assert got.tokens == expected
        assert got.finish_reason == finish
        assert got.completion_tokens == len(expected)
        assert got.prompt_tokens == len(prompt)


async def test_eight_concurrent_staggered_equal_generate(golden: Golden) -> None:
    model, prompts, engine, runner, stops = golden
    expected = [reference_greedy(model, p, n) for p, n in zip(prompts, MAX_NEW, strict=True)]
    # Four start together; four more join once the first ones are decoding (MAX_NEW[0] > 2).
    streams = [engine.generate(request(p, n, stops)) for p, n in zip(prompts[:4], MAX_NEW[:4], strict=True)]
    early = [await anext(streams[0]), await anext(streams[0])]  # a prefill token, then a decode token
    first = [asyncio.create_task(collect(s)) for s in streams]
    later = [
        asyncio.create_task(collect(engine.generate(request(p, n, stops))))
        for p, n in zip(prompts[4:], MAX_NEW[4:], strict=True)
    ]
    results = await asyncio.gather(*first, *later)
    results[0].tokens[:0] = [e.token_id for e in early]
    for (tokens, finish), got in zip(expected, results, strict=True):
        assert got.tokens == tokens
        assert got.finish_reason == finish
    assert max(runner.batch_sizes) > 4, "sequences were not decoded together"
    assert engine.load().in_flight == 0


async def test_moe_batched_equals_generate(tiny_qwen3_moe: Path, worker: DeviceWorker) -> None:
    model, tokenizer = load_model(tiny_qwen3_moe)
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS[:4]]
    stops = eos_ids(model)
    expected = [reference_greedy(model, p, 16) for p in prompts]
    runner = RecordingRunner(model, device="cpu")
    engine = TorchEngine(runner, worker=worker, config=EngineConfig(max_batch_size=4), model_id="moe")
    try:
        results = await asyncio.gather(*(collect(engine.generate(request(p, 16, stops))) for p in prompts))
    finally:
        await engine.close()
    assert [r.tokens for r in results] == [tokens for tokens, _ in expected]
    assert max(runner.batch_sizes) > 1


async def test_repeated_prefix_reports_cached_tokens_and_keeps_output(golden: Golden) -> None:
    model, prompts, engine, runner, stops = golden
    first_turn = prompts[3] + prompts[6]
    first = await collect(engine.generate(request(first_turn, 10, stops)))
    assert first.cached_tokens == 0
    # The next turn repeats the first prompt and appends to it (as a chat history does).
    second_turn = first_turn + prompts[1]
    expected, finish = reference_greedy(model, second_turn, 20)
    second = await collect(engine.generate(request(second_turn, 20, stops)))
    # Every full block of the shared part (K/V is cached by whole blocks).
    assert second.cached_tokens == len(first_turn) // runner.block_size * runner.block_size > 0
    assert (second.tokens, second.finish_reason) == (expected, finish)


async def test_long_batched_generation_grows_its_buffers_and_still_matches(golden: Golden) -> None:
    # 300 steps outgrow the initial K/V headroom and padding-mask width of the batch.
    chosen = [golden.prompts[0], golden.prompts[5]]
    expected = [reference_greedy(golden.model, p, 300, stop_at_eos=False) for p in chosen]
    runs = (collect(golden.engine.generate(request(p, 300, frozenset()))) for p in chosen)
    results = await asyncio.gather(*runs)
    for (tokens, _), got in zip(expected, results, strict=True):
        assert len(tokens) == 300
        assert got.tokens == tokens


async def test_hybrid_models_equal_generate_alone_batched_and_chunked(
    tiny_hybrid: Path, worker: DeviceWorker
) -> None:
    """Gated DeltaNet + full attention (Qwen3.5, Qwen3.5-MoE, Qwen3-Next): each sequence's
    linear-attention state travels with it through chunked prefill and batched decode."""
    model, tokenizer = load_model(tiny_hybrid)
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS[:4]]
    stops = eos_ids(model)
    expected = [reference_greedy(model, p, 16) for p in prompts]
    runner = RecordingRunner(model, device="cpu", max_batch_size=4)
    # Chunks of 8 tokens: every prompt but the first is prefilled over several steps.
    config = EngineConfig(max_batch_size=4, prefill_chunk_tokens=8)
    engine = TorchEngine(runner, worker=worker, config=config, model_id="hybrid")
    try:
        alone = await collect(engine.generate(request(prompts[3], 16, stops)))
        assert (alone.tokens, alone.finish_reason) == expected[3]
        results = await asyncio.gather(*(collect(engine.generate(request(p, 16, stops))) for p in prompts))
        # The same prompt again: a hybrid model's state cannot be rebuilt from shared blocks.
        again = await collect(engine.generate(request(prompts[3], 16, stops)))
    finally:
        await engine.close()
    assert [(r.tokens, r.finish_reason) for r in results] == expected
    assert max(runner.batch_sizes) > 1, "sequences were not decoded together"
    assert (again.tokens, again.cached_tokens) == (alone.tokens, 0)


def test_a_preempted_hybrid_sequence_recomputes_its_state(tiny_hybrid: Path) -> None:
    """A pool too small for the batch: preempted sequences restart their linear-attention
    state from zeros when readmitted, and their output is unchanged."""
    model, tokenizer = load_model(tiny_hybrid)
    # 8 blocks of 16 positions: not enough for four sequences of up to 50 positions.
    runner = runner_with_blocks(model, 8, max_batch_size=4)
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS[1:5]]
    outputs, preemptions = run_with_preemptions(
        runner, [request(p, 30, frozenset()) for p in prompts], max_batch_size=4
    )
    assert preemptions > 0
    for tokens, prompt in zip(outputs, prompts, strict=True):
        assert tokens == reference_greedy(model, prompt, 30, stop_at_eos=False)[0]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
async def test_every_family_on_the_generic_path_equals_generate(
    model_type: str, worker: DeviceWorker
) -> None:
    """Sliding windows, soft-capping, sinks, MoE: transformers' own layers over the paged
    pool give generate()'s tokens, alone and batched with left padding, with chunked prefill."""
    tokenizer = build_tokenizer()
    model = tiny_family_model(model_type, tokenizer)
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS[1:5]]
    stops = eos_ids(model)
    expected = [reference_greedy(model, p, 12) for p in prompts]
    runner = RecordingRunner(model, device="cpu")
    engine = TorchEngine(
        runner,
        worker=worker,
        config=EngineConfig(max_batch_size=4, prefill_chunk_tokens=16),
        model_id=model_type,
    )
    try:
        results = await asyncio.gather(*(collect(engine.generate(request(p, 12, stops))) for p in prompts))
    finally:
        await engine.close()
    assert [(r.tokens, r.finish_reason) for r in results] == expected
    assert max(runner.batch_sizes) > 1


def _bf16_rows_match_the_hf_forward(model: Any, prompts: list[list[int]]) -> None:
    rows = prefill_and_decode_rows(SingleDeviceRunner(model, device="cpu"), prompts)
    with torch.inference_mode():
        for _, ours, tokens in rows:
            reference = model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
            assert float(torch.nn.functional.cosine_similarity(ours, reference, dim=0)) > 0.9995
            assert bf16_top_agrees(ours, reference)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_bf16_batched_logits_match_the_hf_forward(model_type: str) -> None:
    """The fidelity bar on bf16 weights: the batched, padded path against transformers'
    forward of each sequence alone, argmax equal and cosine > 0.9995."""
    tokenizer = build_tokenizer()
    model = tiny_family_model(model_type, tokenizer).to(torch.bfloat16)
    _bf16_rows_match_the_hf_forward(model, [tokenizer.encode(t) for t in PROMPT_TEXTS[1:5]])


def test_bf16_hybrid_batched_logits_match_the_hf_forward(tiny_hybrid: Path) -> None:
    model, tokenizer = load_model(tiny_hybrid)
    model = model.to(torch.bfloat16)
    _bf16_rows_match_the_hf_forward(model, [tokenizer.encode(t) for t in PROMPT_TEXTS[1:5]])
