"""OpenAI's `n` in the engine: n sequences from one prompt, the prompt computed once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from support.engine_harness import PROMPT_TEXTS, collect, load_model, reference_greedy

from cortex_core.config.neuron import EngineConfig
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, TorchEngine
from neuron.engine.api import GenerationRequest, SamplingParams
from neuron.engine.paged import ForwardRow

GREEDY = SamplingParams(temperature=0.0)


class CountingRunner(SingleDeviceRunner):
    """Counts the tokens every forward computed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens = 0

    def forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
        self.tokens += sum(len(row.tokens) for row in rows)
        return super().forward(rows)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_qwen3: Path) -> tuple[Any, Any]:
    return load_model(tiny_qwen3)


def make_engine(model: Any, worker: DeviceWorker, **config: Any) -> tuple[TorchEngine, CountingRunner]:
    runner = CountingRunner(model, device="cpu")
    return TorchEngine(runner, worker=worker, config=EngineConfig(**config), model_id="tiny"), runner


@pytest.mark.parametrize("prefix_caching", [True, False])
async def test_n_greedy_choices_equal_generate_and_compute_the_prompt_once(
    model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker, prefix_caching: bool
) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode(PROMPT_TEXTS[3] + PROMPT_TEXTS[6])
    engine, runner = make_engine(model, worker, prefix_caching=prefix_caching)
    n, new = 4, 9
    try:
        results = await asyncio.gather(
            *(collect(s) for s in engine.generate_choices(GenerationRequest(prompt, new, GREEDY), n))
        )
    finally:
        await engine.close()
    expected, _ = reference_greedy(model, prompt, new, stop_at_eos=False)
    assert [r.tokens for r in results] == [expected] * n
    assert all(r.prompt_tokens == len(prompt) for r in results)
    size = runner.block_size
    assert len(prompt) > 2 * size  # the forks share whole blocks
    tail = len(prompt) - (len(prompt) - 1) // size * size
    # The prompt once, each fork's tail (at most a block), then one token per decode step.
    assert runner.tokens == len(prompt) + (n - 1) * tail + n * (new - 1)
    assert engine.load().in_flight == 0
    assert engine.load().kv_blocks_used == 0


async def test_each_choice_samples_with_its_own_seed(
    model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker
) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode(PROMPT_TEXTS[1])
    sampling = SamplingParams(temperature=1.5, seed=11)
    engine, _ = make_engine(model, worker)
    try:
        together = await asyncio.gather(
            *(collect(s) for s in engine.generate_choices(GenerationRequest(prompt, 12, sampling), 3))
        )
        alone = [
            await collect(engine.generate(GenerationRequest(prompt, 12, replace(sampling, seed=11 + i))))
            for i in range(3)
        ]
    finally:
        await engine.close()
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert len({tuple(r.tokens) for r in together}) == 3  # the seeds differ, so do the choices


async def test_forks_without_room_wait_and_still_answer(
    model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker
) -> None:
    """A batch of two: one fork runs beside the first choice, the others queue as sequences of
    their own (their prompt then comes from the prefix cache)."""
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode(PROMPT_TEXTS[5])
    engine, _ = make_engine(model, worker, max_batch_size=2)
    try:
        results = await asyncio.gather(
            *(collect(s) for s in engine.generate_choices(GenerationRequest(prompt, 6, GREEDY), 4))
        )
    finally:
        await engine.close()
    expected, _ = reference_greedy(model, prompt, 6, stop_at_eos=False)
    assert [r.tokens for r in results] == [expected] * 4


async def test_closing_every_choice_early_frees_everything(
    model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker
) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode(PROMPT_TEXTS[2])
    engine, _ = make_engine(model, worker)
    try:
        streams = engine.generate_choices(GenerationRequest(prompt, 50, GREEDY), 3)
        await anext(streams[0])
        for stream in streams:
            await stream.aclose()
        # The next request runs once the cancelled ones are dropped.
        after = await collect(engine.generate(GenerationRequest(prompt, 2, GREEDY)))
    finally:
        await engine.close()
    assert len(after.tokens) == 2
    assert engine.load().kv_blocks_used == 0
