"""The batched sampler against its row-by-row reference, step by step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from neuron.engine.api import SamplingParams
from neuron.engine.sampling import SamplerState, next_tokens, sample_row


def draw_both(
    settings: Sequence[SamplingParams], logits_at: Callable[[int], torch.Tensor], steps: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokens of each row drawn by `next_tokens` (batched) and by `sample_row` (row by row)
    over [rows, vocab] logits `logits_at(step)`, each path with its own states from the same
    seeds, recording what it drew."""
    batched = [SamplerState.create(p) for p in settings]
    reference = [SamplerState.create(p) for p in settings]
    for step in range(steps):
        logits = logits_at(step)
        for state, token in zip(batched, next_tokens(logits, batched), strict=True):
            state.record(token)
        for row, state in enumerate(reference):
            state.record(sample_row(logits[row], state))
    return [s.generated for s in batched], [s.generated for s in reference]
