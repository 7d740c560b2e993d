"""The contract between the engine's scheduler and whatever runs the forward passes.

The scheduler decides *what* to compute each step: which sequences prefill which chunk,
which decode together, and which K/V blocks each one's positions live in
(`engine/blocks.py`). A runner computes it: it holds the weights and the K/V pool's tensors
and nothing per sequence. The single-device runner drives a transformers model; the
tensor-parallel runner mirrors every call to its worker ranks, so that all ranks run the
same collectives in the same order over the same block tables.

All methods run on the device's owner thread (`neuron.device.DeviceWorker`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from neuron.engine.paged import ForwardRow


class ModelRunner(Protocol):
    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + generated) the model's positions support."""
        ...

    @property
    def num_blocks(self) -> int:
        """Blocks in the K/V pool, the null block 0 included."""
        ...

    @property
    def block_size(self) -> int:
        """Positions per K/V block."""
        ...

    @property
    def state_slots(self) -> int:
        """Linear-attention state slots (hybrid models); 0 when the model has no such layers."""
        ...

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: a prompt id must be below it."""
        ...

    def forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
        """Compute each row's new tokens in one forward, writing their K/V into the row's
        blocks; float32 logits [rows, vocab] after each row's last token. Rows of one call
        belong to distinct sequences."""
        ...

    def close(self) -> None:
        """Free the K/V pool and the model's memory."""
        ...
