"""Vision-language models in the paged engine: greedy output equals transformers' generate()
with the same pixels, alone and batched with text requests, through chunked prefill that
cuts images apart; the prefix cache keys image blocks by their pixels."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support.engine_harness import (
    collect,
    eos_ids,
    prefill_and_decode_rows,
    reference_greedy,
    run_with_preemptions,
    runner_with_blocks,
)
from support.vision import picture, reference_vision_greedy

from cortex_core.config.neuron import EngineConfig
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, TorchEngine
from neuron.engine.api import GenerationRequest, SamplingParams
from neuron.vision.inputs import ImageInput
from neuron.vision.prepare import ImageLimits, ImagePreparer

GREEDY = SamplingParams(temperature=0.0)
LIMITS = ImageLimits(max_pixels=1 << 20, max_source_pixels=1 << 24, max_images=8)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# Long enough that the text before the image fills whole K/V blocks of 16.
PREAMBLE = "The quick brown fox jumps over the lazy dog while the sea waves roll in. "


def load(path: Path) -> tuple[Any, Any, ImagePreparer]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return (
        model,
        AutoTokenizer.from_pretrained(path),
        ImagePreparer.from_checkpoint(path, model.config, LIMITS),
    )


def chat(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
    return ids


def with_images(
    preparer: ImagePreparer, tokenizer: Any, text: str, seeds: list[tuple[int, int, int]]
) -> ImageInput:
    pictures = [picture(seed, width, height) for seed, width, height in seeds]
    _, images = preparer.attach(chat(tokenizer, text), pictures, "tiny")
    return images


def image_request(images: ImageInput, max_new: int, stops: frozenset[int]) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=list(images.prompt_ids),
        max_new_tokens=max_new,
        sampling=GREEDY,
        stop_token_ids=stops,
        images=images,
    )


async def test_images_equal_generate_alone_and_batched_with_text(
    tiny_vision: Path, worker: DeviceWorker
) -> None:
    model, tokenizer, preparer = load(tiny_vision)
    stops = eos_ids(model)
    one = with_images(preparer, tokenizer, f"{IMAGE}Describe this picture.", [(1, 90, 70)])
    two = with_images(
        preparer, tokenizer, f"Compare {IMAGE} and {IMAGE} please.", [(2, 130, 60), (3, 64, 100)]
    )
    texts = [chat(tokenizer, "Hello, how are you today?"), chat(tokenizer, "The capital of France is")]
    expected_images = [reference_vision_greedy(model, images, 14, stops) for images in (one, two)]
    expected_texts = [reference_greedy(model, prompt, 14) for prompt in texts]
    runner = SingleDeviceRunner(model, device="cpu", max_batch_size=4)
    # Chunks of 8 tokens: images (6-16 placeholder tokens each) are cut across chunks.
    engine = TorchEngine(
        runner, worker=worker, config=EngineConfig(max_batch_size=4, prefill_chunk_tokens=8), model_id="v"
    )
    try:
        alone = await collect(engine.generate(image_request(one, 14, stops)))
        batched = await asyncio.gather(
            collect(engine.generate(image_request(two, 14, stops))),
            *(collect(engine.generate(GenerationRequest(p, 14, GREEDY, stops))) for p in texts),
            collect(engine.generate(image_request(one, 14, stops))),
        )
    finally:
        await engine.close()
    assert (alone.tokens, alone.finish_reason) == expected_images[0]
    got = [(r.tokens, r.finish_reason) for r in batched]
    assert got == [expected_images[1], *expected_texts, expected_images[0]]
    # usage counts every placeholder token (one per merged patch) in the prompt.
    assert batched[0].prompt_tokens == len(two.prompt_ids) > len(chat(tokenizer, "Compare  and  please.")) + 6
    assert two.placeholder_counts() == [int(t * h * w) // 4 for t, h, w in two.grid_thw.tolist()]
    # Each ImageInput went through the vision tower once, however many chunks, decode
    # steps and sequences (`one` served two) used it.
    assert runner.image_encodings == 2


async def test_prefix_cache_never_shares_kv_between_different_pictures(
    tiny_vision: Path, worker: DeviceWorker
) -> None:
    """Same text, same placeholder count, different pixels: the blocks from the image on
    are recomputed (and the answer is that picture's); the same picture again reuses them."""
    model, tokenizer, preparer = load(tiny_vision)
    stops = eos_ids(model)
    prompt = f"{PREAMBLE}{IMAGE}What is shown?"
    first = with_images(preparer, tokenizer, prompt, [(10, 90, 70)])
    other = with_images(preparer, tokenizer, prompt, [(11, 90, 70)])
    assert first.prompt_ids == other.prompt_ids and first.digests != other.digests
    image_at = first.prompt_ids.index(first.token_id)
    runner = SingleDeviceRunner(model, device="cpu", max_batch_size=2)
    engine = TorchEngine(runner, worker=worker, config=EngineConfig(max_batch_size=2), model_id="v")
    try:
        a = await collect(engine.generate(image_request(first, 10, stops)))
        b = await collect(engine.generate(image_request(other, 10, stops)))
        again = await collect(engine.generate(image_request(first, 10, stops)))
    finally:
        await engine.close()
    assert (b.tokens, b.finish_reason) == reference_vision_greedy(model, other, 10, stops)
    assert again.tokens == a.tokens
    if runner.state_slots:
        # A hybrid model (Qwen3.5) reuses no prefix at all (docs/engine.md).
        assert (b.cached_tokens, again.cached_tokens) == (0, 0)
    else:
        assert 0 < b.cached_tokens <= image_at  # the text before the picture only
        assert again.cached_tokens > image_at  # the picture's own blocks too


@pytest.mark.parametrize("chunk", [1, 5])
async def test_an_image_split_over_tiny_chunks_gives_the_same_tokens(
    tiny_vision: Path, worker: DeviceWorker, chunk: int
) -> None:
    model, tokenizer, preparer = load(tiny_vision)
    stops = eos_ids(model)
    images = with_images(preparer, tokenizer, f"{IMAGE}Describe.", [(4, 100, 80)])
    runner = SingleDeviceRunner(model, device="cpu", max_batch_size=2)
    engine = TorchEngine(runner, worker=worker, config=EngineConfig(prefill_chunk_tokens=chunk), model_id="v")
    try:
        got = await collect(engine.generate(image_request(images, 8, stops)))
    finally:
        await engine.close()
    assert (got.tokens, got.finish_reason) == reference_vision_greedy(model, images, 8, stops)


def test_bf16_batched_image_logits_match_the_hf_forward(tiny_vision: Path) -> None:
    """The fidelity bar on bf16 weights (packed CPU linears included): image and text rows
    prefilled and decoded together against transformers' forward of each sequence alone
    (with its pixels), argmax equal and cosine > 0.9995."""
    import torch
    from support.engine_harness import bf16_top_agrees

    model, tokenizer, preparer = load(tiny_vision)
    model = model.to(torch.bfloat16)
    inputs = [
        with_images(preparer, tokenizer, f"{IMAGE}Describe this picture.", [(1, 90, 70)]),
        with_images(
            preparer, tokenizer, f"Compare {IMAGE} and {IMAGE} please.", [(2, 130, 60), (3, 64, 100)]
        ),
        None,
    ]
    prompts = [
        list(i.prompt_ids) if i is not None else chat(tokenizer, "The capital of France is") for i in inputs
    ]
    rows = prefill_and_decode_rows(SingleDeviceRunner(model, device="cpu", max_batch_size=4), prompts, inputs)
    with torch.inference_mode():
        for i, ours, tokens in rows:
            ids = torch.tensor([tokens])
            images = inputs[i]
            extra = {}
            if images is not None:
                extra = {
                    "pixel_values": images.pixel_values,
                    "image_grid_thw": images.grid_thw,
                    "mm_token_type_ids": (ids == images.token_id).int(),
                }
            reference = model(input_ids=ids, **extra).logits[0, -1].float()
            assert float(torch.nn.functional.cosine_similarity(ours, reference, dim=0)) > 0.9995
            assert bf16_top_agrees(ours, reference)


def test_preempted_image_sequences_recompute_with_their_pictures(tiny_vision: Path) -> None:
    """A pool too small for the batch: a preempted image sequence is readmitted, recomputes
    prompt and generated tokens with the same image features and positions, and its output
    equals generate()'s."""
    model, tokenizer, preparer = load(tiny_vision)
    inputs = [
        with_images(preparer, tokenizer, f"{IMAGE}Describe this picture in detail.", [(seed, 90, 70)])
        for seed in (21, 22)
    ]
    # 8 blocks of 16 positions: two ~50-token prompts are admitted together, but not both
    # can grow by 40 tokens.
    runner = runner_with_blocks(model, 8, max_batch_size=2)
    outputs, preemptions = run_with_preemptions(
        runner, [image_request(images, 40, frozenset()) for images in inputs], max_batch_size=2
    )
    assert preemptions > 0
    for tokens, images in zip(outputs, inputs, strict=True):
        assert tokens == reference_vision_greedy(model, images, 40, frozenset())[0]
