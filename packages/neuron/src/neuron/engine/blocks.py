"""K/V block bookkeeping: which fixed-size blocks of the pool each sequence holds, and the
prefix cache over full blocks. Pure Python, no tensors: the scheduler decides here, the
runner only reads and writes the slots it is given.

A block holds `block_size` consecutive positions of one sequence. A sequence's block table
lists its blocks in position order, so position p lives in slot
`table[p // block_size] * block_size + p % block_size` of every layer's pool.

Prefix cache: a block becomes shareable once it is full, under a key chained from the
previous block's key and its own token ids, so one key names the whole prefix up to the
block's end (the K/V at a position depends on every token before it). A new prompt walks
its full blocks through the keys and takes every block already computed. Shared blocks are
never written again (a sequence only appends into its own last, partial block), so sharing
needs no copy-on-write. A released block keeps its key and goes to an LRU of evictable
blocks; allocation takes never-used blocks first, then evicts the least recently used.
Block 0 is never handed out: padding reads it (the runner keeps it zero).

Every decision depends only on the calls made, so a tensor-parallel leader that drives its
ranks with explicit block tables needs no agreement protocol.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

NULL_BLOCK = 0
# The chain's seed: the key of "no previous block".
ROOT_KEY = 0


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold `tokens` positions."""
    return -(-tokens // block_size)


def chain_key(parent: int, tokens: Sequence[int]) -> int:
    """The prefix-cache key of a full block whose predecessors' key is `parent`.

    Python's hash of a tuple of ints is the same in every process (ints are not salted), so
    every rank and every restart agree; the block also keeps its token ids and parent, and
    a lookup compares them, so a hash collision can never hand out the wrong K/V.
    """
    return hash((parent, tuple(tokens)))


@dataclass
class _Cached:
    key: int
    parent: int
    tokens: tuple[int, ...]


@dataclass
class BlockTable:
    """One sequence's blocks and how far its prefix-cache keys go."""

    blocks: list[int] = field(default_factory=list)
    # Keys of its first len(keys) blocks (those full and committed to the prefix cache).
    keys: list[int] = field(default_factory=list)


class BlockPool:
    """Allocation, reference counts and the prefix cache of one model's K/V pool."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError(
                f"a K/V pool needs at least 2 blocks of 1+ positions, got {num_blocks} x {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        # Cached blocks nobody holds, least recently used first: reusable until evicted.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._refs = [0] * num_blocks
        self._cached: dict[int, _Cached] = {}  # block -> its key
        self._by_key: dict[int, int] = {}  # key -> block
        self.evictions = 0

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks an allocation can get now (free, or cached and evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def in_use(self) -> int:
        """Blocks held by at least one sequence."""
        return self.usable_blocks - self.available

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks (reference count 1), or None when the pool cannot give them."""
        if count > self.available:
            return None
        taken: list[int] = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
                self.evictions += 1
            self._refs[block] = 1
            taken.append(block)
        return taken

    def share(self, blocks: Sequence[int]) -> None:
        """One more reference to each of `blocks`, which a sequence already holds: a fork of
        that sequence (OpenAI's `n`) reads them too. Like a prefix-cache hit, a shared block
        is never written again: each holder appends only into blocks of its own."""
        for block in blocks:
            if self._refs[block] < 1:
                raise RuntimeError(f"block {block} is shared but nobody holds it")
            self._refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced ones become free or evictable."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than it was taken")
            if self._refs[block] == 0:
                if block in self._cached:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def match_prefix(self, tokens: Sequence[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """The cached blocks that hold `tokens`' longest cached prefix of at most
        `max_tokens` positions, and their keys; each returned block is now referenced."""
        size = self.block_size
        blocks: list[int] = []
        keys: list[int] = []
        parent = ROOT_KEY
        for start in range(0, max_tokens - size + 1, size):
            chunk = tuple(tokens[start : start + size])
            key = chain_key(parent, chunk)
            block = self._by_key.get(key)
            if block is None:
                break
            cached = self._cached[block]
            if cached.parent != parent or cached.tokens != chunk:
                break  # a hash collision: not our prefix
            blocks.append(block)
            keys.append(key)
            parent = key
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        return blocks, keys

    def commit(self, table: BlockTable, tokens: Sequence[int], computed: int | None = None) -> None:
        """Offer the table's full blocks to the prefix cache; the K/V of the first `computed`
        of `tokens` (default: all) is in them. Only blocks not offered before are hashed."""
        size = self.block_size
        done = len(tokens) if computed is None else computed
        full = min(done // size, len(table.blocks))
        while len(table.keys) < full:
            index = len(table.keys)
            parent = table.keys[-1] if table.keys else ROOT_KEY
            chunk = tuple(tokens[index * size : (index + 1) * size])
            key = chain_key(parent, chunk)
            block = table.blocks[index]
            if key not in self._by_key and block not in self._cached:
                self._by_key[key] = block
                self._cached[block] = _Cached(key, parent, chunk)
            # Else the same prefix is already cached in another block (computed twice at
            # once): ours stays private and is freed normally. The key chain goes on.
            table.keys.append(key)

    def _forget(self, block: int) -> None:
        cached = self._cached.pop(block)
        del self._by_key[cached.key]
