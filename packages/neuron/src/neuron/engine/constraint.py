"""Constrained decoding: which tokens a sequence may take next, applied inside the batched step.

A `GrammarConstraint` wraps one request's llguidance matcher (docs/engine.md, "Structured
outputs"). Each step, before the forward, the scheduler asks every constrained row of the
batch for its allowed-token bitmask; llguidance fills them for all rows at once on its own
threads (the GIL released), so on a GPU the masks are computed while the forward runs. After
the forward `apply_bitmasks` sets the logits of disallowed tokens to -inf on the logits'
device with one copy of the packed masks, and sampling picks among what is left, so
constrained and free sequences share one batch and the free rows are untouched. The chosen
token then advances the matcher.

Reasoning models think before they answer: a constraint built with a `ReasoningGate` leaves
the model free between its reasoning markers and constrains from the token after the close
marker (the first token may open reasoning, or the prompt may already have opened it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from llguidance import LLExecutor

# Bits per word of an llguidance token bitmask (int32 words, token i is bit i % 32 of word i // 32).
_WORD_BITS = 32


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + _WORD_BITS - 1) // _WORD_BITS


@dataclass(frozen=True)
class ReasoningGate:
    """The model's reasoning marker ids; `open_in_prompt`: the prompt ends inside reasoning."""

    open_id: int
    close_id: int
    open_in_prompt: bool = False


# Where a gated constraint is: the first token may open reasoning; reasoning runs
# unconstrained until its close marker; then the grammar holds.
_MAY_OPEN, _REASONING, _CONSTRAINED = "may_open", "reasoning", "constrained"


class GrammarConstraint:
    """One sequence's grammar state. Owned by the owner thread once queued."""

    def __init__(self, matcher: Any, vocab_size: int, gate: ReasoningGate | None = None) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self.gate = gate
        if gate is None:
            self._phase = _CONSTRAINED
        else:
            self._phase = _REASONING if gate.open_in_prompt else _MAY_OPEN

    @property
    def masks(self) -> bool:
        """Whether the next token is constrained (a row in free reasoning needs no mask)."""
        return self._phase != _REASONING

    def allow_reasoning_open(self, bitmask_row: torch.Tensor) -> None:
        """Let the first token open reasoning besides what the grammar allows."""
        if self._phase == _MAY_OPEN and self.gate is not None:
            word, bit = divmod(self.gate.open_id, _WORD_BITS)
            # int32 words: bit 31 is the sign bit, so set it through a signed value.
            value = int(bitmask_row[word]) | (1 << bit)
            bitmask_row[word] = value - (1 << _WORD_BITS) if value >= 1 << (_WORD_BITS - 1) else value

    def accept(self, token: int) -> None:
        """Advance past the chosen token; raises ConstraintViolation if the grammar refuses it."""
        if self.gate is not None and self._phase != _CONSTRAINED:
            if self._phase == _MAY_OPEN and token == self.gate.open_id:
                self._phase = _REASONING
                return
            if self._phase == _REASONING:
                if token == self.gate.close_id:
                    self._phase = _CONSTRAINED
                return
            self._phase = _CONSTRAINED
        if not self.matcher.consume_token(token):
            raise ConstraintViolation(f"the grammar refused token {token}: {self._error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing can follow: the sequence ends here."""
        return self._phase == _CONSTRAINED and bool(self.matcher.is_stopped())

    def fork(self) -> GrammarConstraint:
        """An independent copy in the same state (a sibling sequence of the same prompt)."""
        twin = GrammarConstraint(self.matcher.deep_copy(), self.vocab_size, self.gate)
        twin._phase = self._phase
        return twin

    def _error(self) -> str:
        lines = str(self.matcher.get_error() or "").splitlines()
        return lines[0] if lines else "no detail"


class ConstraintViolation(RuntimeError):
    """A chosen token the grammar does not allow: a bug or an exhausted grammar, never the client's."""


class MaskFiller:
    """Fills the bitmasks of a batch's constrained rows, in parallel on llguidance's threads
    (one executor per scheduler, created at the first constrained step)."""

    def __init__(self) -> None:
        self._executor: Any = None

    def fill(self, constraints: Sequence[GrammarConstraint | None]) -> ConstraintMasks | None:
        """The packed masks of the rows that are constrained this step (None: no row is)."""
        picked = [(row, c) for row, c in enumerate(constraints) if c is not None and c.masks]
        if not picked:
            return None
        widths = {c.words for _, c in picked}
        # One model, one tokenizer: every row's mask has the same width.
        assert len(widths) == 1, f"constraints of different vocabularies in one batch: {widths}"
        width = widths.pop()
        bitmask = torch.empty((len(picked), width), dtype=torch.int32)
        if self._executor is None:
            self._executor = LLExecutor()
        matchers = [(c.matcher, slot) for slot, (_, c) in enumerate(picked)]
        self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), width * 4, len(picked))
        for slot, (_, constraint) in enumerate(picked):
            constraint.allow_reasoning_open(bitmask[slot])
        return ConstraintMasks(rows=[row for row, _ in picked], bitmask=bitmask)


@dataclass(frozen=True)
class ConstraintMasks:
    """Packed allowed-token masks (int32 words, on the host) for some rows of a batch."""

    rows: list[int]
    bitmask: torch.Tensor  # [len(rows), words]


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab_size] bool, on the bitmask's device."""
    shifts = torch.arange(_WORD_BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :vocab_size].bool()


def apply_bitmasks(logits: torch.Tensor, masks: ConstraintMasks) -> torch.Tensor:
    """Disallowed tokens of the masked rows to -inf; [rows, vocab] logits, a new tensor.

    The model's vocabulary may be wider than the tokenizer's (padded embeddings): tokens
    past the mask's width are never allowed for a masked row.
    """
    device = logits.device
    vocab = logits.shape[-1]
    # A fresh host tensor each step: an asynchronous copy cannot see it change.
    allowed = unpack_bitmask(masks.bitmask.to(device, non_blocking=True), vocab)
    if allowed.shape[-1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[-1]), value=False)
    rows = torch.tensor(masks.rows, dtype=torch.long).to(device, non_blocking=True)
    out = logits.clone()
    out[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return out
