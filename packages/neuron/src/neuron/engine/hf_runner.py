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

Hybrid models (linear-attention layers beside full attention: Qwen3.5, Qwen3-Next) keep
their linear layers' per-sequence state in a `StatePool` beside the K/V pool; rows name
their state slot, and rows of one forward that carry different numbers of new tokens are
computed in separate forwards (those layers cannot skip padding in the new tokens).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache

from neuron.engine.cpu_linear import pack_cpu_linears as pack_linears
from neuron.engine.lean_llama import LeanLlamaDecoder, build_lean_decoder
from neuron.engine.paged import ForwardPlan, ForwardRow, KVPool, LinearStateShape, PagedStateLayer, StatePool
from neuron.preflight import SERVABLE_LAYER_TYPES
from neuron.vision.tower import VisionTower

logger = logging.getLogger(__name__)

LINEAR_ATTENTION = "linear_attention"
# State slots of a hybrid model's runner built without a batch size.
DEFAULT_STATE_SLOTS = 8

DEFAULT_BLOCK_SIZE = 16
# A runner built without a budget (tests, tools) gets this much K/V.
DEFAULT_KV_CACHE_BYTES = 256 << 20


def text_config(config: Any) -> Any:
    """The decoder's config: a vision-language model's text config, else the config itself."""
    nested = getattr(config, "get_text_config", None)
    return nested() if nested is not None else config


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(attention layers, K/V heads, head_dim) of a transformers config (linear-attention
    layers hold no K/V)."""
    config = text_config(config)
    types = layer_types(config)
    layers = sum(1 for kind in types if kind != LINEAR_ATTENTION)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return layers, kv_heads, head_dim


def layer_types(config: Any) -> list[str]:
    count = int(config.num_hidden_layers)
    return list(getattr(config, "layer_types", None) or ["full_attention"] * count)[:count]


def decoder_layers(model: Any) -> Any:
    """The decoder layers of a causal LM, or of a vision-language model's language model."""
    inner = model.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


