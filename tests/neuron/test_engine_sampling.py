"""Sampling functions, table-driven on hand-made logits."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from neuron.engine.api import SamplingParams
from neuron.engine.sampling import (
    REPEAT_LAST_N,
    SamplerState,
    apply_presence_frequency,
    apply_repetition_penalty,
    choose_tokens,
    is_plain_greedy,
    min_p_filter,
    next_token,
    next_tokens,
    sample_row,
    top_k_filter,
    top_p_filter,
)

INF = float("-inf")


def probs_of(logits: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(logits, dtype=torch.float32))


def kept(logits: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(logits.tolist()) if v != INF]


@pytest.mark.parametrize(
    ("logits", "k", "expected"),
    [
        ([1.0, 3.0, 2.0, 0.0], 0, [0, 1, 2, 3]),  # off
        ([1.0, 3.0, 2.0, 0.0], 1, [1]),
        ([1.0, 3.0, 2.0, 0.0], 2, [1, 2]),
        ([1.0, 3.0, 2.0, 0.0], 4, [0, 1, 2, 3]),
        ([1.0, 3.0, 2.0, 0.0], 9, [0, 1, 2, 3]),  # more than the vocabulary
        ([2.0, 2.0, 1.0, 0.0], 1, [0, 1]),  # a tie at the k-th value keeps both
    ],
)
def test_top_k(logits: list[float], k: int, expected: list[int]) -> None:
    assert kept(top_k_filter(torch.tensor(logits), k)) == expected


@pytest.mark.parametrize(
    ("probs", "p", "expected"),
    [
        ([0.5, 0.3, 0.15, 0.05], 1.0, [0, 1, 2, 3]),  # off
        ([0.5, 0.3, 0.15, 0.05], 0.0, [0, 1, 2, 3]),  # off
        ([0.5, 0.3, 0.15, 0.05], 0.5, [0]),  # the first token already reaches p
        ([0.5, 0.3, 0.15, 0.05], 0.6, [0, 1]),
        ([0.5, 0.3, 0.15, 0.05], 0.9, [0, 1, 2]),
        ([0.05, 0.15, 0.3, 0.5], 0.6, [2, 3]),  # order of the vocabulary does not matter
        ([0.9, 0.05, 0.05], 0.1, [0]),  # the most likely token always stays
    ],
)
def test_top_p(probs: list[float], p: float, expected: list[int]) -> None:
    assert kept(top_p_filter(probs_of(probs), p)) == expected


@pytest.mark.parametrize(
    ("probs", "min_p", "expected"),
    [
        ([0.5, 0.3, 0.15, 0.05], 0.0, [0, 1, 2, 3]),  # off
        ([0.5, 0.3, 0.15, 0.05], 0.2, [0, 1, 2]),  # threshold 0.1
        ([0.5, 0.3, 0.15, 0.05], 0.5, [0, 1]),  # threshold 0.25
        ([0.5, 0.3, 0.15, 0.05], 1.0, [0]),
    ],
)
def test_min_p(probs: list[float], min_p: float, expected: list[int]) -> None:
    assert kept(min_p_filter(probs_of(probs), min_p)) == expected


@pytest.mark.parametrize(
    ("logits", "recent", "penalty", "expected"),
    [
        ([2.0, -2.0, 1.0], [0, 1], 2.0, [1.0, -4.0, 1.0]),  # positive divided, negative multiplied
        ([2.0, -2.0, 1.0], [0, 0, 0], 2.0, [1.0, -2.0, 1.0]),  # once per distinct token
        ([2.0, -2.0, 1.0], [], 2.0, [2.0, -2.0, 1.0]),
        ([2.0, -2.0, 1.0], [0, 1, 2], 1.0, [2.0, -2.0, 1.0]),  # off
    ],
)
def test_repetition_penalty(
    logits: list[float], recent: list[int], penalty: float, expected: list[float]
) -> None:
    assert apply_repetition_penalty(torch.tensor(logits), recent, penalty).tolist() == expected


@pytest.mark.parametrize(
    ("counts", "presence", "frequency", "expected"),
    [
        ({0: 3, 2: 1}, 0.5, 0.0, [0.5, 1.0, 0.5]),
        ({0: 3, 2: 1}, 0.0, 0.25, [0.25, 1.0, 0.75]),
        ({0: 3, 2: 1}, 0.5, 0.25, [-0.25, 1.0, 0.25]),
        ({0: 3}, -1.0, 0.0, [2.0, 1.0, 1.0]),  # a negative penalty encourages
        ({}, 0.5, 0.5, [1.0, 1.0, 1.0]),
    ],
)
def test_presence_frequency(
    counts: dict[int, int], presence: float, frequency: float, expected: list[float]
) -> None:
    out = apply_presence_frequency(torch.ones(3), Counter(counts), presence, frequency)
    assert out.tolist() == pytest.approx(expected)


def test_penalties_do_not_modify_their_input() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    apply_repetition_penalty(logits, [0, 1], 2.0)
    apply_presence_frequency(logits, Counter({0: 1}), 1.0, 1.0)
    assert logits.tolist() == [2.0, -2.0, 1.0]


@pytest.mark.parametrize(
    ("params", "plain"),
    [
        (SamplingParams(temperature=0.0), True),
        (SamplingParams(temperature=-1.0), True),
        (SamplingParams(temperature=0.0, repetition_penalty=1.1), False),
        (SamplingParams(temperature=0.0, presence_penalty=0.1), False),
        (SamplingParams(temperature=0.7), False),
    ],
)
def test_plain_greedy(params: SamplingParams, plain: bool) -> None:
    assert is_plain_greedy(params) is plain


def test_greedy_is_argmax_after_penalties() -> None:
    state = SamplerState.create(SamplingParams(temperature=0.0, repetition_penalty=4.0))
    logits = torch.tensor([0.0, 3.0, 2.0])
    assert next_token(logits, state) == 1
    state.record(1)
    assert next_token(logits, state) == 2  # 3.0 / 4 < 2.0


def test_repetition_window_is_the_latest_generated_tokens() -> None:
    state = SamplerState.create(SamplingParams(temperature=0.0, repetition_penalty=100.0))
    state.record(1)
    for _ in range(REPEAT_LAST_N):
        state.record(0)
    # Token 1 left the window: only token 0 is penalised.
    assert next_token(torch.tensor([5.0, 4.0, 0.0]), state) == 1


def test_same_seed_same_draws_and_restrictions_hold() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.5, top_k=5, seed=1234)
    draws = []
    for _ in range(2):
        state = SamplerState.create(params)
        draws.append([next_token(logits, state) for _ in range(40)])
    assert draws[0] == draws[1]
    top5 = set(torch.topk(logits, 5).indices.tolist())
    assert set(draws[0]) <= top5
    assert len(set(draws[0])) > 1  # it did sample


def test_sampled_frequencies_follow_the_distribution() -> None:
    probs = [0.6, 0.3, 0.1]
    state = SamplerState.create(SamplingParams(temperature=1.0, seed=7))
    draws = Counter(next_token(probs_of(probs), state) for _ in range(3000))
    for token, p in enumerate(probs):
        assert math.isclose(draws[token] / 3000, p, abs_tol=0.04)


def test_batch_rows_are_independent_of_their_companions() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    seeded = SamplingParams(temperature=1.0, seed=99)
    alone = next_token(logits[1], SamplerState.create(seeded))
    states = [
        SamplerState.create(SamplingParams(temperature=0.0)),
        SamplerState.create(seeded),
        SamplerState.create(SamplingParams(temperature=2.0, seed=5)),
    ]
    together = next_tokens(logits, states)
    assert together[1] == alone
    assert together[0] == int(torch.argmax(logits[0]))


# Every sampler setting the batched path has a stage for, alone and combined.
SETTINGS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.2, top_k=20, top_p=0.8),
    SamplingParams(temperature=1.5, top_p=1e-6),  # only the most likely token survives
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=1.1, repetition_penalty=0.8),  # < 1 encourages repeats
    SamplingParams(temperature=0.9, presence_penalty=-0.5, frequency_penalty=0.7),
    SamplingParams(
        temperature=0.9,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repetition_penalty=1.2,
        presence_penalty=0.4,
        frequency_penalty=0.2,
    ),
]


def step_logits(step: int, rows: int, vocab: int = 300) -> torch.Tensor:
    """Random logits with ties (one decimal) and a few tokens far ahead, as a model's are."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(step)) * 3
    return (logits * 10).round() / 10


