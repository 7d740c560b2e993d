"""Choosing the next token from logits: pure torch functions.

Order (as transformers' logits processors, with a structured request's grammar mask and
OpenAI's logit_bias first): mask → logit_bias → penalties → temperature → top_k → top_p →
min_p → draw. Temperature <= 0 is greedy (argmax after mask, bias and penalties).

Log-probabilities (`SamplingParams.logprobs`) are the log_softmax of the model's raw logits,
before any of those stages (vLLM's default `raw_logprobs`): what the model thinks of the
token, whatever the request did to choose it. `sample_tokens` computes them on the device
for the rows that asked (their top alternatives from one `topk`) and brings them back in the
same copy as the chosen ids.

`next_tokens` is what the scheduler calls: the whole batch in a handful of tensor ops on
the logits' own device, the rows' parameters gathered into one small tensor (one
host-to-device copy, no synchronisation), and one copy of the chosen ids back. A per-row
path would synchronise with the device once per row and sort the vocabulary on the CPU.

top_p keeps every token at least as likely as the least likely token of the nucleus (the
fewest most likely tokens whose probability reaches p): tokens tied with it are all kept,
as top_k keeps ties at its k-th value, so the cut never depends on a sort's order. The
nucleus is usually a few hundred tokens of a vocabulary of 50-150 thousand, so where
sorting is slow (the CPU) the batch looks for it among each row's largest few
probabilities (`torch.topk`, a partial sort) and sorts everything only when some row's
nucleus is wider.

The draw inverts the cumulative distribution over the vocabulary in token order at one
uniform number per row, taken from the request's own seeded host generator: one number a
step instead of a noise tensor the size of the vocabulary, and a seed gives the same tokens
whichever requests share its batch. Running sums over the vocabulary are float64: a
kernel's summation order may change with the batch's shape, and in float64 the difference
is far too small to move the nucleus's edge or a draw by a token.

`sample_row` is the same definition one row at a time, written with the plain filters
below: the reference the batched path is tested against.
"""

from __future__ import annotations

import random
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from neuron.engine.api import SamplingParams
from neuron.engine.constraint import ConstraintMasks, GrammarConstraint, apply_bitmasks

# The repetition penalty looks at this many of the latest generated tokens (the reference's
# `repeat_last_n` default); the prompt is excluded.
REPEAT_LAST_N = 64


