"""K/V block bookkeeping (pure) and the index layout of one forward over the pool."""

from __future__ import annotations

import pytest
import torch

from neuron.engine.blocks import BlockPool, BlockTable, blocks_for, chain_key
from neuron.engine.paged import ForwardPlan, ForwardRow


@pytest.mark.parametrize(
    ("tokens", "size", "blocks"), [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (33, 16, 3)]
)
def test_blocks_for(tokens: int, size: int, blocks: int) -> None:
    assert blocks_for(tokens, size) == blocks


def test_allocation_never_hands_out_the_null_block_and_refuses_beyond_the_pool() -> None:
    pool = BlockPool(num_blocks=5, block_size=4)
    assert pool.usable_blocks == pool.available == 4
    taken = pool.allocate(3)
    assert taken is not None and 0 not in taken
    assert pool.allocate(2) is None
    assert pool.available == 1 and pool.in_use == 3
    pool.release(taken)
    assert pool.available == 4 and pool.in_use == 0
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(taken[:1])


def test_a_shared_block_returns_to_the_pool_only_when_every_holder_released_it() -> None:
    pool = BlockPool(num_blocks=5, block_size=4)
    taken = pool.allocate(2)
    assert taken is not None
    pool.share(taken[:1])  # a fork reads the first block too
    pool.release(taken)
    assert pool.in_use == 1
    pool.release(taken[:1])
    assert pool.in_use == 0
    with pytest.raises(RuntimeError, match="nobody holds it"):
        pool.share(taken[:1])


def committed(pool: BlockPool, tokens: list[int]) -> BlockTable:
    """A sequence that computed `tokens` and offered its full blocks to the cache."""
    blocks = pool.allocate(blocks_for(len(tokens), pool.block_size))
    assert blocks is not None
    table = BlockTable(blocks=blocks)
    pool.commit(table, tokens)
    return table


@pytest.mark.parametrize(
    ("stored", "prompt", "limit", "shared"),
    [
        ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9], 8, 8),
        ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8], 7, 4),  # at least one position computed
        ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 9, 9, 9], 8, 4),  # diverges in block 2
        ([1, 2, 3, 4, 5, 6, 7, 8], [9, 2, 3, 4, 5, 6, 7, 8, 9], 8, 0),  # a key names the whole prefix
        ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9], 8, 4),  # a partial block is never shared
    ],
)
def test_prefix_match_takes_whole_blocks_of_the_same_prefix(
    stored: list[int], prompt: list[int], limit: int, shared: int
) -> None:
    pool = BlockPool(num_blocks=16, block_size=4)
    table = committed(pool, stored)
    blocks, keys = pool.match_prefix(prompt, limit)
    assert len(blocks) * 4 == shared
    assert blocks == table.blocks[: len(blocks)] and keys == table.keys[: len(blocks)]


def test_shared_blocks_are_counted_and_survive_their_first_owner() -> None:
    pool = BlockPool(num_blocks=8, block_size=2)
    first = committed(pool, [1, 2, 3, 4, 5])  # blocks for [1,2] [3,4] [5]
    blocks, _ = pool.match_prefix([1, 2, 3, 4, 9], 4)
    assert blocks == first.blocks[:2]
    pool.release(first.blocks)
    # Still held by the second sequence: not allocatable, not evictable.
    assert pool.in_use == 2
    pool.release(blocks)
    assert pool.in_use == 0 and pool.cached_blocks == 2


def test_released_cached_blocks_are_evicted_least_recently_used_last() -> None:
    pool = BlockPool(num_blocks=5, block_size=2)  # 4 usable
    old = committed(pool, [1, 1])
    new = committed(pool, [2, 2])
    pool.release(old.blocks)
    pool.release(new.blocks)
    touched, _ = pool.match_prefix([1, 1, 0], 2)  # [1, 1] is used again: [2, 2] is now the oldest
    pool.release(touched)
    assert pool.allocate(2) is not None  # the two never-used blocks come first
    assert pool.evictions == 0
    assert pool.allocate(1) is not None
    assert pool.evictions == 1
    assert pool.match_prefix([2, 2, 0], 2)[0] == []
    assert pool.match_prefix([1, 1, 0], 2)[0] == old.blocks


def test_a_prefix_computed_twice_is_cached_once() -> None:
    pool = BlockPool(num_blocks=8, block_size=2)
    a = committed(pool, [1, 2, 3, 4])
    b = committed(pool, [1, 2, 3, 4])  # computed at the same time, before either was cached
    assert b.keys == a.keys
    pool.release(b.blocks)
    assert pool.cached_blocks == 2 and pool.available == 5  # b's copies went back as plain free blocks


def test_a_hash_collision_is_not_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BlockPool(num_blocks=8, block_size=2)
    monkeypatch.setattr("neuron.engine.blocks.chain_key", lambda parent, tokens: 7)
    committed(pool, [1, 2])
    assert pool.match_prefix([3, 4, 5], 2) == ([], [])


def test_keys_chain_the_whole_prefix() -> None:
    first = chain_key(0, (1, 2))
    assert chain_key(first, (3, 4)) != chain_key(chain_key(0, (9, 9)), (3, 4))
    assert chain_key(first, (3, 4)) == chain_key(chain_key(0, (1, 2)), (3, 4))


def test_forward_plan_right_aligns_new_tokens_over_their_past() -> None:
    # Block size 2. Row 0 decodes position 3 (blocks 1, 2); row 1 computes 2 prompt tokens (block 3).
    plan = ForwardPlan.build(
        [ForwardRow([9], 3, [1, 2]), ForwardRow([5, 6], 0, [3])], block_size=2, device=torch.device("cpu")
    )
    assert (plan.rows, plan.new, plan.width) == (2, 2, 4)
    assert plan.input_ids.tolist() == [[0, 9], [5, 6]]
    assert plan.position_ids.tolist() == [[2, 3], [0, 1]]  # a padding query's position is never used
    assert plan.padding_mask is not None and plan.padding_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    # Row 0 reads slots 2,3,4,5 (positions 0-3); row 1 reads the null slot twice then 6, 7.
    assert plan.read_slots.tolist() == [2, 3, 4, 5, 0, 0, 6, 7]
    assert plan.write_slots.tolist() == [5, 6, 7]
    assert plan.real_new is not None and plan.real_new.tolist() == [1, 2, 3]


def test_forward_plan_of_equal_rows_needs_no_mask() -> None:
    plan = ForwardPlan.build(
        [ForwardRow([1], 2, [1, 2]), ForwardRow([2], 2, [3, 4])], block_size=2, device=torch.device("cpu")
    )
    assert plan.padding_mask is None and plan.real_new is None
    assert plan.write_slots.tolist() == [4, 8]
