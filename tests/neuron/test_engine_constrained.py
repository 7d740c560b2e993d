"""Constrained decoding in the batched engine: masks, the reasoning gate, and batch isolation.

The model is a tiny random-weight Qwen3 whose free output is gibberish, so a constrained
answer that parses was made to parse by the grammar, not by the model.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support.engine_harness import PROMPT_TEXTS, collect, eos_ids, load_model

from cortex_core.config.neuron import EngineConfig
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, TorchEngine
from neuron.engine.api import GenerationRequest, SamplingParams
from neuron.engine.constraint import (
    ConstraintMasks,
    ConstraintViolation,
    GrammarConstraint,
    ReasoningGate,
    apply_bitmasks,
    unpack_bitmask,
)
from neuron.serving.structured import GrammarCompiler, _json_rule

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, seed=7)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def person_grammar() -> str:
    return f"start: answer\nanswer: {_json_rule(PERSON)}"


def valid_person(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"name", "age", "tags"}
        and isinstance(value["name"], str)
        and len(value["name"]) <= 12
        and isinstance(value["age"], int)
        and 0 <= value["age"] <= 150
        and all(tag in ("a", "b", "c") for tag in value["tags"])
    )


# --- pure pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "vocab", "allowed"),
    [
        ([0b1], 5, [0]),
        ([0b10110], 5, [1, 2, 4]),
        ([-1, 0b1], 40, list(range(33))),
        ([-(2**31)], 32, [31]),  # the sign bit is token 31
        ([0, 0], 64, []),
    ],
)
def test_unpack_bitmask(words: list[int], vocab: int, allowed: list[int]) -> None:
    mask = unpack_bitmask(torch.tensor([words], dtype=torch.int32), vocab)
    assert mask.shape == (1, vocab)
    assert mask[0].nonzero().flatten().tolist() == allowed


def test_apply_bitmasks_touches_only_masked_rows_and_pads_wider_vocabularies() -> None:
    logits = torch.arange(3 * 40, dtype=torch.float32).reshape(3, 40)
    masks = ConstraintMasks(rows=[1], bitmask=torch.tensor([[0b101]], dtype=torch.int32))
    out = apply_bitmasks(logits, masks)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [0, 2]
    assert torch.equal(logits, torch.arange(3 * 40, dtype=torch.float32).reshape(3, 40))  # not in place


class _Matcher:
    """Records consumed tokens; refuses token 99; stops after `stop_after` tokens."""

    def __init__(self, stop_after: int = 100) -> None:
        self.consumed: list[int] = []
        self.stop_after = stop_after

    def consume_token(self, token: int) -> bool:
        if token == 99:
            return False
        self.consumed.append(token)
        return True

    def is_stopped(self) -> bool:
        return len(self.consumed) >= self.stop_after

    def get_error(self) -> str:
        return "token 99 is never allowed\nmore detail"

    def deep_copy(self) -> _Matcher:
        twin = _Matcher(self.stop_after)
        twin.consumed = list(self.consumed)
        return twin


@pytest.mark.parametrize(
    ("open_in_prompt", "tokens", "consumed", "masks_after"),
    [
        # No reasoning: every token goes to the grammar.
        (False, [5, 6], [5, 6], True),
        # Opens reasoning, thinks freely, closes: only what follows the close is constrained.
        (False, [1, 7, 8, 2, 5], [5], True),
        (False, [1, 7, 8], [], False),
        # The prompt opened reasoning already.
        (True, [7, 2, 5], [5], True),
        (True, [7], [], False),
        # The open marker later is just a token for the grammar.
        (False, [5, 1], [5, 1], True),
    ],
)
def test_reasoning_gate_phases(
    open_in_prompt: bool, tokens: list[int], consumed: list[int], masks_after: bool
) -> None:
    matcher = _Matcher()
    constraint = GrammarConstraint(matcher, 64, ReasoningGate(1, 2, open_in_prompt=open_in_prompt))
    for token in tokens:
        constraint.accept(token)
    assert matcher.consumed == consumed
    assert constraint.masks is masks_after


def test_gate_lets_only_the_first_token_open_reasoning() -> None:
    constraint = GrammarConstraint(_Matcher(), 64, ReasoningGate(open_id=33, close_id=2))
    row = torch.zeros(2, dtype=torch.int32)
    constraint.allow_reasoning_open(row)
    assert unpack_bitmask(row[None], 64)[0].nonzero().flatten().tolist() == [33]
    constraint.accept(5)
    row = torch.zeros(2, dtype=torch.int32)
    constraint.allow_reasoning_open(row)
    assert not row.any()


def test_a_refused_token_and_fork() -> None:
    constraint = GrammarConstraint(_Matcher(stop_after=2), 64)
    constraint.accept(4)
    twin = constraint.fork()
    twin.accept(5)
    assert twin.finished and not constraint.finished
    with pytest.raises(ConstraintViolation, match=r"token 99 is never allowed$"):
        constraint.accept(99)


# --- the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_qwen3: Path) -> tuple[Any, Any]:
    return load_model(tiny_qwen3)


@pytest.fixture(scope="module")
def compiler(model_and_tokenizer: tuple[Any, Any]) -> GrammarCompiler:
    model, tokenizer = model_and_tokenizer
    return GrammarCompiler("tiny", tokenizer, eos_ids(model))


def request(
    prompt: list[int], model: Any, constraint: GrammarConstraint | None, sampling: SamplingParams
) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=prompt,
        max_new_tokens=120,
        sampling=sampling,
        stop_token_ids=eos_ids(model),
        constraint=constraint,
    )


async def test_constrained_answers_parse_and_free_neighbours_are_unchanged(
    model_and_tokenizer: tuple[Any, Any], compiler: GrammarCompiler, worker: DeviceWorker
) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS]
    engine = TorchEngine(
        SingleDeviceRunner(model, device="cpu"),
        worker=worker,
        config=EngineConfig(max_batch_size=16),
        model_id="tiny",
    )
    try:
        alone = [await collect(engine.generate(request(p, model, None, GREEDY))) for p in prompts[:4]]
        free = [engine.generate(request(p, model, None, GREEDY)) for p in prompts[:4]]
        constrained = [
            engine.generate(
                request(p, model, compiler.constraint(person_grammar(), "response_format", None), sampling)
            )
            for p in prompts
            for sampling in (GREEDY, SAMPLED)
        ]
        results = await asyncio.gather(*(collect(s) for s in [*free, *constrained]))
    finally:
        await engine.close()
    batched_free, answers = results[:4], results[4:]
    assert [r.tokens for r in batched_free] == [r.tokens for r in alone]
    for answer in answers:
        text = tokenizer.decode(answer.tokens)
        assert answer.finish_reason == "stop", text
        assert valid_person(text), text


async def test_the_gate_leaves_reasoning_free_then_constrains(
    model_and_tokenizer: tuple[Any, Any], compiler: GrammarCompiler, worker: DeviceWorker
) -> None:
    """The prompt has opened reasoning; the "close marker" is a token the free greedy answer
    produces a few steps in, so the run is deterministic: free tokens up to it, then JSON."""
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode(PROMPT_TEXTS[1])
    engine = TorchEngine(SingleDeviceRunner(model, device="cpu"), worker=worker, model_id="tiny")
    try:
        free = await collect(engine.generate(request(prompt, model, None, GREEDY)))
        close_at = next(i for i in range(2, len(free.tokens)) if free.tokens[i] not in free.tokens[:i])
        gate = ReasoningGate(open_id=-1, close_id=free.tokens[close_at], open_in_prompt=True)
        constraint = compiler.constraint(person_grammar(), "response_format", gate)
        gated = await collect(engine.generate(request(prompt, model, constraint, GREEDY)))
    finally:
        await engine.close()
    assert gated.tokens[: close_at + 1] == free.tokens[: close_at + 1]
    answer = tokenizer.decode(gated.tokens[close_at + 1 :])
    assert gated.finish_reason == "stop" and valid_person(answer), answer
