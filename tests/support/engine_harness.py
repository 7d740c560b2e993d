"""Helpers for the engine tests: tiny models, transformers' greedy reference, stream collection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Hang guard only (never a speed assertion): a broken scheduler fails instead of blocking CI.
HANG_GUARD_SECS = 120.0

PROMPT_TEXTS = [
    "Hello",
    "The capital of France is",
    "def add(a, b):\n    return",
    "The quick brown fox jumps over the lazy dog while the sea waves roll in. The quick",
    '{"name": "get_weather", "arguments": {"city": "Zürich"',
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: < > & ' \" { } [ ] ( ). Numbers:",
    "Think step by step: first we read, then we reason, then we answer. Think step",
    "Émilie a visité Zürich et São Paulo; 東京 と 北京 も訪れました。🙂 Hello, how are you today?",
]


def load_model(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def eos_ids(model: Any) -> frozenset[int]:
    eos = model.generation_config.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else (eos or []))


def reference_greedy(
    model: Any, prompt: Sequence[int], max_new_tokens: int, *, stop_at_eos: bool = True
) -> tuple[list[int], str]:
    """transformers' greedy generate(): the tokens without the EOS, and the finish reason."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            torch.tensor([list(prompt)]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            # An empty list (not None, which means "the model's default") disables stopping.
            eos_token_id=sorted(eos_ids(model)) if stop_at_eos else [],
        )
    tokens = out[0, len(prompt) :].tolist()
    stops = eos_ids(model) if stop_at_eos else frozenset()
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i], "stop"
    return tokens, "length"


@dataclass
class Collected:
    tokens: list[int]
    finish_reason: str | None
    cached_tokens: int
    prompt_tokens: int
    completion_tokens: int
    events: int


async def collect(stream: AsyncIterator[Any]) -> Collected:
    async def run() -> Collected:
        tokens: list[int] = []
        last = None
        count = 0
        async for event in stream:
            count += 1
            last = event
            if event.token_id is not None:
                tokens.append(event.token_id)
        assert last is not None, "the stream ended without any event"
        return Collected(
            tokens, last.finish_reason, last.cached_tokens, last.prompt_tokens, last.completion_tokens, count
        )

    return await asyncio.wait_for(run(), HANG_GUARD_SECS)


def greedy_forward(runner: Any, prompt: Sequence[int], steps: int, blocks: Sequence[int]) -> list[int]:
    """Greedy tokens through a bare runner: the prompt in one forward, then one token a
    forward, all in `blocks` (which must cover the prompt plus `steps` positions)."""
    from neuron.engine.paged import ForwardRow

    logits = runner.forward([ForwardRow(list(prompt), 0, blocks)])
    tokens = [int(logits[0].argmax())]
    for position in range(len(prompt), len(prompt) + steps):
        logits = runner.forward([ForwardRow([tokens[-1]], position, blocks)])
        tokens.append(int(logits[0].argmax()))
    return tokens


def runner_with_blocks(model: Any, usable_blocks: int, block_size: int = 16, **kwargs: Any) -> Any:
    """A SingleDeviceRunner whose K/V pool holds exactly `usable_blocks` blocks (plus the null one)."""
    import torch

    from neuron.engine import SingleDeviceRunner
    from neuron.engine.hf_runner import kv_geometry
    from neuron.engine.paged import KVPool

    layers, kv_heads, head_dim = kv_geometry(model.config)
    dtype: torch.dtype = next(model.parameters()).dtype
    per_block = KVPool.bytes_per_block(
        layers=layers, block_size=block_size, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype
    )
    runner = SingleDeviceRunner(
        model, device="cpu", kv_cache_bytes=usable_blocks * per_block, kv_block_size=block_size, **kwargs
    )
    assert runner.num_blocks == usable_blocks + 1
    return runner


def run_with_preemptions(
    runner: Any, requests: Sequence[Any], *, max_batch_size: int
) -> tuple[list[list[int]], int]:
    """Runs `requests` (GenerationRequests) through a scheduler on this thread until every
    one has finished: each one's tokens, and how many preemptions that took (a test gives
    `runner` a pool too small for the batch, see runner_with_blocks)."""
    from neuron.engine.sampling import SamplerState
    from neuron.engine.scheduler import Scheduler, SeqState

    scheduler = Scheduler(
        runner, max_batch_size=max_batch_size, prefill_budget_tokens=64, on_finished=lambda s: None
    )
    sinks = [_ListSink() for _ in requests]
    scheduler.incoming.extend(
        SeqState(i, request, sink, SamplerState.create(request.sampling), request.max_new_tokens)
        for i, (request, sink) in enumerate(zip(requests, sinks, strict=True))
    )
    while scheduler.has_work():
        scheduler.step(lambda: None)
    return [[e.token_id for e in sink if e.token_id is not None] for sink in sinks], scheduler.preemptions


class _ListSink(list[Any]):
    """What the scheduler puts a sequence's events (or its error) into."""

    def put(self, item: Any) -> None:
        self.append(item)


def prefill_and_decode_rows(
    runner: Any, prompts: Sequence[list[int]], images: Sequence[Any] | None = None
) -> list[tuple[int, Any, list[int]]]:
    """Every prompt prefilled in one batched forward, then one decode step each (its
    prefill's argmax) in another, each sequence in blocks (and on a hybrid model a state
    slot) of its own, with its `images` if given. Per row, sequence by sequence, prefill
    then decode: (sequence index, logits, the tokens they follow), for a comparison with
    transformers' forward of that sequence alone."""
    from neuron.engine.paged import ForwardRow

    hybrid = runner.state_slots > 0
    blocks = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(prompts))]
    pictures = list(images) if images is not None else [None] * len(prompts)

    def row(i: int, tokens: list[int], start: int) -> ForwardRow:
        return ForwardRow(tokens, start, blocks[i], i if hybrid else -1, pictures[i])

    prefill = runner.forward([row(i, p, 0) for i, p in enumerate(prompts)])
    firsts = [int(logits.argmax()) for logits in prefill]
    decode = runner.forward(
        [row(i, [t], len(p)) for i, (p, t) in enumerate(zip(prompts, firsts, strict=True))]
    )
    rows: list[tuple[int, Any, list[int]]] = []
    for i, prompt in enumerate(prompts):
        rows += [(i, prefill[i], prompt), (i, decode[i], [*prompt, firsts[i]])]
    return rows


def bf16_top_agrees(ours: Any, reference: Any) -> bool:
    """Our argmax is the reference's, or one of its top two when those are within bf16's
    resolution of each other (then either token is the model's answer)."""
    import math

    import torch

    top = reference.topk(2)
    first = float(top.values[0])
    ulp = float(torch.finfo(torch.bfloat16).eps) * 2.0 ** math.floor(math.log2(abs(first) or 1.0))
    if first - float(top.values[1]) > 2 * ulp:
        return int(ours.argmax()) == int(top.indices[0])
    return int(ours.argmax()) in top.indices.tolist()