def apply_repetition_penalty(logits: torch.Tensor, recent: Sequence[int], penalty: float) -> torch.Tensor:
    """Make recently generated tokens less likely: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """OpenAI's logit_bias: each (token id, bias) is added to that token's logit."""
    if not bias:
        return logits
    ids = torch.tensor([token for token, _ in bias], dtype=torch.long, device=logits.device)
    values = torch.tensor([value for _, value in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, values)


def apply_presence_frequency(
    logits: torch.Tensor, counts: Counter[int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: logit -= frequency * count + presence * (count > 0)."""
    if (presence == 0.0 and frequency == 0.0) or not counts:
        return logits
    ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
    amounts = torch.tensor([float(c) for c in counts.values()], dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out[ids] -= frequency * amounts + presence
    return out


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (ties at the k-th value kept too); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the tokens at least as likely as the least likely of the fewest most
    likely tokens whose probability reaches p (ties with it kept); p outside (0, 1) keeps all."""
    if p <= 0.0 or p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    descending = torch.sort(probs, dim=-1, descending=True).values
    # p as the batch's parameter table holds it (float32).
    floor, _ = nucleus_floor(descending, float(torch.tensor(p, dtype=torch.float32)))
    return logits.masked_fill(probs < floor, float("-inf"))


def nucleus_floor(descending: torch.Tensor, p: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From each row's largest probabilities in descending order (all of them or the first
    few): the smallest probability in its nucleus, and whether the nucleus ended among the
    values given (if not, it may go on past them). The running sum is float64: in float32 its
    rounding could move the nucleus's edge by a token."""
    # A token is out when the tokens before it already reach p; the first one always stays.
    before = descending.cumsum(dim=-1, dtype=torch.float64) - descending
    inside = (before < p).sum(dim=-1, keepdim=True)
    return descending.gather(-1, inside - 1), inside < descending.shape[-1]


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely one's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def is_plain_greedy(params: SamplingParams) -> bool:
    """Argmax of the raw logits: the batch can take it in one call."""
    return (
        params.temperature <= 0.0
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and not params.logit_bias
    )


@dataclass
class SamplerState:
    """One sequence's sampling parameters, random stream and generated history."""

    params: SamplingParams
    seed: int
    # Structured output: the grammar that masks this sequence's logits (None: free).
    constraint: GrammarConstraint | None = None
    generated: list[int] = field(default_factory=list)
    counts: Counter[int] = field(default_factory=Counter)
    # The request's random stream: one uniform number per sampled token, drawn on the host
    # (the same stream whatever device the logits are on).
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    @classmethod
    def create(cls, params: SamplingParams, constraint: GrammarConstraint | None = None) -> SamplerState:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return cls(params=params, seed=seed, constraint=constraint)

    def uniform(self) -> float:
        """The next number of the request's stream, in [0, 1): what one draw inverts."""
        return self._random.random()

    def record(self, token_id: int) -> None:
        self.generated.append(token_id)
        self.counts[token_id] += 1


def sample_row(logits: torch.Tensor, state: SamplerState) -> int:
    """The next token of one sequence from its [vocab] logits, one filter at a time: the
    definition `next_tokens` computes for a whole batch (and what it is tested against)."""
    params = state.params
    logits = logits.detach().float()
    logits = apply_logit_bias(logits, params.logit_bias)
    logits = apply_repetition_penalty(logits, state.generated[-REPEAT_LAST_N:], params.repetition_penalty)
    logits = apply_presence_frequency(logits, state.counts, params.presence_penalty, params.frequency_penalty)
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    draw = torch.tensor([[state.uniform()]], dtype=torch.float64, device=logits.device)
    return int(inverse_cdf(torch.softmax(logits, dim=-1)[None], draw)[0])


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Each row's token of [rows, vocab] probabilities at its uniform number in [0, 1)
    ([rows, 1] float64): the first token, in vocabulary order, whose cumulative probability
    (summed in float64) passes that fraction of the row's total. Only a token of positive
    probability can be chosen: the sum must grow at the token chosen."""
    cumulative = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cumulative[:, -1:]
    # Strictly below the total, even where the product rounds up to it.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, target, right=True).squeeze(-1)


# Columns of the per-row parameter table that `next_tokens` copies to the device in one go.
_TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _PRESENCE, _FREQUENCY, _SAMPLED = range(7)


@dataclass(frozen=True)
class _BatchPlan:
    """What the host knows about a batch before touching the logits: which stages any row
    needs (a stage no row needs costs nothing) and the per-row tensors, built on the CPU."""

    table: torch.Tensor  # [rows, 7] float32, columns above
    sampled_rows: list[int]
    bias: tuple[torch.Tensor, torch.Tensor] | None  # ids [rows, n], bias [rows, n]
    repetition: tuple[torch.Tensor, torch.Tensor] | None  # ids [rows, n], penalty [rows, 1]
    presence: tuple[torch.Tensor, torch.Tensor] | None  # ids [rows, n], counts [rows, n]
    # Each sampled row's next number of its random stream (0 for a greedy row): [rows, 1] float64.
    uniform: torch.Tensor
    # The largest top_k of a row that has one (0: no row has), whether a row has top_p or min_p.
    top_k: int
    needs_top_p: bool
    needs_min_p: bool

    @classmethod
    def build(cls, states: Sequence[SamplerState], vocab: int) -> _BatchPlan:
        table = []
        for state in states:
            p = state.params
            sampled = p.temperature > 0.0
            table.append(
                [
                    p.temperature if sampled else 1.0,
                    # Off is the whole vocabulary (the k-th value is the smallest: nothing below it).
                    float(p.top_k if 0 < p.top_k < vocab else vocab),
                    p.top_p if 0.0 < p.top_p < 1.0 else float("inf"),
                    max(p.min_p, 0.0),
                    p.presence_penalty,
                    p.frequency_penalty,
                    1.0 if sampled else 0.0,
                ]
            )
        sampled_rows = [i for i, s in enumerate(states) if s.params.temperature > 0.0]
        return cls(
            table=torch.tensor(table, dtype=torch.float32),
            sampled_rows=sampled_rows,
            bias=_logit_bias(states),
            repetition=_repetition_ids(states),
            presence=_presence_counts(states),
            uniform=torch.tensor(
                [[s.uniform() if s.params.temperature > 0.0 else 0.0] for s in states], dtype=torch.float64
            ),
            top_k=max((k for i in sampled_rows if 0 < (k := states[i].params.top_k) < vocab), default=0),
            needs_top_p=any(0.0 < states[i].params.top_p < 1.0 for i in sampled_rows),
            needs_min_p=any(states[i].params.min_p > 0.0 for i in sampled_rows),
        )


def _logit_bias(states: Sequence[SamplerState]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's biased token ids and their biases, padded with bias 0 on token 0 (adding
    zero leaves a logit as it was)."""
    rows = [s.params.logit_bias for s in states]
    width = max(map(len, rows), default=0)
    if width == 0:
        return None
    ids = [[token for token, _ in row] + [0] * (width - len(row)) for row in rows]
    bias = [[value for _, value in row] + [0.0] * (width - len(row)) for row in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(bias, dtype=torch.float32)


def _repetition_ids(states: Sequence[SamplerState]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's distinct recent tokens and its penalty. Rows are padded by repeating one of
    their tokens (a repeated index gets the same value again, so the scatter is deterministic);
    a row with nothing to penalise gets token 0 and penalty 1.0, which leaves it unchanged."""
    rows = [
        sorted(set(s.generated[-REPEAT_LAST_N:])) if s.params.repetition_penalty != 1.0 else []
        for s in states
    ]
    width = max(map(len, rows), default=0)
    if width == 0:
        return None
    ids = [row + [row[0] if row else 0] * (width - len(row)) for row in rows]
    penalty = [[s.params.repetition_penalty if row else 1.0] for s, row in zip(states, rows, strict=True)]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(penalty, dtype=torch.float32)


def _presence_counts(states: Sequence[SamplerState]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's generated tokens and their counts, padded with count 0 (subtracting zero
    from any logit leaves it as it was)."""
    rows = [
        list(s.counts.items())
        if s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0
        else []
        for s in states
    ]
    width = max(map(len, rows), default=0)
    if width == 0:
        return None
    ids = [[token for token, _ in row] + [0] * (width - len(row)) for row in rows]
    counts = [[float(count) for _, count in row] + [0.0] * (width - len(row)) for row in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(counts, dtype=torch.float32)


def choose_tokens(
    logits: torch.Tensor, states: Sequence[SamplerState], masks: ConstraintMasks | None = None
) -> torch.Tensor:
    """The next token of each row of [rows, vocab] logits as a [rows] tensor on their device,
    without waiting for the device. `masks`: the constrained rows' allowed tokens, applied
    first (a disallowed token stays impossible whatever the penalties do)."""
    if masks is not None:
        logits = apply_bitmasks(logits, masks)
    if all(is_plain_greedy(s.params) for s in states):
        return torch.argmax(logits, dim=-1)
    device = logits.device
    plan = _BatchPlan.build(states, logits.shape[-1])
    # non_blocking: small host tensors; the device reads them in stream order, the host goes on.
    table = plan.table.to(device, non_blocking=True)
    logits = logits.detach().float()
    if plan.bias is not None:
        ids, bias = (t.to(device, non_blocking=True) for t in plan.bias)
        logits = logits.scatter_add(1, ids, bias)
    if plan.repetition is not None:
        ids, penalty = (t.to(device, non_blocking=True) for t in plan.repetition)
        picked = logits.gather(1, ids)
        logits = logits.scatter(1, ids, torch.where(picked > 0, picked / penalty, picked * penalty))
    if plan.presence is not None:
        ids, counts = (t.to(device, non_blocking=True) for t in plan.presence)
        present = (counts > 0).float()
        amount = (
            table[:, _FREQUENCY : _FREQUENCY + 1] * counts + table[:, _PRESENCE : _PRESENCE + 1] * present
        )
        logits = logits.scatter_add(1, ids, -amount)
    greedy = torch.argmax(logits, dim=-1)
    if not plan.sampled_rows:
        return greedy
    # A fresh tensor: the filters below write into it.
    logits = logits / table[:, _TEMPERATURE : _TEMPERATURE + 1]
    if plan.top_k:
        # The k-th value from a partial sort of the largest k only: far cheaper than sorting
        # the whole vocabulary.
        kth = _kth(torch.topk(logits, plan.top_k, dim=-1).values, table, logits.shape[-1])
        logits.masked_fill_(logits < kth, float("-inf"))
    if plan.needs_top_p:
        _top_p_(logits, table, partial_first=device.type == "cpu")
    if plan.needs_min_p:
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * table[:, _MIN_P : _MIN_P + 1]
        logits.masked_fill_(probs < threshold, float("-inf"))
    drawn = inverse_cdf(torch.softmax(logits, dim=-1), plan.uniform.to(device, non_blocking=True))
    return torch.where(table[:, _SAMPLED] > 0, drawn, greedy)


def _kth(descending: torch.Tensor, table: torch.Tensor, vocab: int) -> torch.Tensor:
    """Each row's k-th largest value from its largest values in descending order; -inf for a
    row without top_k, which keeps everything."""
    k = table[:, _TOP_K : _TOP_K + 1].long()
    kth = descending.gather(1, k.clamp(max=descending.shape[-1]) - 1)
    return torch.where(k < vocab, kth, torch.full_like(kth, float("-inf")))


# Where sorting is slow, the widths of each row's largest probabilities in which the nucleus is
# looked for before the whole vocabulary is sorted: a partial sort of the first costs a
# few percent of a full one, and the nucleus of a model's answer rarely goes past it.
_NUCLEUS_WIDTHS = (256, 4096)


def _top_p_(logits: torch.Tensor, table: torch.Tensor, *, partial_first: bool) -> None:
    """top_p in place for every row that has it (`top_p_filter`'s definition). With
    `partial_first`, the nucleus is looked for among the largest `_NUCLEUS_WIDTHS`
    probabilities before a full sort (each width costs one look at the device's answer, so a
    GPU, whose sort is fast, goes straight to it)."""
    p = table[:, _TOP_P : _TOP_P + 1].double()
    has_top_p = torch.isfinite(p)
    probs = torch.softmax(logits, dim=-1)
    floor = _nucleus_floors(probs, p, has_top_p, partial_first=partial_first)
    # A row without top_p keeps everything: its floor is 0, and no probability is below it.
    logits.masked_fill_(probs < torch.where(has_top_p, floor, torch.zeros_like(floor)), float("-inf"))


def _nucleus_floors(
    probs: torch.Tensor, p: torch.Tensor, has_top_p: torch.Tensor, *, partial_first: bool
) -> torch.Tensor:
    """Each row's nucleus floor: from the narrowest partial sort in which every row with
    top_p finds its nucleus's end, else from a full sort."""
    widths = [width for width in _NUCLEUS_WIDTHS if width < probs.shape[-1]] if partial_first else []
    for width in widths:
        floor, ended = nucleus_floor(torch.topk(probs, width, dim=-1).values, p)
        if bool((ended | ~has_top_p).all()):
            return floor
    floor, _ = nucleus_floor(torch.sort(probs, dim=-1, descending=True).values, p)
    return floor


def next_tokens(
    logits: torch.Tensor, states: Sequence[SamplerState], masks: ConstraintMasks | None = None
) -> list[int]:
    """The next token of each row of [rows, vocab] logits: one copy back to the host."""
    chosen: list[int] = choose_tokens(logits, states, masks).tolist()
    return chosen


def next_token(logits: torch.Tensor, state: SamplerState, masks: ConstraintMasks | None = None) -> int:
    """The next token of one sequence from its [vocab] logits (`masks`: its own, as row 0)."""
    return next_tokens(logits[None], [state], masks)[0]


@dataclass(frozen=True)
class SampledToken:
    """A chosen token, with its raw log-probability and top alternatives when the row asked."""

    token: int
    logprob: float | None = None
    # (token id, log-probability), most likely first; () when the row asked for none.
    top_logprobs: tuple[tuple[int, float], ...] | None = None


def sample_tokens(
    logits: torch.Tensor, states: Sequence[SamplerState], masks: ConstraintMasks | None = None
) -> list[SampledToken]:
    """`next_tokens`, plus the raw log-probabilities of the rows that asked for them: computed
    on the logits' device for those rows only (the alternatives of all of them from one
    `topk` of the largest k asked) and copied back in the same transfer as the chosen ids,
    so asking costs no extra synchronisation. They are the model's, before any mask."""
    asking = [row for row, state in enumerate(states) if state.params.logprobs is not None]
    if not asking:
        return [SampledToken(token) for token in next_tokens(logits, states, masks)]
    rows = torch.tensor(asking, dtype=torch.long).to(logits.device, non_blocking=True)
    # Before choosing: the sampler's later stages may write into tensors made from the logits.
    logprobs = torch.log_softmax(logits.detach().float().index_select(0, rows), dim=-1)
    chosen = choose_tokens(logits, states, masks)
    parts = [chosen.double(), logprobs.gather(1, chosen.index_select(0, rows)[:, None]).double().flatten()]
    k = min(max(states[row].params.logprobs or 0 for row in asking), logprobs.shape[-1])
    if k:
        top = torch.topk(logprobs, k, dim=-1)
        # Ids as float64 are exact (any vocabulary is far below 2**53): one tensor, one copy.
        parts += [top.values.double().flatten(), top.indices.double().flatten()]
    host: list[float] = torch.cat(parts).tolist()
    # In the order packed: every row's chosen id; each asking row's chosen value; their top
    # values (k a row); their top ids (k a row).
    rows_n, asking_n = len(states), len(asking)
    tokens = [int(token) for token in host[:rows_n]]
    picked = host[rows_n : rows_n + asking_n]
    values = host[rows_n + asking_n : rows_n + asking_n + asking_n * k]
    ids = host[rows_n + asking_n + asking_n * k :]
    out = [SampledToken(token) for token in tokens]
    for i, row in enumerate(asking):
        wanted = min(states[row].params.logprobs or 0, k)
        top_logprobs = tuple((int(ids[i * k + j]), values[i * k + j]) for j in range(wanted))
        out[row] = SampledToken(tokens[row], picked[i], top_logprobs)
    return out


def raw_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """One row's log-probability of `token` and its k most likely alternatives, from its
    [vocab] raw logits: the definition `sample_tokens` computes for a batch."""
    logprobs = torch.log_softmax(logits.detach().float(), dim=-1)
    top = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    alternatives = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return float(logprobs[token]), alternatives
