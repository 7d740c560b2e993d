"""ModelRunner over one transformers causal LM on one device.

Decode runs one forward for every active sequence. The batch keeps one cache whose rows are
left-padded to a common width: each step writes the new token of every row into the same
column, with per-row position ids and a padding mask. The batch cache is rebuilt only when
the set of sequences changes (a prefill joins, a sequence leaves), so a steady step copies
nothing but the new token's K/V.

Prefill runs alone (batch of one) in chunks, from a stored prefix when one shares the start
of the prompt; prompts admitted together without a prefix hit share one left-padded forward
(`prefill_batch`), and join the decode batch through the same rebuild. All behaviour is a deterministic function of the calls, as the tensor-parallel
runner, which replays them on every rank, requires.

For a plain Llama or Qwen3 model, decode skips transformers' forward for `lean_llama`'s step (the
same ops on the same weights, bitwise the same logits, without ~14 ms of eager plumbing per
batch-of-8 step); any other model, or a sharded one, keeps the HF forward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from neuron.engine.cpu_linear import pack_cpu_linears as pack_linears
from neuron.engine.kv import (
    PrefixEntry,
    PrefixStore,
    SeqKV,
    cache_from_prefix,
    cache_from_rows,
    cache_layers,
    new_cache,
    row_kv,
)
from neuron.engine.lean_llama import LeanLlamaDecoder, build_lean_decoder
from neuron.runner import PrefillResult

logger = logging.getLogger(__name__)

SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})

# A stored prefix shorter than this is not worth its copy.
MIN_PREFIX_TOKENS = 4


@dataclass
class _Batch:
    members: list[int]
    cache: Cache
    # Left padding of each row; row i's positions live in columns [pads[i], width).
    pads: list[int]
    # 1 where a column holds a real position, per row; grows with the cache.
    mask: torch.Tensor
    row_of: dict[int, int] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return cache_layers(self.cache)[0].length


@dataclass(frozen=True)
class _Prefilled:
    """A prefilled sequence waiting to join the decode batch: row `row` of `cache`, from column `start`."""

    cache: Cache
    row: int
    start: int

    def kv(self) -> SeqKV:
        return row_kv(self.cache, self.row, self.start)

    @property
    def alone(self) -> bool:
        return cache_layers(self.cache)[0].rows == 1


class SingleDeviceRunner:
    def __init__(
        self,
        model: Any,
        *,
        device: torch.device | str,
        prefill_chunk_tokens: int = 512,
        prefix_cache_entries: int = 8,
        prefix_cache_bytes: int = 1 << 30,
        max_context: int | None = None,
        pack_cpu_linears: bool = True,
        lean_decode: bool = True,
    ) -> None:
        config = model.config
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        unsupported = layer_types - SUPPORTED_LAYER_TYPES
        if unsupported:
            raise ValueError(
                f"model_type {config.model_type!r} has {sorted(unsupported)} layers; the torch runner supports "
                f"{sorted(SUPPORTED_LAYER_TYPES)} only"
            )
        self.model = model
        self.device = torch.device(device)
        # Decode on the CPU is matmul-bound: pack bf16 weights for oneDNN once (cpu_linear.py),
        # in prepare(), on the owner thread.
        self._pack_cpu_linears = pack_cpu_linears and self.device.type == "cpu"
        self.packed_linears = 0
        self._want_lean = lean_decode
        # Set in prepare() (after packing, whose weights it uses) when the model is one it reproduces.
        self.lean: LeanLlamaDecoder | None = None
        self.lean_steps = 0
        self._prepared = False
        self.num_layers = int(config.num_hidden_layers)
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        self._max_context = int(max_context or config.max_position_embeddings)
        self.prefixes = PrefixStore(prefix_cache_entries, prefix_cache_bytes)
        # Token ids whose K/V is held, per sequence (prompt + fed tokens).
        self._tokens: dict[int, list[int]] = {}
        # Sequences prefilled but not yet part of the decode batch.
        self._solo: dict[int, _Prefilled] = {}
        self._batch: _Batch | None = None

    @property
    def max_context(self) -> int:
        return self._max_context

    @torch.inference_mode()
    def prepare(self) -> None:
        """Get the model ready for serving (pack its CPU linears); the first prefill or decode
        does it if nobody did before.

        Call it on the owner thread, like everything else: a torch parallel region on another
        thread (the event loop's, say) gives the process a second OpenMP team, after which
        libgomp, with more OpenMP threads than cores, throttles spin-waiting for every team
        and each decode step gets ~50% slower for the life of the process.
        """
        if self._prepared:
            return
        if self._pack_cpu_linears:
            self.packed_linears = pack_linears(self.model)
        if self._want_lean:
            self.lean, why = build_lean_decoder(self.model)
            if self.lean is None:
                logger.debug("decode keeps the transformers forward: %s", why)
        self._prepared = True

    @torch.inference_mode()
    def prefill(self, seq_id: int, token_ids: Sequence[int]) -> PrefillResult:
        self.prepare()
        tokens = self._admit(seq_id, token_ids)
        # At least the last prompt token is computed: its logits pick the first new token.
        entry, cached = self.prefixes.lookup(tokens, len(tokens) - 1)
        return self._prefill_alone(seq_id, tokens, entry, cached)

    @torch.inference_mode()
    def prefill_batch(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
        """Several prompts in one left-padded forward (one weight pass instead of one each).

        A prompt that reuses a stored prefix, or that is longer than a prefill chunk, runs
        alone as in `prefill`; the others share a forward. Prompts of the same call do not
        reuse each other's prefixes (they are computed at the same time).
        """
        if len(seq_ids) != len(prompts) or len(set(seq_ids)) != len(seq_ids):
            raise ValueError("prefill_batch needs one prompt per distinct sequence")
        if len(seq_ids) == 1:
            return [self.prefill(seq_ids[0], prompts[0])]
        self.prepare()
        token_lists = [self._admit(seq_id, prompt) for seq_id, prompt in zip(seq_ids, prompts, strict=True)]
        try:
            return self._prefill_batch(seq_ids, token_lists)
        except BaseException:
            for seq_id in seq_ids:  # all or nothing: the caller may retry them one by one
                self._tokens.pop(seq_id, None)
                self._solo.pop(seq_id, None)
            raise

    def _prefill_batch(self, seq_ids: Sequence[int], token_lists: list[list[int]]) -> list[PrefillResult]:
        results: dict[int, PrefillResult] = {}
        together: list[int] = []
        for seq_id, tokens in zip(seq_ids, token_lists, strict=True):
            entry, cached = self.prefixes.lookup(tokens, len(tokens) - 1)
            if entry is not None or len(tokens) > self.prefill_chunk_tokens:
                results[seq_id] = self._prefill_alone(seq_id, tokens, entry, cached)
            else:
                together.append(seq_id)
        if len(together) == 1:
            seq_id = together[0]
            results[seq_id] = self._prefill_alone(seq_id, token_lists[seq_ids.index(seq_id)], None, 0)
        elif together:
            rows = [token_lists[seq_ids.index(seq_id)] for seq_id in together]
            for seq_id, logits in zip(together, self._prefill_together(together, rows), strict=True):
                results[seq_id] = PrefillResult(logits=logits, cached_tokens=0)
        return [results[seq_id] for seq_id in seq_ids]

    def _admit(self, seq_id: int, token_ids: Sequence[int]) -> list[int]:
        if not token_ids:
            raise ValueError("cannot prefill an empty prompt")
        if seq_id in self._tokens:
            raise ValueError(f"sequence {seq_id} already exists")
        return list(token_ids)

    def _prefill_alone(
        self, seq_id: int, tokens: list[int], entry: PrefixEntry | None, cached: int
    ) -> PrefillResult:
        cache = cache_from_prefix(entry.kv, cached) if entry else new_cache(self.num_layers)
        logits = None
        for start in range(cached, len(tokens), self.prefill_chunk_tokens):
            chunk = tokens[start : start + self.prefill_chunk_tokens]
            out = self.model(
                input_ids=torch.tensor([chunk], device=self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits
        assert logits is not None
        self._solo[seq_id] = _Prefilled(cache, 0, 0)
        self._tokens[seq_id] = tokens
        if len(tokens) >= MIN_PREFIX_TOKENS:
            self.prefixes.insert(tokens, row_kv(cache, 0, 0))
        return PrefillResult(logits=logits[0, -1].float(), cached_tokens=cached)

    def _prefill_together(self, seq_ids: list[int], rows: list[list[int]]) -> list[torch.Tensor]:
        """One forward over left-padded prompts; each row's K/V stays in the shared cache."""
        width = max(len(tokens) for tokens in rows)
        pads = [width - len(tokens) for tokens in rows]
        # Pad columns hold token 0 and are masked out here and in every later step.
        input_ids = torch.tensor([[0] * pad + tokens for pad, tokens in zip(pads, rows, strict=True)])
        mask = torch.tensor([[0] * pad + [1] * len(tokens) for pad, tokens in zip(pads, rows, strict=True)])
        # Positions count real tokens only, as generate() numbers a left-padded batch.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(self.num_layers)
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1].float()
        for row, (seq_id, tokens) in enumerate(zip(seq_ids, rows, strict=True)):
            self._solo[seq_id] = _Prefilled(cache, row, pads[row])
            self._tokens[seq_id] = tokens
            if len(tokens) >= MIN_PREFIX_TOKENS:
                self.prefixes.insert(tokens, row_kv(cache, row, pads[row]))
        return list(logits.unbind(0))

    @torch.inference_mode()
    def decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        if len(seq_ids) != len(token_ids) or not seq_ids:
            raise ValueError("decode needs one token per sequence and at least one sequence")
        self.prepare()
        batch = self._batch
        if batch is None or set(batch.members) != set(seq_ids):
            batch = self._rebuild(seq_ids)
        rows = [batch.row_of[s] for s in seq_ids]
        inputs = [0] * len(rows)
        positions = [0] * len(rows)
        for seq_id, row, token in zip(seq_ids, rows, token_ids, strict=True):
            inputs[row] = token
            positions[row] = len(self._tokens[seq_id])
        width = batch.width
        if width + 1 > batch.mask.shape[1]:
            grown = batch.mask.new_ones(batch.mask.shape[0], 2 * batch.mask.shape[1])
            grown[:, : batch.mask.shape[1]] = batch.mask
            batch.mask = grown
        input_ids = torch.tensor(inputs, device=self.device).unsqueeze(1)
        position_ids = torch.tensor(positions, device=self.device).unsqueeze(1)
        padding_mask = batch.mask[:, : width + 1] if any(batch.pads) else None
        if self.lean is not None:
            logits = self.lean.decode(
                input_ids, position_ids, padding_mask, cache_layers(batch.cache)
            ).float()
            self.lean_steps += 1
        else:
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=padding_mask,
                past_key_values=batch.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1].float()
        for seq_id, token in zip(seq_ids, token_ids, strict=True):
            self._tokens[seq_id].append(token)
        if rows != list(range(len(rows))):
            logits = logits[torch.tensor(rows, device=logits.device)]
        return logits

    def _rebuild(self, seq_ids: Sequence[int]) -> _Batch:
        """A batch cache for exactly `seq_ids`, from their solo caches or the current batch rows."""
        for seq_id in seq_ids:
            if seq_id not in self._tokens:
                raise ValueError(f"unknown sequence {seq_id}")
        if (
            self._batch is None
            and len(seq_ids) == 1
            and seq_ids[0] in self._solo
            and self._solo[seq_ids[0]].alone
        ):
            # One fresh sequence: adopt its prefill cache as the batch without copying.
            cache = self._solo.pop(seq_ids[0]).cache
            width = cache_layers(cache)[0].length
            mask = torch.ones(1, width + 256, dtype=torch.long, device=self.device)
            self._batch = _Batch([seq_ids[0]], cache, [0], mask, {seq_ids[0]: 0})
            return self._batch
        rows = [self._sequence_kv(s) for s in seq_ids]
        width = max(len(self._tokens[s]) for s in seq_ids)
        pads = [width - len(self._tokens[s]) for s in seq_ids]
        mask = torch.ones(len(seq_ids), width + 256, dtype=torch.long, device=self.device)
        for i, pad in enumerate(pads):
            mask[i, :pad] = 0
        cache = cache_from_rows(rows, width)
        for seq_id in seq_ids:
            self._solo.pop(seq_id, None)
        self._batch = _Batch(list(seq_ids), cache, pads, mask, {s: i for i, s in enumerate(seq_ids)})
        return self._batch

    def _sequence_kv(self, seq_id: int) -> SeqKV:
        if seq_id in self._solo:
            return self._solo[seq_id].kv()
        batch = self._batch
        if batch is None or seq_id not in batch.row_of:
            raise ValueError(f"sequence {seq_id} has no cache")
        row = batch.row_of[seq_id]
        return row_kv(batch.cache, row, batch.pads[row])

    @torch.inference_mode()
    def release(self, seq_id: int) -> None:
        tokens = self._tokens.pop(seq_id, None)
        if tokens is None:
            return
        # What the sequence computed (prompt and its answer) seeds the next turn's prefix.
        kv = self._sequence_kv_or_none(seq_id)
        if kv is not None and len(tokens) >= MIN_PREFIX_TOKENS:
            self.prefixes.insert(tokens, kv)
        self._solo.pop(seq_id, None)
        batch = self._batch
        if batch is not None and not any(member in self._tokens for member in batch.members):
            self._batch = None  # nobody left in it: free its memory now rather than at the next step

    def _sequence_kv_or_none(self, seq_id: int) -> SeqKV | None:
        if seq_id in self._solo:
            return self._solo[seq_id].kv()
        batch = self._batch
        if batch is not None and seq_id in batch.row_of:
            row = batch.row_of[seq_id]
            return row_kv(batch.cache, row, batch.pads[row])
        return None

    def close(self) -> None:
        self._tokens.clear()
        self._solo.clear()
        self._batch = None
        self.prefixes.clear()
        self.model = None
