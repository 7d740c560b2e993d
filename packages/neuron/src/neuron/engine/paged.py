"""The K/V pool's tensors and the cache a forward pass sees over them.

Each attention layer's K and V live in one tensor of slots, [blocks * block_size, kv_heads,
head_dim]; `blocks.py` decides which slots belong to which sequence. A forward pass gets a
`ForwardPlan`: the rows it computes (new tokens, the position of the first, the row's block
table), laid out as a left-padded batch whose new tokens are right-aligned in the last `new`
columns and whose earlier positions sit just before them. For every attention layer,
`PagedLayer.update` writes the new K/V into their slots, then gathers each row's positions
into that padded layout for attention (SDPA, through transformers' own attention or the lean
decode step). The gather is scratch for one layer at a time: what persists is the pool, so
K/V memory follows the tokens in flight, and a sequence joining or leaving the batch copies
nothing. Padding columns read the null slot (block 0, kept zero) and are masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from neuron.engine.blocks import NULL_BLOCK


@dataclass(frozen=True)
class ForwardRow:
    """One sequence in a forward: compute `tokens` at positions start, start+1, ...; its K/V
    for positions [0, start) is already in `blocks` (which also cover the new positions)."""

    tokens: Sequence[int]
    start: int
    blocks: Sequence[int]

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

    @staticmethod
    def bytes_per_block(
        *, layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def cache(self, plan: ForwardPlan) -> Cache:
        """A transformers Cache over the pool for one forward pass."""
        layers: list[Any] = self.layers(plan)
        return Cache(layers=layers)

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
        keys = self._pool_keys.index_select(0, plan.read_slots).view(shape).transpose(1, 2)
        values = self._pool_values.index_select(0, plan.read_slots).view(shape).transpose(1, 2)
        self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._plan.width, 0

    def get_seq_length(self) -> int:
        # The columns before the new ones: transformers numbers the queries from here.
        return self._plan.width - self._plan.new

    def get_max_length(self) -> int:
        return -1
