"""The engine on a CUDA GPU: greedy parity with generate(), bf16 logits against the HF
forward, an unload that gives the memory back (engine alone, and load -> generate -> unload
-> load through the manager, with memory figures after each phase), the batched sampler
against row by row and its synchronisations, a profile of one decode step (kernels, copies,
synchronisations), and a forced out-of-memory step followed by a normal request. Run by
`nox -s gpu_check` on a GPU host; skipped where torch sees no CUDA device."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from support.engine_harness import PROMPT_TEXTS, collect, eos_ids
from support.local_models import neuron_config

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


def cuda_memory(label: str) -> dict[str, int]:
    """This process's allocator figures and the device's free memory, printed for the GPU check's log."""
    free, total = torch.cuda.mem_get_info(CUDA)
    figures = {
        "allocated": torch.cuda.memory_allocated(CUDA),
        "reserved": torch.cuda.memory_reserved(CUDA),
        "device_free": free,
    }
    print(
        f"{label:<28} "
        + "  ".join(f"{k} {v / 2**20:9.1f} MiB" for k, v in figures.items())
        + f"  of {total / 2**20:.0f} MiB"
    )
    return figures


async def test_load_generate_unload_load_through_the_manager_gives_the_memory_back(tiny_qwen3: Path) -> None:
    """The whole lifecycle on GPU 0 as the daemon runs it (real NVML, the device's owner
    thread, the engine's pool sized from free memory), with memory figures after each phase."""
    from cortex_core.neuron_api import ModelSpec
    from neuron.discovery import HostProbe
    from neuron.manager import ModelManager

    gc.collect()
    torch.cuda.empty_cache()
    baseline = cuda_memory("baseline")
    probe = HostProbe.open()
    assert probe.gpu_indices, probe.cuda_unavailable_reason
    manager = ModelManager(neuron_config(engine=SMALL_POOL), probe)
    model_id = str(tiny_qwen3)
    try:
        for round_ in (1, 2):
            await manager.load(ModelSpec(model_id=model_id, devices=[0]))
            loaded = cuda_memory(f"round {round_}: loaded")
            assert loaded["allocated"] > baseline["allocated"]
            model = manager.get(model_id)
            prompt = model.tokenizer.encode(PROMPT_TEXTS[1])
            sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=round_)
            result = await collect(model.engine.generate(GenerationRequest(prompt, 16, sampled)))
            assert len(result.tokens) >= 1
            cuda_memory(f"round {round_}: generated")
            del model
            await manager.unload(model_id)
            after = cuda_memory(f"round {round_}: unloaded")
            assert after["allocated"] - baseline["allocated"] < 1 << 20
            # release_memory emptied the cache: the reserved blocks went back to the driver.
            assert after["reserved"] - baseline["reserved"] < 32 << 20
    finally:
        await manager.close()
        probe.close()


def test_the_batched_sampler_on_cuda_draws_like_row_by_row_and_syncs_once() -> None:
    from support.sampler_reference import draw_both
    from torch.profiler import ProfilerActivity, profile

    from neuron.engine.sampling import SamplerState, next_tokens

    logits = torch.randn(8, 151_936, device=CUDA, generator=torch.Generator(CUDA).manual_seed(0)) * 4
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=i, repetition_penalty=1.1 if i % 2 else 1.0)
        for i in range(8)
    ]
    batched, reference = draw_both(params, lambda _: logits, 5)
    assert batched == reference
    again = [SamplerState.create(p) for p in params]
    assert next_tokens(logits, again) == [tokens[0] for tokens in batched]  # same seed, same tokens

    torch.cuda.synchronize(CUDA)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        next_tokens(logits, again)
    names = [event.name for event in prof.events()]
    syncs = sum(name in ("cudaStreamSynchronize", "cudaDeviceSynchronize") for name in names)
    kernels = sum(event.device_type == torch.autograd.DeviceType.CUDA for event in prof.events())
    print(f"sampler, 8 rows x 151936: {kernels} device events, {syncs} synchronisations")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    assert syncs <= 1  # the copy of the chosen ids back


def test_profile_one_decode_step_of_eight(tiny_qwen3: Path) -> None:
    """Kernels and synchronisations of one decode step (forward + sampling) for 8 rows: the
    figures the paged-kernel work starts from. Printed; only the sampler's share is asserted above."""
    from torch.profiler import ProfilerActivity, profile

    from neuron.engine.sampling import SamplerState, next_tokens

    model, tokenizer = load_on_cuda(tiny_qwen3, torch.bfloat16)
    runner = SingleDeviceRunner(model, device=CUDA, kv_cache_bytes=64 << 20)
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS]
    tables = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(8)]
    first = runner.forward([ForwardRow(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
    states = [SamplerState.create(SamplingParams(temperature=0.8, top_p=0.9, seed=i)) for i in range(8)]
    tokens = next_tokens(first, states)
    rows = [ForwardRow([tok], len(p), t) for tok, p, t in zip(tokens, prompts, tables, strict=True)]
    torch.cuda.synchronize(CUDA)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        next_tokens(runner.forward(rows), states)
    events = list(prof.events())
    syncs = sum(e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize") for e in events)
    copies = sum(e.name in ("cudaMemcpyAsync", "cudaMemcpy") for e in events)
    kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    print(
        f"one decode step of 8 (lean={runner.lean is not None}): {kernels} device events, {copies} copies, {syncs} synchronisations"
    )
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    assert kernels > 0


async def test_an_out_of_memory_step_fails_its_request_only_and_the_next_one_runs(
    tiny_qwen3: Path, worker: DeviceWorker
) -> None:
    """A forced OOM (a forward that asks for more than the device has) fails that request,
    does not fault the engine (the allocator recovers), releases what the failed step held,
    and a normal request runs after it."""
    from neuron.engine import TorchEngine

    class RunsOutOnSeven(SingleDeviceRunner):
        def forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
            if any(7 in row.tokens for row in rows):
                free, _ = torch.cuda.mem_get_info(CUDA)
                torch.empty(free + (1 << 30), dtype=torch.uint8, device=CUDA)
            return super().forward(rows)

    model, tokenizer = load_on_cuda(tiny_qwen3, torch.bfloat16)
    engine = TorchEngine(
        RunsOutOnSeven(model, device=CUDA, kv_cache_bytes=64 << 20), worker=worker, model_id="tiny"
    )
    prompt = tokenizer.encode(PROMPT_TEXTS[1])
    try:
        await collect(engine.generate(GenerationRequest(prompt, 4, SamplingParams(temperature=0.0))))
        before = cuda_memory("before the OOM")
        with pytest.raises(torch.OutOfMemoryError):
            await collect(
                engine.generate(GenerationRequest([7, *prompt], 4, SamplingParams(temperature=0.0)))
            )
        assert engine.fault is None
        assert engine.load().kv_blocks_used == 0  # the failed request's blocks went back
        after = await collect(engine.generate(GenerationRequest(prompt, 4, SamplingParams(temperature=0.0))))
        assert len(after.tokens) == 4
        assert cuda_memory("after the OOM and a request")["allocated"] - before["allocated"] < 1 << 20
    finally:
        await engine.close()
