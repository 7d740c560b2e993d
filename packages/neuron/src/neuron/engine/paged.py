"""The K/V pool's tensors and the cache a forward pass sees over them.

Each attention layer's K and V live in one tensor of slots, [blocks * block_size, kv_heads,
head_dim]; `blocks.py` decides which slots belong to which sequence. A forward pass gets a
`ForwardPlan`: the rows it computes (new tokens, the position of the first, the row's block
table), laid out as a left-padded batch whose new tokens are right-aligned in the last `new`
columns and whose earlier positions sit just before them. For every attention layer,
`PagedLayer.update` writes the new K/V into their slots, then gathers each row's positions
into that padded layout for attention (SDPA, through transformers' own attention or the lean
decode step). The gather is scratch for one layer at a time (two buffers, K and V, that
every layer reuses); what persists is the pool, so K/V memory follows the tokens in flight,
and a sequence joining or leaving the batch copies nothing. Padding columns read the null slot (block 0, kept zero) and are masked out.

Hybrid models (Qwen3.5, Qwen3-Next) interleave linear-attention layers (Gated DeltaNet),
whose state is not per position but per sequence: a short window of the convolution's
inputs and a recurrent matrix. `StatePool` keeps one slot of each per running sequence; a
forward gathers its rows' slots (zeros for a row starting at position 0), the layer updates
them in place, and they are scattered back afterwards. Such a layer cannot skip padding
inside the new tokens (padding between the state and the tokens would enter the state), so
the runner gives it only rows with the same number of new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin, LinearAttentionLayer

from neuron.engine.blocks import NULL_BLOCK
from neuron.vision.inputs import ImageInput


@dataclass(frozen=True)
class ForwardRow:
    """One sequence in a forward: compute `tokens` at positions start, start+1, ...; its K/V
    for positions [0, start) is already in `blocks` (which also cover the new positions)."""

    tokens: Sequence[int]
    start: int
    blocks: Sequence[int]
    # The row's linear-attention state slot (hybrid models only; -1: none).
    state: int = -1
    # The sequence's images (vision models only): their features go in at the placeholder
    # positions this row computes, and they set its M-RoPE positions.
    images: ImageInput | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class ForwardPlan:
    """Index tensors shared by every layer of one forward pass."""

    input_ids: torch.Tensor  # [rows, new], left-padded with 0
    position_ids: torch.Tensor  # [rows, new]
    # [rows, width] 1 where a column holds a real position; None when no column is padding.
    padding_mask: torch.Tensor | None
    write_slots: torch.Tensor  # [real new tokens] slot of each, row-major
    # Indices of the real new tokens in the flattened [rows * new] layout; None when all are real.
    real_new: torch.Tensor | None
    read_slots: torch.Tensor  # [rows * width] slot read into each column (padding: the null slot)
    rows: int
    new: int
    width: int
    # Per row: the state slot, and whether it starts from zeros (position 0); None without states.
    state_slots: torch.Tensor | None = None
    fresh: torch.Tensor | None = None

    @classmethod
    def build(cls, rows: Sequence[ForwardRow], block_size: int, device: torch.device) -> ForwardPlan:
        if not rows or any(not row.tokens for row in rows):
            raise ValueError("a forward needs at least one row, each with at least one new token")
        for row in rows:
            if len(row.blocks) * block_size < row.end:
                raise ValueError(
                    f"a row computing positions up to {row.end} holds only {len(row.blocks)} blocks "
                    f"of {block_size}"
                )
            if NULL_BLOCK in row.blocks:
                raise ValueError("block 0 is the null block and never holds a sequence's K/V")
        new = max(len(row.tokens) for row in rows)
        width = max(row.end for row in rows)
        lengths = torch.tensor([row.end for row in rows])
        counts = [len(row.tokens) for row in rows]
        # Columns: row i's position p sits in column width - end_i + p.
        positions = torch.arange(width)[None, :] - (width - lengths)[:, None]
        real = positions >= 0
        tables = torch.zeros(len(rows), max(len(row.blocks) for row in rows), dtype=torch.long)
        for i, row in enumerate(rows):
            tables[i, : len(row.blocks)] = torch.tensor(list(row.blocks))
        clamped = positions.clamp(min=0)
        slots = tables.gather(1, clamped // block_size) * block_size + clamped % block_size
        read_slots = torch.where(real, slots, NULL_BLOCK * block_size)
        # The new tokens are the last `count` real columns of each row.
        write = torch.cat([read_slots[i, width - n :] for i, n in enumerate(counts)])
        input_ids = torch.tensor([[0] * (new - len(row.tokens)) + list(row.tokens) for row in rows])
        starts = torch.tensor([row.start for row in rows])
        offsets = torch.arange(new)[None, :] - (new - torch.tensor(counts))[:, None]
        position_ids = (starts[:, None] + offsets).clamp(min=0)
        state_slots = fresh = None
        if any(row.state >= 0 for row in rows):
            if any(row.state < 0 for row in rows):
                raise ValueError("either every row of a forward has a state slot or none has")
            state_slots = torch.tensor([row.state for row in rows], device=device)
            fresh = torch.tensor([row.start == 0 for row in rows], device=device)
        real_new = None
        if any(n != new for n in counts):
            real_new = torch.cat(
                [torch.arange(i * new + new - n, (i + 1) * new) for i, n in enumerate(counts)]
            )
        return cls(
            input_ids=input_ids.to(device),
            position_ids=position_ids.to(device),
            padding_mask=None if bool(real.all()) else real.to(device=device, dtype=torch.long),
            write_slots=write.to(device),
            real_new=None if real_new is None else real_new.to(device),
            read_slots=read_slots.reshape(-1).to(device),
            rows=len(rows),
            new=new,
            width=width,
            state_slots=state_slots,
            fresh=fresh,
        )


class KVPool:
    """Every attention layer's K and V slots for one model on one device."""

    def __init__(
        self,
        *,
        layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        slots = num_blocks * block_size
        # Uninitialised: a slot is read only after it was written, except the null block's.
        self.keys = [
            torch.empty(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)
        ]
        self.values = [
            torch.empty(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)
        ]
        null = slice(NULL_BLOCK * block_size, (NULL_BLOCK + 1) * block_size)
        for tensor in (*self.keys, *self.values):
            tensor[null].zero_()
        # Slots written, summed over layers: new tokens only, never a copy of stored K/V.
        self.slots_written = 0
        # Where a layer's K and V are gathered for attention, reused by every layer and step:
        # a fresh ~10 MB tensor per layer and step cost more in page faults than the copy
        # itself (measured ~1.9 vs ~0.13 ms per gather for 16 rows of 1,500 positions).
        self._scratch: list[torch.Tensor | None] = [None, None]

    @staticmethod
    def bytes_per_block(
        *, layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def gather(self, source: torch.Tensor, slots: torch.Tensor, which: int) -> torch.Tensor:
        """`source`'s rows at `slots`, into scratch buffer `which` (0: keys, 1: values).

        Valid until the next gather into the same buffer: attention reads a layer's K/V
        before the next layer gathers its own (transformers' layers and the lean step both
        do), so one buffer of each serves every layer.
        """
        count = int(slots.numel())
        row = source[0].numel()
        buffer = self._scratch[which]
        if buffer is None or buffer.numel() < count * row:
            buffer = torch.empty(
                max(count * row, 2 * (0 if buffer is None else buffer.numel())),
                dtype=source.dtype,
                device=source.device,
            )
            self._scratch[which] = buffer
        out = buffer[: count * row].view(count, *source.shape[1:])
        return torch.index_select(source, 0, slots, out=out)

    def layers(self, plan: ForwardPlan) -> list[PagedLayer]:
        return [
            PagedLayer(keys, values, plan, self) for keys, values in zip(self.keys, self.values, strict=True)
        ]


class PagedLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One layer's view of the pool during one forward pass."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, plan: ForwardPlan, pool: KVPool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._pool_keys, self._pool_values = keys, values
        self._plan = plan
        self._owner = pool
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' K/V ([rows, kv_heads, new, head_dim]); return every row's K/V
        in the plan's padded layout, [rows, kv_heads, width, head_dim]."""
        plan = self._plan
        for pool, states in ((self._pool_keys, key_states), (self._pool_values, value_states)):
            rows = states.transpose(1, 2).reshape(plan.rows * plan.new, *pool.shape[1:])
            if plan.real_new is not None:
                rows = rows.index_select(0, plan.real_new)
            pool.index_copy_(0, plan.write_slots, rows.to(pool.dtype))
        self._owner.slots_written += int(plan.write_slots.numel())
        shape = (plan.rows, plan.width, *self._pool_keys.shape[1:])
        keys = self._owner.gather(self._pool_keys, plan.read_slots, 0).view(shape).transpose(1, 2)
        values = self._owner.gather(self._pool_values, plan.read_slots, 1).view(shape).transpose(1, 2)
        self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._plan.width, 0

    def get_seq_length(self) -> int:
        # The columns before the new ones: transformers numbers the queries from here.
        return self._plan.width - self._plan.new

    def get_max_length(self) -> int:
        return -1


@dataclass(frozen=True)
class LinearStateShape:
    """One linear-attention layer's per-sequence state: conv window and recurrent matrix."""

    conv_dim: int
    kernel: int
    heads: int
    key_dim: int
    value_dim: int


class StatePool:
    """Every linear-attention layer's conv and recurrent state, one slot per running sequence."""

    def __init__(
        self, shapes: dict[int, LinearStateShape], *, slots: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.slots = slots
        self.conv = {
            index: torch.zeros(slots, shape.conv_dim, shape.kernel, dtype=dtype, device=device)
            for index, shape in shapes.items()
        }
        # The delta rule keeps its state in float32 whatever the model's dtype.
        self.recurrent = {
            index: torch.zeros(
                slots, shape.heads, shape.key_dim, shape.value_dim, dtype=torch.float32, device=device
            )
            for index, shape in shapes.items()
        }

    def layer(self, index: int, plan: ForwardPlan) -> PagedStateLayer:
        assert plan.state_slots is not None and plan.fresh is not None, "a hybrid forward needs state slots"
        return PagedStateLayer(self.conv[index], self.recurrent[index], plan.state_slots, plan.fresh)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.conv.values(), *self.recurrent.values()))


class PagedStateLayer(LinearAttentionLayer):
    """One linear-attention layer's states for the rows of one forward, gathered from the pool."""

    def __init__(
        self, conv: torch.Tensor, recurrent: torch.Tensor, slots: torch.Tensor, fresh: torch.Tensor
    ) -> None:
        super().__init__(number_of_states=1)
        self._pools = (conv, recurrent)
        self._slots = slots
        keep = (~fresh).to(conv.dtype)
        # A row at position 0 starts from zeros: the same as no state, since the convolution
        # pads its left with zeros and the delta rule starts from a zero matrix.
        self.conv_states[0] = conv.index_select(0, slots) * keep[:, None, None]
        self.recurrent_states[0] = (
            recurrent.index_select(0, slots) * keep.to(recurrent.dtype)[:, None, None, None]
        )
        self.conv_kernel_size[0] = conv.shape[-1]
        self.is_conv_states_initialized[0] = self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True

    def store(self) -> None:
        """Write the rows' updated states back to their slots."""
        conv, recurrent = self._pools
        new_conv, new_recurrent = self.conv_states[0], self.recurrent_states[0]
        assert new_conv is not None and new_recurrent is not None
        conv.index_copy_(0, self._slots, new_conv.to(conv.dtype))
        recurrent.index_copy_(0, self._slots, new_recurrent.to(recurrent.dtype))
