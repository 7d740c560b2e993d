"""The lean Llama decode step: taken for plain Llama models only, and equal to the HF forward."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch
from support.engine_harness import PROMPT_TEXTS, collect, eos_ids, load_model, reference_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from cortex_core.config.neuron import EngineConfig
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, TorchEngine
from neuron.engine.api import GenerationRequest, SamplingParams
from neuron.engine.lean_llama import build_lean_decoder
from neuron.engine.paged import ForwardRow


def test_lean_decoder_is_built_for_llama_and_qwen3_only(
    tiny_llama: Path, tiny_qwen3: Path, tiny_qwen3_moe: Path
) -> None:
    for path in (tiny_llama, tiny_qwen3):
        model, _ = load_model(path)
        decoder, why = build_lean_decoder(model)
        assert decoder is not None, why
    moe, _ = load_model(tiny_qwen3_moe)
    decoder, why = build_lean_decoder(moe)
    assert decoder is None
    assert "Qwen3MoeForCausalLM" in why


def test_runner_logs_why_it_keeps_the_hf_forward(
    tiny_qwen3_moe: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = load_model(tiny_qwen3_moe)
    runner = SingleDeviceRunner(model, device="cpu")
    with caplog.at_level(logging.DEBUG, logger="neuron.engine.hf_runner"):
        runner.prepare()
    assert runner.lean is None
    assert "keeps the transformers forward" in caplog.text and "Qwen3MoeForCausalLM" in caplog.text


def test_lean_decoder_refuses_hooked_or_eager_models(tiny_llama: Path) -> None:
    model, _ = load_model(tiny_llama)
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *_: None)
    assert build_lean_decoder(model)[1] == "the model has forward hooks"
    handle.remove()
    model.config._attn_implementation = "eager"
    decoder, why = build_lean_decoder(model)
    assert decoder is None and "eager" in why


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpoint", ["tiny_llama", "tiny_qwen3"])
def test_lean_logits_equal_hf_forward(
    request: pytest.FixtureRequest, checkpoint: str, dtype: torch.dtype
) -> None:
    """Two runners fed the same calls, one lean and one on the HF forward, through padded
    batches, a membership change and a sequence joining mid-way."""
    path: Path = request.getfixturevalue(checkpoint)
    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS[:4]]
    lean = SingleDeviceRunner(model, device="cpu")
    plain = SingleDeviceRunner(model, device="cpu", lean_decode=False)
    lean.prepare()
    plain.prepare()
    assert lean.lean is not None and plain.lean is None
    if dtype == torch.bfloat16 and lean.packed_linears:
        assert len(lean.lean.layers[0].qkv) == 1, "packed bf16 should use the merged q/k/v matmul"
    # The same ops in the same dtypes: bitwise equal (measured), in fp32 and in bf16.
    tolerance = {"rtol": 0.0, "atol": 0.0}
    # Sequence s owns blocks [1 + 4s, 5 + 4s): room for 64 positions each.
    blocks = {s: list(range(1 + 4 * s, 5 + 4 * s)) for s in range(4)}
    prefill = [ForwardRow(prompts[s], 0, blocks[s]) for s in range(3)]
    for runner in (lean, plain):
        runner.forward(prefill)  # one padded prefill forward on the HF path, for both
    active = {s: (prompts[s][-1], len(prompts[s])) for s in range(3)}
    for step in range(12):
        if step == 4:  # sequence 1 leaves, 3 joins: other rows, other padding
            del active[1]
            for runner in (lean, plain):
                runner.forward([ForwardRow(prompts[3], 0, blocks[3])])
            active[3] = (prompts[3][-1], len(prompts[3]))
        ids = list(active)
        rows = [ForwardRow([active[s][0]], active[s][1], blocks[s]) for s in ids]
        got = lean.forward(rows)
        want = plain.forward(rows)
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, **tolerance)
        for seq_id, token in zip(ids, want.argmax(-1).tolist(), strict=True):
            active[seq_id] = (token, active[seq_id][1] + 1)
    assert lean.lean_steps == 12 and plain.lean_steps == 0


def greedy(prompt: list[int], max_new: int, stops: frozenset[int]) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=prompt,
        max_new_tokens=max_new,
        sampling=SamplingParams(temperature=0.0),
        stop_token_ids=stops,
    )


@pytest.mark.parametrize("checkpoint", ["tiny_llama", "tiny_qwen3"])
async def test_lean_engine_equals_generate_alone_and_eight_batched(
    request: pytest.FixtureRequest, checkpoint: str, worker: DeviceWorker
) -> None:
    model, tokenizer = load_model(request.getfixturevalue(checkpoint))
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS]
    stops = eos_ids(model)
    max_new = [12, 30, 7, 24, 18, 3, 27, 15]
    expected = [reference_greedy(model, p, n) for p, n in zip(prompts, max_new, strict=True)]
    runner = SingleDeviceRunner(model, device="cpu")
    engine = TorchEngine(runner, worker=worker, config=EngineConfig(max_batch_size=8), model_id=checkpoint)
    try:
        alone = await collect(engine.generate(greedy(prompts[1], max_new[1], stops)))
        assert (alone.tokens, alone.finish_reason) == expected[1]
        steps_alone = runner.lean_steps
        assert runner.lean is not None and steps_alone > 0
        results = await asyncio.gather(
            *(collect(engine.generate(greedy(p, n, stops))) for p, n in zip(prompts, max_new, strict=True))
        )
    finally:
        await engine.close()
    assert [(r.tokens, r.finish_reason) for r in results] == expected
    # All eight prefilled in one step and decoded together: far fewer steps than tokens.
    assert runner.lean_steps - steps_alone < sum(len(tokens) for tokens, _ in expected) // 2
