"""The contract between the engine's scheduler and whatever runs the forward passes.

The scheduler decides *what* to compute each step (which sequences prefill, which decode
together); a runner computes it. The single-device runner drives a transformers model
with a KV cache per sequence; the tensor-parallel runner mirrors every call to its worker
ranks so that all ranks run the same collectives in the same order. Because every call is
deterministic in its inputs, ranks that receive the same calls make the same cache
decisions (prefix reuse included) without talking about them.

All methods run on the device's owner thread (`neuron.device.DeviceWorker`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PrefillResult:
    # Next-token logits after the last prompt token, shape [vocab], float32.
    logits: torch.Tensor
    # Prompt tokens whose KV came from the prefix cache instead of being computed.
    cached_tokens: int


class ModelRunner(Protocol):
    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + generated) the model supports."""
        ...

    def prefill(self, seq_id: int, token_ids: Sequence[int]) -> PrefillResult:
        """Start sequence `seq_id` with its prompt; reuse a cached prefix when one matches."""
        ...

    def prefill_batch(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
        """Start several sequences at once (one result each, in order), as `prefill` would.

        A runner may compute them in one forward; the results must be what `prefill` gives
        up to floating-point rounding. If it raises, none of the sequences exists afterwards.
        """
        ...

    def decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        """Append one token to each sequence in a single batched forward; logits [B, vocab]."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget the sequence and free its KV cache (it may seed the prefix cache first)."""
        ...

    def close(self) -> None:
        """Free all caches and the model's memory."""
        ...
