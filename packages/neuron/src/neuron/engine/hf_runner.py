"""ModelRunner over one transformers causal LM on one device, with paged K/V.

The runner holds the weights and the K/V pool's tensors (`paged.KVPool`) and computes what
the scheduler asks: one `forward` over rows, each row some new tokens of one sequence plus
that sequence's block table. It keeps no per-sequence state, so joins and leaves cost
nothing here, and every rank of a tensor-parallel model given the same rows computes the
same thing.

For a plain Llama or Qwen3 model, a forward whose rows each carry one token (a decode step)
skips transformers' forward for `lean_llama`'s step (the same ops on the same weights,
bitwise the same logits, without ~14 ms of eager plumbing per batch-of-8 step); prefill
chunks, any other model, or a sharded one keep the HF forward over the pool.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from neuron.engine.cpu_linear import pack_cpu_linears as pack_linears
from neuron.engine.lean_llama import LeanLlamaDecoder, build_lean_decoder
from neuron.engine.paged import ForwardPlan, ForwardRow, KVPool

logger = logging.getLogger(__name__)

SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})

DEFAULT_BLOCK_SIZE = 16
# A runner built without a budget (tests, tools) gets this much K/V.
DEFAULT_KV_CACHE_BYTES = 256 << 20


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(attention layers, K/V heads, head_dim) of a transformers config."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return layers, kv_heads, head_dim


class SingleDeviceRunner:
    def __init__(
        self,
        model: Any,
        *,
        device: torch.device | str,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        kv_block_size: int = DEFAULT_BLOCK_SIZE,
        max_batch_size: int | None = None,
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
        self._max_context = int(max_context or config.max_position_embeddings)
        self.layers, self.kv_heads, self.head_dim = kv_geometry(config)
        self.block_size = max(1, kv_block_size)
        self.dtype = next(model.parameters()).dtype
        per_block = KVPool.bytes_per_block(
            layers=self.layers,
            block_size=self.block_size,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
        )
        blocks = kv_cache_bytes // per_block
        if max_batch_size is not None:
            # No more than a full batch of full-context sequences could ever hold.
            blocks = min(blocks, max_batch_size * -(-self._max_context // self.block_size))
        # Plus block 0, the null block.
        self.num_blocks = max(2, blocks + 1)
        self.pool: KVPool | None = None
        # transformers 5 renamed `past_key_values` to `cache`; older model classes keep the old name.
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def max_context(self) -> int:
        """The model's own position limit (the pool may allow less; the engine takes the min)."""
        return self._max_context

    @torch.inference_mode()
    def prepare(self) -> None:
        """Get the model ready for serving (pack its CPU linears, allocate the K/V pool); the
        first forward does it if nobody did before.

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
        self.pool = KVPool(
            layers=self.layers,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self._prepared = True

    @torch.inference_mode()
    def forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
        """Compute the rows' new tokens (writing their K/V into the pool); float32 logits
        [rows, vocab] after each row's last token."""
        self.prepare()
        pool = self.pool
        assert pool is not None
        plan = ForwardPlan.build(rows, self.block_size, self.device)
        if plan.new == 1 and self.lean is not None:
            self.lean_steps += 1
            return self.lean.decode(
                plan.input_ids, plan.position_ids, plan.padding_mask, pool.layers(plan)
            ).float()
        out = self.model(
            input_ids=plan.input_ids,
            attention_mask=plan.padding_mask,
            position_ids=plan.position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_argument: pool.cache(plan)},
        )
        logits: torch.Tensor = out.logits[:, -1].float()
        return logits

    def close(self) -> None:
        self.pool = None
        self.lean = None
        self.model = None
