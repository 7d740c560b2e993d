"""KV storage for the single-device runner: an in-place growing cache layer and the prefix store.

transformers' DynamicLayer concatenates every step, copying the whole cache each token.
`GrowingKVLayer` keeps a buffer with spare capacity and writes new positions in place, so a
decode step copies only the new token's K/V; the buffer doubles when it fills up.

A sequence's K/V outside a batch is a list of (keys, values) per layer, each
[1, kv_heads, length, head_dim]; that is also what the prefix store keeps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# (keys, values) per layer, each [1, kv_heads, length, head_dim].
SeqKV = list[tuple[torch.Tensor, torch.Tensor]]

# Spare positions allocated beyond what is needed, so most steps never reallocate.
HEADROOM_TOKENS = 128


class GrowingKVLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One layer's K/V as [batch, kv_heads, capacity, head_dim] buffers filled up to `length`."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, length: int = 0):
        super().__init__()  # type: ignore[no-untyped-call]
        self.length = length
        if keys is not None and values is not None:
            self._keys_buf, self._values_buf = keys, values
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self._expose()

    def _expose(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Views of the filled part: what attention reads.
        keys, values = self._keys_buf[:, :, : self.length], self._values_buf[:, :, : self.length]
        self.keys, self.values = keys, values
        return keys, values

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, new, dim = key_states.shape
        capacity = new + HEADROOM_TOKENS
        self._keys_buf = key_states.new_zeros(batch, heads, capacity, dim)
        self._values_buf = value_states.new_zeros(
            batch, value_states.shape[1], capacity, value_states.shape[3]
        )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys_buf.shape[2]:
            self._grow(max(end + HEADROOM_TOKENS, 2 * self._keys_buf.shape[2]))
        self._keys_buf[:, :, self.length : end].copy_(key_states)
        self._values_buf[:, :, self.length : end].copy_(value_states)
        self.length = end
        return self._expose()

    def _grow(self, capacity: int) -> None:
        def grown(buf: torch.Tensor) -> torch.Tensor:
            out = buf.new_zeros(buf.shape[0], buf.shape[1], capacity, buf.shape[3])
            out[:, :, : self.length].copy_(buf[:, :, : self.length])
            return out

        self._keys_buf, self._values_buf = grown(self._keys_buf), grown(self._values_buf)

    @property
    def rows(self) -> int:
        return int(self._keys_buf.shape[0])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def row(self, index: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one batch row's filled positions from `start` (past its left padding)."""
        return (
            self._keys_buf[index : index + 1, :, start : self.length],
            self._values_buf[index : index + 1, :, start : self.length],
        )


def new_cache(num_layers: int) -> Cache:
    layers: list[Any] = [GrowingKVLayer() for _ in range(num_layers)]
    return Cache(layers=layers)


def cache_from_rows(rows: Sequence[SeqKV], width: int) -> Cache:
    """A batch cache holding each row's K/V right-aligned at `width` (left padding is zeros)."""
    layers: list[Any] = []
    for layer in range(len(rows[0])):
        k0, v0 = rows[0][layer]
        capacity = width + HEADROOM_TOKENS
        keys = k0.new_zeros(len(rows), k0.shape[1], capacity, k0.shape[3])
        values = v0.new_zeros(len(rows), v0.shape[1], capacity, v0.shape[3])
        for i, seq in enumerate(rows):
            k, v = seq[layer]
            length = k.shape[2]
            keys[i : i + 1, :, width - length : width].copy_(k)
            values[i : i + 1, :, width - length : width].copy_(v)
        layers.append(GrowingKVLayer(keys, values, width))
    return Cache(layers=layers)


def cache_from_prefix(kv: SeqKV, length: int) -> Cache:
    """A fresh single-sequence cache starting with the first `length` positions of `kv`."""
    return cache_from_rows([[(k[:, :, :length], v[:, :, :length]) for k, v in kv]], length)


def cache_layers(cache: Cache) -> list[GrowingKVLayer]:
    layers: list[Any] = cache.layers
    return layers


def row_kv(cache: Cache, index: int, start: int) -> SeqKV:
    return [layer.row(index, start) for layer in cache_layers(cache)]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class PrefixEntry:
    tokens: tuple[int, ...]
    kv: SeqKV
    nbytes: int


class PrefixStore:
    """Recently seen token prefixes and their K/V, bounded by entries and bytes, LRU.

    Matching is on token ids, by longest common prefix: the K/V of positions [0, n) depends
    only on tokens [0, n), so any shared prefix is reusable even when the stored sequence
    goes on differently (e.g. BPE merged the end of a turn with what followed). Every
    decision depends only on the calls made, so replicas fed the same calls agree.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._next_key = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: Sequence[int], limit: int) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with `tokens` (at most `limit` tokens), and that length."""
        best: tuple[int, int] | None = None
        for key, entry in self._entries.items():
            shared = min(common_prefix_len(entry.tokens, tokens), limit)
            if shared > 0 and (best is None or shared > best[1]):
                best = (key, shared)
        if best is None:
            return None, 0
        self._entries.move_to_end(best[0])
        return self._entries[best[0]], best[1]

    def insert(self, tokens: Sequence[int], kv: SeqKV) -> None:
        if self.max_entries <= 0 or not tokens:
            return
        stored = [(k.clone(), v.clone()) for k, v in kv]
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in stored)
        if nbytes > self.max_bytes:
            return
        key_tokens = tuple(tokens)
        # An entry that is a prefix of the new one can only ever match less: drop it.
        for key, entry in list(self._entries.items()):
            if len(entry.tokens) <= len(key_tokens) and key_tokens[: len(entry.tokens)] == entry.tokens:
                self._drop(key)
            elif len(entry.tokens) > len(key_tokens) and entry.tokens[: len(key_tokens)] == key_tokens:
                # The new one is covered by an existing longer entry: just refresh that one.
                self._entries.move_to_end(key)
                return
        self._entries[self._next_key] = PrefixEntry(key_tokens, stored, nbytes)
        self._next_key += 1
        self.nbytes += nbytes
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