def linear_state_shapes(model: Any, types: list[str]) -> dict[int, LinearStateShape]:
    """The per-sequence state of each linear-attention layer, read from its module."""
    shapes: dict[int, LinearStateShape] = {}
    for index, kind in enumerate(types):
        if kind != LINEAR_ATTENTION:
            continue
        try:
            module = decoder_layers(model)[index].linear_attn
            shapes[index] = LinearStateShape(
                conv_dim=int(module.conv_dim),
                kernel=int(module.conv_kernel_size),
                heads=int(module.num_v_heads),
                key_dim=int(module.head_k_dim),
                value_dim=int(module.head_v_dim),
            )
        except AttributeError as missing:
            raise ValueError(
                f"model_type {model.config.model_type!r}: layer {index} is linear attention, but not a "
                f"Gated DeltaNet layout this runner knows ({missing})"
            ) from missing
    return shapes


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
        # A vision-language model's decoder shape is in its text config.
        config = text_config(model.config)
        self.layer_types = layer_types(config)
        unsupported = set(self.layer_types) - SERVABLE_LAYER_TYPES
        if unsupported:
            raise ValueError(
                f"model_type {config.model_type!r} has {sorted(unsupported)} layers; the torch runner supports "
                f"{sorted(SERVABLE_LAYER_TYPES)} only"
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
        # The embedding's rows, not the tokenizer's length: they can differ either way.
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.block_size = max(1, kv_block_size)
        self.dtype = next(model.parameters()).dtype
        per_block = KVPool.bytes_per_block(
            layers=self.layers,
            block_size=self.block_size,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
        )
        self._bytes_per_block = per_block
        blocks = kv_cache_bytes // per_block
        if max_batch_size is not None:
            # No more than a full batch of full-context sequences could ever hold.
            blocks = min(blocks, max_batch_size * -(-self._max_context // self.block_size))
        # Plus block 0, the null block.
        self.num_blocks = max(2, blocks + 1)
        self.pool: KVPool | None = None
        self.linear_shapes = linear_state_shapes(model, self.layer_types)
        # One linear-attention state slot per sequence the batch can hold (hybrid models only).
        self.state_slots = (max_batch_size or DEFAULT_STATE_SLOTS) if self.linear_shapes else 0
        self.states: StatePool | None = None
        # A vision-language model: every forward feeds its language model directly (image
        # features and M-RoPE positions in; text rows too, so both share one forward).
        self.vision = VisionTower.of(model)
        self.image_encodings = 0
        # transformers 5 renamed `past_key_values` to `cache`; older model classes keep the old name.
        decoder = self.vision.language_model if self.vision is not None else model
        parameters = inspect.signature(decoder.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def kv_cache_bytes(self) -> int:
        """Device memory of the K/V pool (the null block included) and, for a hybrid model,
        of its linear-attention states: what prepare() allocated, or, before, the K/V pool's size."""
        if self.pool is None:
            return self.num_blocks * self._bytes_per_block
        return self.pool.nbytes + (self.states.nbytes if self.states is not None else 0)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

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
        if self.linear_shapes:
            self.states = StatePool(
                self.linear_shapes, slots=self.state_slots, dtype=self.dtype, device=self.device
            )
        self._prepared = True

    @torch.inference_mode()
    def forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
        """Compute the rows' new tokens (writing their K/V, and states, into the pools);
        float32 logits [rows, vocab] after each row's last token."""
        self.prepare()
        if self.states is None or len({len(row.tokens) for row in rows}) <= 1:
            return self._forward(rows)
        # Linear-attention layers: one forward per number of new tokens, rows back in order.
        groups: dict[int, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(len(row.tokens), []).append(index)
        logits: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for members in groups.values():
            for index, row_logits in zip(members, self._forward([rows[i] for i in members]), strict=True):
                logits[index] = row_logits
        return torch.stack(logits)

    def _forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
        pool = self.pool
        assert pool is not None
        plan = ForwardPlan.build(rows, self.block_size, self.device)
        if self.states is not None and plan.state_slots is None:
            raise ValueError("a hybrid model's rows need linear-attention state slots")
        if plan.new == 1 and self.lean is not None:
            self.lean_steps += 1
            return self.lean.decode(
                plan.input_ids, plan.position_ids, plan.padding_mask, pool.layers(plan)
            ).float()
        cache, state_layers = self._cache(pool, plan)
        if self.vision is not None:
            vision_logits = self._forward_vision(self.vision, rows, plan, cache)
            for layer in state_layers:
                layer.store()
            return vision_logits
        out = self.model(
            input_ids=plan.input_ids,
            attention_mask=plan.padding_mask,
            position_ids=plan.position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_argument: cache},
        )
        for layer in state_layers:
            layer.store()
        logits: torch.Tensor = out.logits[:, -1].float()
        return logits

    def _forward_vision(
        self, vision: VisionTower, rows: Sequence[ForwardRow], plan: ForwardPlan, cache: Cache
    ) -> torch.Tensor:
        """A vision-language model's forward: embeddings with each row's image features at
        the placeholder positions it computes (a chunk may start or end inside an image: the
        rows of those positions are taken, by their rank among the prompt's placeholders),
        and M-RoPE positions (the prompt's from the model's rope index, then p + delta)."""
        embeds = vision.language_model.get_input_embeddings()(plan.input_ids)
        mrope = plan.position_ids[None].repeat(3, 1, 1)
        visual = torch.zeros(plan.rows, plan.new, dtype=torch.bool, device=self.device)
        deep: list[list[torch.Tensor]] = []
        for index, row in enumerate(rows):
            if row.images is None:
                continue
            encoded = row.images.encoded
            if encoded is None:
                # Once per sequence, at its first prefill chunk; kept for its later chunks,
                # decode steps and any recompute after a preemption.
                encoded = vision.encode(row.images, self.device, embeds.dtype)
                row.images.encoded = encoded
                self.image_encodings += 1
            prompt = encoded.positions.shape[1]
            columns = slice(plan.new - len(row.tokens), plan.new)
            where = torch.arange(row.start, row.end, device=self.device)
            inside = where < prompt
            clamped = where.clamp(max=prompt - 1)
            mrope[:, index, columns] = torch.where(
                inside, encoded.positions[:, clamped], where + encoded.delta
            )
            taken = torch.where(inside, encoded.ordinal[clamped], -1)
            hit = taken >= 0
            if bool(hit.any()):
                rank = taken[hit]
                target = torch.nonzero(hit).squeeze(1) + columns.start
                embeds[index, target] = encoded.embeds[rank].to(embeds.dtype)
                visual[index, target] = True
                for layer, features in enumerate(encoded.deepstack):
                    if len(deep) <= layer:
                        deep.append([])
                    deep[layer].append(features[rank])
        extra: dict[str, Any] = {}
        if deep:
            # Row-major like the mask: rows in order, each row's positions ascending.
            extra = {"visual_pos_masks": visual, "deepstack_visual_embeds": [torch.cat(d) for d in deep]}
        out = vision.language_model(
            inputs_embeds=embeds,
            attention_mask=plan.padding_mask,
            position_ids=torch.cat([plan.position_ids[None], mrope]),
            use_cache=True,
            **{self._cache_argument: cache},
            **extra,
        )
        logits: torch.Tensor = vision.lm_head(out.last_hidden_state[:, -1]).float()
        return logits

    def _cache(self, pool: KVPool, plan: ForwardPlan) -> tuple[Cache, list[PagedStateLayer]]:
        """A transformers Cache over the pools, its layers in the model's layer order."""
        attention = iter(pool.layers(plan))
        layers: list[Any] = []
        state_layers: list[PagedStateLayer] = []
        for index, kind in enumerate(self.layer_types):
            if kind == LINEAR_ATTENTION:
                assert self.states is not None
                state_layers.append(self.states.layer(index, plan))
                layers.append(state_layers[-1])
            else:
                layers.append(next(attention))
        return Cache(layers=layers), state_layers

    def close(self) -> None:
        self.pool = None
        self.states = None
        self.lean = None
        self.model = None
