"""The engine on a CUDA GPU: greedy parity with generate(), bf16 logits against the HF
forward, and an unload that gives the memory back. Run by `nox -s gpu_check` on a GPU host;
skipped where torch sees no CUDA device."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from support.engine_harness import PROMPT_TEXTS, collect, eos_ids

from cortex_core.config.neuron import EngineConfig
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, build_engine
from neuron.engine.api import GenerationRequest, SamplingParams
from neuron.engine.paged import ForwardRow

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nox -s gpu_check)"),
]

CUDA = torch.device("cuda:0")
# Small pools: the tests measure what the engine frees, not how much it can hold.
SMALL_POOL = EngineConfig(max_batch_size=8, kv_cache_max_gib=0.25)


@pytest.fixture(scope="module")
def worker() -> Iterator[DeviceWorker]:
    w = DeviceWorker("cuda-test")
    yield w
    w.close()


def load_on_cuda(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(CUDA).eval()
    return model, AutoTokenizer.from_pretrained(path)


def generate_greedy(model: Any, prompt: Sequence[int], max_new: int) -> list[int]:
    """transformers' greedy generate() on the model's device, cut at the first EOS."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([list(prompt)], device=CUDA),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=CUDA),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=sorted(eos_ids(model)),
        )
    tokens: list[int] = out[0, len(prompt) :].tolist()
    stops = eos_ids(model)
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


@pytest.mark.parametrize("checkpoint", ["tiny_qwen3", "tiny_llama"])
async def test_greedy_equals_generate_alone_and_batched(
    request: pytest.FixtureRequest, checkpoint: str, worker: DeviceWorker
) -> None:
    model, tokenizer = load_on_cuda(request.getfixturevalue(checkpoint), torch.float32)
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS]
    budgets = [12, 30, 7, 24, 18, 3, 27, 15]
    expected = [generate_greedy(model, p, n) for p, n in zip(prompts, budgets, strict=True)]
    engine = build_engine(model, worker=worker, engine_config=SMALL_POOL, model_id=checkpoint)
    stops = eos_ids(model)
    try:
        results = await asyncio.gather(
            *(
                collect(engine.generate(GenerationRequest(p, n, SamplingParams(temperature=0.0), stops)))
                for p, n in zip(prompts, budgets, strict=True)
            )
        )
    finally:
        await engine.close()
    assert [r.tokens for r in results] == expected


@pytest.mark.parametrize("checkpoint", ["tiny_qwen3", "tiny_llama"])
def test_bf16_logits_match_the_hf_forward(request: pytest.FixtureRequest, checkpoint: str) -> None:
    """CUDA kernels are not bitwise stable across shapes: argmax equal, cosine > 0.9995."""
    model, tokenizer = load_on_cuda(request.getfixturevalue(checkpoint), torch.bfloat16)
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS[:4]]
    runner = SingleDeviceRunner(model, device=CUDA, kv_cache_bytes=64 << 20)
    rows = [ForwardRow(p, 0, list(range(1 + 4 * i, 5 + 4 * i))) for i, p in enumerate(prompts)]
    got = runner.forward(rows)
    decoded = runner.forward(
        [ForwardRow([7], len(p), row.blocks) for p, row in zip(prompts, rows, strict=True)]
    )
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            for ours, tokens in ((got[i], prompt), (decoded[i], [*prompt, 7])):
                reference = model(input_ids=torch.tensor([tokens], device=CUDA)).logits[0, -1].float()
                assert int(ours.argmax()) == int(reference.argmax())
                assert float(torch.nn.functional.cosine_similarity(ours, reference, dim=0)) > 0.9995


async def test_close_gives_the_memory_back(tiny_qwen3: Path, worker: DeviceWorker) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(CUDA)

    async def serve_once() -> int:
        model, tokenizer = load_on_cuda(tiny_qwen3, torch.bfloat16)
        engine = build_engine(model, worker=worker, engine_config=SMALL_POOL, model_id="tiny")
        del model
        prompt = tokenizer.encode(PROMPT_TEXTS[1])
        await collect(engine.generate(GenerationRequest(prompt, 8, SamplingParams(temperature=0.0))))
        held = torch.cuda.memory_allocated(CUDA)
        await engine.close()
        return held

    held = await serve_once()
    gc.collect()
    torch.cuda.empty_cache()
    after = torch.cuda.memory_allocated(CUDA)
    print(f"CUDA memory allocated: before {before} B, serving {held} B, after close {after} B")
    assert held > before
    assert after - before < 1 << 20
