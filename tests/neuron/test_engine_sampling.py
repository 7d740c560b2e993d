"""Sampling functions, table-driven on hand-made logits."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
from support.sampler_reference import draw_both

from neuron.engine.api import SamplingParams
from neuron.engine.sampling import (
    REPEAT_LAST_N,
    SampledToken,
    SamplerState,
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    choose_tokens,
    inverse_cdf,
    is_plain_greedy,
    min_p_filter,
    next_token,
    next_tokens,
    raw_logprobs,
    sample_row,
    sample_tokens,
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
        ([0.4, 0.3, 0.3], 0.5, [0, 1, 2]),  # tied at the nucleus's smallest value: all kept
        ([0.3, 0.3, 0.4], 0.5, [0, 1, 2]),  # whichever comes first in the vocabulary
        ([0.4, 0.3, 0.2, 0.1], 0.7, [0, 1]),
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


@pytest.mark.parametrize(
    ("bias", "expected"),
    [
        (((0, 1.5),), [2.5, 1.0, 1.0]),
        (((2, -100.0), (1, 0.5)), [1.0, 1.5, -99.0]),
        ((), [1.0, 1.0, 1.0]),
    ],
)
def test_logit_bias_adds_to_the_named_tokens(
    bias: tuple[tuple[int, float], ...], expected: list[float]
) -> None:
    assert apply_logit_bias(torch.ones(3), bias).tolist() == pytest.approx(expected)


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
        (SamplingParams(temperature=0.0, logit_bias=((1, 5.0),)), False),
        (SamplingParams(temperature=0.0, logprobs=3), True),  # log-probabilities do not choose
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


@pytest.mark.parametrize(
    ("probs", "uniform", "expected"),
    [
        ([0.0, 0.5, 0.0, 0.5], 0.0, 1),  # the first token of positive probability
        ([0.0, 0.5, 0.0, 0.5], 0.49, 1),
        ([0.0, 0.5, 0.0, 0.5], 0.5, 3),  # the cumulative sum must pass the fraction
        ([0.0, 0.5, 0.0, 0.5], 0.75, 3),
        ([0.5, 0.5, 0.0, 0.0], 1.0 - 2**-53, 1),  # never a trailing zero, however close to 1
        ([0.2, 0.2, 0.0], 0.75, 1),  # unnormalised: a fraction of the row's total
        ([1.0], 0.3, 0),
    ],
)
def test_inverse_cdf_picks_by_cumulative_probability(
    probs: list[float], uniform: float, expected: int
) -> None:
    chosen = inverse_cdf(torch.tensor([probs]), torch.tensor([[uniform]], dtype=torch.float64))
    assert chosen.tolist() == [expected]


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
    SamplingParams(temperature=0.0, logit_bias=((7, 100.0),)),  # greedy forced onto one token
    SamplingParams(temperature=0.0, logit_bias=((3, 2.5), (250, -1.0), (11, 4.0))),
    SamplingParams(temperature=1.0, logit_bias=((5, -100.0), (6, -100.0), (8, 3.0))),
    SamplingParams(
        temperature=0.9,
        top_k=40,
        logit_bias=((1, 1.5), (2, -0.5)),
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
    """`draw_both` over `step_logits`; with `same_logits` every row sees the same logits."""
    rows = len(settings)
    return draw_both(
        settings,
        lambda step: step_logits(step, 1).expand(rows, -1) if same_logits else step_logits(step, rows),
        steps,
    )


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 7])
def test_a_mixed_batch_draws_what_each_row_draws_alone(seed: int) -> None:
    settings = [replace(p, seed=seed + i) for i, p in enumerate(SETTINGS)]
    batched, reference = run_both(settings, steps=40)
    assert batched == reference
    # Not vacuous: the sampled rows did draw different tokens.
    forced = [p.top_k == 1 or any(bias == 100.0 for _, bias in p.logit_bias) for p in settings]
    assert all(len(set(tokens)) > 1 for f, tokens in zip(forced, batched, strict=True) if not f)
    assert all(
        set(tokens) == {7}
        for p, tokens in zip(settings, batched, strict=True)
        if p.logit_bias == ((7, 100.0),)
    )


@pytest.mark.parametrize("params", SETTINGS, ids=repr)
def test_each_setting_batched_equals_row_by_row(params: SamplingParams) -> None:
    settings = [replace(params, seed=seed) for seed in (3, 4, 3)]
    batched, reference = run_both(settings, steps=25, same_logits=True)
    assert batched == reference
    assert batched[0] == batched[2]  # same seed, same tokens, whatever shares the batch


def nucleus_logits(width: int, vocab: int, seed: int) -> torch.Tensor:
    """One row whose nucleus at top_p 0.9 spans about `width` tokens: that many nearly equal
    logits well ahead of the rest of the vocabulary, in random places."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=generator) - 12.0
    ahead = torch.randperm(vocab, generator=generator)[:width]
    logits[ahead] = torch.randn(width, generator=generator) * 0.05
    return logits


