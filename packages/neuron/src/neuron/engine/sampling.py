"""Choosing the next token from logits: pure torch functions, one request's parameters at a time.

Order (as transformers' logits processors): penalties → temperature → top_k → top_p →
min_p → draw. Each request draws from its own seeded `torch.Generator` on the CPU, so a seed
gives the same tokens whichever requests share its batch and whatever device ran the model.
Temperature <= 0 is greedy (argmax after penalties).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from neuron.engine.api import SamplingParams

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
    """Nucleus: the smallest set of most likely tokens whose probability reaches p."""
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # A token is dropped when the tokens before it already reach p; the first one always stays.
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


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
    )


@dataclass
class SamplerState:
    """One sequence's sampling parameters, random stream and generated history."""

    params: SamplingParams
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    counts: Counter[int] = field(default_factory=Counter)

    @classmethod
    def create(cls, params: SamplingParams) -> SamplerState:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        return cls(params=params, generator=generator)

    def record(self, token_id: int) -> None:
        self.generated.append(token_id)
        self.counts[token_id] += 1


def next_token(logits: torch.Tensor, state: SamplerState) -> int:
    """The next token of one sequence from its [vocab] logits."""
    params = state.params
    logits = logits.detach().to("cpu", torch.float32)
    logits = apply_repetition_penalty(logits, state.generated[-REPEAT_LAST_N:], params.repetition_penalty)
    logits = apply_presence_frequency(logits, state.counts, params.presence_penalty, params.frequency_penalty)
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=state.generator))


def next_tokens(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[int]:
    """The next token of each row of [batch, vocab] logits; plain greedy rows share one argmax."""
    greedy = [is_plain_greedy(s.params) for s in states]
    argmax: list[int] = torch.argmax(logits, dim=-1).tolist() if any(greedy) else []
    return [argmax[i] if greedy[i] else next_token(logits[i], s) for i, s in enumerate(states)]
