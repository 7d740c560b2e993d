"""Log-probabilities and logit_bias through the engine, against transformers' own forward."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support.engine_harness import HANG_GUARD_SECS, PROMPT_TEXTS, load_model, reference_greedy

from cortex_core.config.neuron import EngineConfig
from cortex_core.errors import ApiError
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, TorchEngine
from neuron.engine.api import GenerationRequest, SamplingParams, TokenEvent


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama: Path) -> tuple[Any, Any]:
    return load_model(tiny_llama)


@pytest.fixture
async def engine(model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker) -> AsyncIterator[TorchEngine]:
    model, _ = model_and_tokenizer
    engine = TorchEngine(
        SingleDeviceRunner(model, device="cpu"), worker=worker, config=EngineConfig(), model_id="tiny"
    )
    yield engine
    await engine.close()


async def events_of(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    async def run() -> list[TokenEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(run(), HANG_GUARD_SECS)


def hf_logprobs(model: Any, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position that chose a generated token."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)], dim=-1)


@pytest.mark.parametrize(
    ("sampling", "ask"),
    [(SamplingParams(temperature=0.0), 5), (SamplingParams(temperature=1.3, top_k=30, seed=4), 20)],
    ids=["greedy", "sampled"],
)
async def test_logprobs_are_log_softmax_of_the_models_logits(
    model_and_tokenizer: tuple[Any, Any], engine: TorchEngine, sampling: SamplingParams, ask: int
) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS[:3]]
    # Three at once, beside a sequence that did not ask (its rows must not disturb theirs).
    asking = [
        engine.generate(
            GenerationRequest(prompt, 12, sampling=SamplingParams(**{**vars(sampling), "logprobs": ask}))
        )
        for prompt in prompts
    ]
    quiet = engine.generate(GenerationRequest(prompts[0], 12, sampling=sampling))
    results = await asyncio.gather(*(events_of(s) for s in [*asking, quiet]))
    for prompt, events in zip(prompts, results[:3], strict=True):
        tokens = [e.token_id for e in events if e.token_id is not None]
        assert len(tokens) == 12
        expected = hf_logprobs(model, prompt, tokens)
        for i, event in enumerate(events):
            assert event.logprob is not None and event.top_logprobs is not None
            assert event.logprob == pytest.approx(float(expected[i, tokens[i]]), abs=1e-4)
            assert len(event.top_logprobs) == ask
            values = [value for _, value in event.top_logprobs]
            assert values == sorted(values, reverse=True)
            assert values == pytest.approx(torch.topk(expected[i], ask).values.tolist(), abs=1e-4)
            for token, value in event.top_logprobs:
                assert value == pytest.approx(float(expected[i, token]), abs=1e-4)
    assert all(e.logprob is None and e.top_logprobs is None for e in results[3])


async def test_logprobs_are_raw_whatever_the_bias(
    model_and_tokenizer: tuple[Any, Any], engine: TorchEngine
) -> None:
    """A bias that forces a token changes what is chosen, not what the model thought of it."""
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode(PROMPT_TEXTS[1])
    forced = 42
    sampling = SamplingParams(temperature=0.0, logit_bias=((forced, 100.0),), logprobs=2)
    events = await events_of(engine.generate(GenerationRequest(prompt, 4, sampling=sampling)))
    assert [e.token_id for e in events] == [forced] * 4
    expected = hf_logprobs(model, prompt, [forced] * 4)
    for i, event in enumerate(events):
        assert event.logprob == pytest.approx(float(expected[i, forced]), abs=1e-4)
        assert event.logprob is not None and event.logprob < float(expected[i].max())


async def test_a_bias_steers_greedy_output_away_from_the_reference(
    model_and_tokenizer: tuple[Any, Any], engine: TorchEngine
) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode(PROMPT_TEXTS[2])
    reference, _ = reference_greedy(model, prompt, 6, stop_at_eos=False)
    banned = reference[0]
    sampling = SamplingParams(temperature=0.0, logit_bias=((banned, -100.0),))
    events = await events_of(engine.generate(GenerationRequest(prompt, 6, sampling=sampling)))
    tokens = [e.token_id for e in events if e.token_id is not None]
    assert banned not in tokens
    assert tokens[0] == int(hf_logprobs(model, prompt, [banned])[0].topk(2).indices[1])


async def test_a_bias_outside_the_vocabulary_is_a_400(engine: TorchEngine) -> None:
    vocab = engine.runner.vocab_size
    sampling = SamplingParams(logit_bias=((vocab, 1.0),))
    with pytest.raises(ApiError) as caught:
        engine.generate(GenerationRequest([1, 2], 2, sampling=sampling))
    assert caught.value.status == 400
    assert caught.value.param == "logit_bias"