@pytest.mark.parametrize(
    "widths",
    [(3, 40), (3, 900), (40, 5000, 3), (5500,)],
    ids=["within-the-first-look", "past-it", "past-the-second", "wider-than-both"],
)
def test_a_nucleus_past_the_partial_sorts_is_found_by_the_full_one(widths: tuple[int, ...]) -> None:
    """On the CPU the batch looks for the nucleus among each row's largest few logits first
    (`_NUCLEUS_WIDTHS`, 256 then 4,096): every way that can end draws what each row draws
    alone, after a full sort."""
    vocab = 6000
    logits = torch.stack([nucleus_logits(width, vocab, seed) for seed, width in enumerate(widths)])
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=30 + i) for i in range(len(widths))]
    batched, reference = draw_both(params, lambda _: logits, 12)
    assert batched == reference
    for row, width in enumerate(widths):
        # Not vacuous: the wide rows drew from far more than the first look's 256 tokens.
        nucleus = set(torch.nonzero(top_p_filter(logits[row], 0.9) > INF).flatten().tolist())
        assert 0.8 * width <= len(nucleus) <= width
        assert set(batched[row]) <= nucleus


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
        # top_p beside top_k only and neither: top_k masks first, then the nucleus of what is left
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


def test_logit_bias_comes_before_the_penalties() -> None:
    # The bias lifts token 2 above token 0; the repetition penalty then divides the biased
    # logit (4.0 / 4 = 1.0 < 1.5), as OpenAI orders them.
    state = SamplerState.create(
        SamplingParams(temperature=0.0, repetition_penalty=4.0, logit_bias=((2, 2.0),))
    )
    logits = torch.tensor([1.5, 0.0, 2.0])
    assert next_token(logits, state) == 2
    state.record(2)
    assert next_token(logits, state) == 0
    assert sample_row(logits, state) == 0


def test_a_bias_of_minus_100_bans_and_plus_100_forces() -> None:
    logits = step_logits(3, 1)[0]
    best = int(torch.argmax(logits))
    banned = SamplerState.create(SamplingParams(temperature=0.0, logit_bias=((best, -100.0),)))
    assert next_token(logits, banned) != best
    forced = SamplerState.create(SamplingParams(temperature=1.0, seed=1, logit_bias=((42, 100.0),)))
    assert {next_token(logits, forced) for _ in range(20)} == {42}


@pytest.mark.parametrize("params", SETTINGS, ids=repr)
def test_raw_logprobs_come_with_the_chosen_tokens(params: SamplingParams) -> None:
    """Every setting, with and without log-probabilities in the same batch: the tokens are
    those `next_tokens` draws, and the log-probabilities are the raw logits' (before bias,
    penalties, temperature), for the rows that asked and of the size each asked."""
    asks = [replace(params, seed=8, logprobs=k) for k in (0, 5, None, 20)]
    plain = [replace(p, logprobs=None) for p in asks]
    with_logprobs = [SamplerState.create(p) for p in asks]
    without = [SamplerState.create(p) for p in plain]
    for step in range(6):
        logits = step_logits(step, len(asks))
        sampled = sample_tokens(logits, with_logprobs)
        assert [s.token for s in sampled] == next_tokens(logits, without)
        for row, (state, got) in enumerate(zip(with_logprobs, sampled, strict=True)):
            state.record(got.token)
            without[row].record(got.token)
            k = state.params.logprobs
            if k is None:
                assert got == SampledToken(got.token)
                continue
            logprob, top = raw_logprobs(logits[row], got.token, k)
            assert got.logprob == pytest.approx(logprob, abs=1e-6)
            assert got.top_logprobs is not None
            assert len(got.top_logprobs) == k
            # The logits have ties, which topk may order either way: compare values, and
            # each alternative's value with its own token's.
            values = [value for _, value in got.top_logprobs]
            assert values == pytest.approx([value for _, value in top], abs=1e-6)
            assert values == sorted(values, reverse=True)
            exact = torch.log_softmax(logits[row], dim=-1)
            for token, value in got.top_logprobs:
                assert value == pytest.approx(float(exact[token]), abs=1e-6)
            assert len({token for token, _ in got.top_logprobs}) == k


def test_raw_logprobs_are_log_softmax_of_the_logits() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    logprob, top = raw_logprobs(logits, 2, 2)
    expected = torch.log_softmax(logits, dim=-1)
    assert logprob == pytest.approx(float(expected[2]))
    assert [token for token, _ in top] == [0, 1]
    assert math.isclose(sum(math.exp(v) for v in expected.tolist()), 1.0, rel_tol=1e-6)