def run_both(
    settings: list[SamplingParams], steps: int, *, same_logits: bool = False
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokens of each row drawn by `next_tokens` (batched) and by `sample_row` (row by row),
    each path with its own states from the same seeds, recording what it drew; with
    `same_logits` every row sees the same logits."""
    batched = [SamplerState.create(p) for p in settings]
    reference = [SamplerState.create(p) for p in settings]
    for step in range(steps):
        logits = (
            step_logits(step, 1).expand(len(settings), -1)
            if same_logits
            else step_logits(step, len(settings))
        )
        for state, token in zip(batched, next_tokens(logits, batched), strict=True):
            state.record(token)
        for row, state in enumerate(reference):
            state.record(sample_row(logits[row], state))
    return [s.generated for s in batched], [s.generated for s in reference]


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 7])
def test_a_mixed_batch_draws_what_each_row_draws_alone(seed: int) -> None:
    settings = [replace(p, seed=seed + i) for i, p in enumerate(SETTINGS)]
    batched, reference = run_both(settings, steps=40)
    assert batched == reference
    # Not vacuous: the sampled rows did draw different tokens.
    assert all(len(set(tokens)) > 1 for p, tokens in zip(settings, batched, strict=True) if p.top_k != 1)


@pytest.mark.parametrize("params", SETTINGS, ids=repr)
def test_each_setting_batched_equals_row_by_row(params: SamplingParams) -> None:
    settings = [replace(params, seed=seed) for seed in (3, 4, 3)]
    batched, reference = run_both(settings, steps=25, same_logits=True)
    assert batched == reference
    assert batched[0] == batched[2]  # same seed, same tokens, whatever shares the batch


def test_the_batched_sampler_answers_on_the_logits_device_without_a_copy_back() -> None:
    logits = step_logits(0, 3)
    states = [SamplerState.create(p) for p in SETTINGS[3:6]]
    chosen = choose_tokens(logits, states)
    assert chosen.device == logits.device
    assert chosen.shape == (3,)
    assert chosen.dtype == torch.long


@pytest.mark.parametrize(
    "batch",
    [
        # top_k of different sizes beside rows without it: the partial-sort path (largest k only)
        [
            SamplingParams(temperature=0.9, top_k=5),
            SamplingParams(temperature=1.0),
            SamplingParams(temperature=0.7, top_k=40),
        ],
        # top_p beside top_k only and neither: the full-sort path
        [
            SamplingParams(temperature=0.9, top_k=5),
            SamplingParams(temperature=1.0, top_p=0.8),
            SamplingParams(temperature=1.3),
        ],
        # greedy rows with penalties among sampled ones
        [
            SamplingParams(temperature=0.0, repetition_penalty=1.5),
            SamplingParams(temperature=1.0, top_k=3, min_p=0.2),
        ],
    ],
    ids=["top-k-only", "top-p-and-top-k", "greedy-among-sampled"],
)
def test_batches_mixing_the_filters_draw_what_each_row_draws_alone(batch: list[SamplingParams]) -> None:
    settings = [replace(p, seed=20 + i) for i, p in enumerate(batch)]
    batched, reference = run_both(settings, steps=30)
    assert batched == reference
