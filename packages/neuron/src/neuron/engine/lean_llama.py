"""A lean decode step for transformers' Llama (and Qwen3, the same layers with q/k norms):
the same tensor ops, without the eager plumbing.

A batch-of-8 decode step of SmolLM2 on the CPU spent ~14 of its ~34 ms in transformers'
forward around the math: ~400 module calls, hooks and kwargs plumbing, a causal mask built
per step, rotate_half's slices and cats per layer for q and for k. This step walks the
layers with the model's own weights (the packed oneDNN ones when cpu_linear packed them)
and applies the operations transformers applies, in the same dtypes, so its logits are
bitwise those of the HF forward (checked in tests/neuron/test_engine_lean.py):

- RMSNorm in fp32, cast back, times the weight; residual adds in the model dtype.
- Rotary: cos/sin from the model's own rotary module once per step. `rotate_half(x) * sin`
  is computed as `x.roll(half) * sin_signed` with the first half of sin negated: the same
  products up to the sign, which is exact. q and k are rotated in one op over the merged
  projection's output (elementwise, so the same values as rotating each).
- Attention: SDPA as transformers' sdpa integration calls it for one query token (enable_gqa
  without a mask; grouped queries packed per KV head with a padding mask).

Only exact classes are taken (LlamaForCausalLM or Qwen3ForCausalLM and their modules, full
attention only, plain or packed linears, no hooks, sdpa attention, SiLU); anything else,
tensor-parallel shards included, keeps the HF forward. `build_lean_decoder` says why in its
second return value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuron.engine.cpu_linear import MergedLinearPart, PackedLinear
from neuron.engine.paged import PagedLayer


@dataclass(frozen=True)
class _Projection:
    """One matmul producing the concatenated outputs of one or more sibling linears."""

    weight: torch.Tensor  # packed for oneDNN when `packed`, else the [out, in] weight
    bias: torch.Tensor | None
    in_features: int
    packed: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, in] -> [rows, out]."""
        if self.packed:  # PackedLinear flattens to these 2-d rows too
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return out
        # nn.Linear sees [rows, 1, in] in the HF forward; a 2-d F.linear may take another
        # BLAS path (addmm with a bias), so keep the 3-d call.
        return F.linear(x.unsqueeze(1), self.weight, self.bias).squeeze(1)


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor
    input_eps: float
    post_norm: torch.Tensor
    post_eps: float
    # One matmul for q|k|v when cpu_linear merged them; else one per projection (fp32 stays unmerged).
    qkv: tuple[_Projection, ...]
    o_proj: _Projection
    gate_up: tuple[_Projection, ...]
    down: _Projection
    kv: int  # q and k and v widths are heads * head_dim
    q: int
    intermediate: int
    # Qwen3's per-head RMSNorm (weight, eps) of q and of k, applied before the rotary.
    q_norm: tuple[torch.Tensor, float] | None = None
    k_norm: tuple[torch.Tensor, float] | None = None


class Unsupported(ValueError):
    """The model is not one the lean decode step reproduces exactly; the message says why."""


def _single(module: Any, where: str) -> _Projection:
    if type(module) is nn.Linear:
        return _Projection(module.weight, module.bias, module.in_features, packed=False)
    if type(module) is PackedLinear:
        return _Projection(module.packed, module.bias, module.in_features, packed=True)
    raise Unsupported(f"{where} is a {type(module).__name__}")


def _siblings(parent: Any, names: tuple[str, ...], where: str) -> tuple[_Projection, ...]:
    """The projections for sibling linears: one merged matmul, or one plain matmul each."""
    modules: list[Any] = [getattr(parent, name, None) for name in names]
    if all(type(m) is MergedLinearPart for m in modules):
        merged = {id(m.merged) for m in modules}
        if len(merged) != 1 or [m.index for m in modules] != list(range(len(names))):
            raise Unsupported(f"{where} projections are merged in an unexpected way")
        m0 = modules[0].merged
        return (_Projection(m0.packed, m0.bias, m0.in_features, packed=True),)
    if all(type(m) is nn.Linear for m in modules):
        return tuple(_single(m, f"{where}.{name}") for m, name in zip(modules, names, strict=True))
    raise Unsupported(f"{where} projections are {[type(m).__name__ for m in modules]}")


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in model.modules())


@dataclass(frozen=True)
class _Family:
    """The exact module classes of one supported architecture."""

    # Any, not type: `type(x) is <a type>` would narrow the modules to `object` for mypy.
    model: Any
    causal_lm: Any
    layer: Any
    attention: Any
    mlp: Any
    norm: Any
    rotary: Any
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before the rotary


def _families() -> list[_Family]:
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.qwen3 import modeling_qwen3 as qwen3

    return [
        _Family(
            llama.LlamaModel,
            llama.LlamaForCausalLM,
            llama.LlamaDecoderLayer,
            llama.LlamaAttention,
            llama.LlamaMLP,
            llama.LlamaRMSNorm,
            llama.LlamaRotaryEmbedding,
            qk_norm=False,
        ),
        _Family(
            qwen3.Qwen3Model,
            qwen3.Qwen3ForCausalLM,
            qwen3.Qwen3DecoderLayer,
            qwen3.Qwen3Attention,
            qwen3.Qwen3MLP,
            qwen3.Qwen3RMSNorm,
            qwen3.Qwen3RotaryEmbedding,
            qk_norm=True,
        ),
    ]


class LeanLlamaDecoder:
    """Decode one token per row through a Llama (or Qwen3) causal LM, writing K/V through the pool's layers."""

    def __init__(self, model: Any) -> None:
        from transformers.activations import SiLUActivation

        family = next((f for f in _families() if type(model) is f.causal_lm), None)
        if family is None or type(model.model) is not family.model:
            raise Unsupported(f"{type(model).__name__} is not a plain LlamaForCausalLM or Qwen3ForCausalLM")
        config: Any = model.config
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise Unsupported(f"layer types {sorted(layer_types)}: only full attention is reproduced")
        if config._attn_implementation != "sdpa":
            raise Unsupported(f"attention implementation {config._attn_implementation!r} is not sdpa")
        if getattr(config, "pretraining_tp", 1) not in (1, None):
            raise Unsupported("pretraining_tp > 1")
        if _has_hooks(model):
            raise Unsupported("the model has forward hooks")
        if type(model.model.rotary_emb) is not family.rotary:
            raise Unsupported("custom rotary embedding")
        if type(model.model.norm) is not family.norm:
            raise Unsupported("custom final norm")
        if type(model.model.embed_tokens) is not nn.Embedding:
            raise Unsupported("custom embedding")
        layers: list[Any] = list(model.model.layers)[: config.num_hidden_layers]
        self.layers: list[_Layer] = []
        for i, layer in enumerate(layers):
            where = f"layer {i}"
            attn, mlp = layer.self_attn, layer.mlp
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            if family.qk_norm:
                norms += [attn.q_norm, attn.k_norm]
            if (
                type(layer) is not family.layer
                or type(attn) is not family.attention
                or type(mlp) is not family.mlp
                or any(type(norm) is not family.norm for norm in norms)
            ):
                raise Unsupported(f"{where} has modules other than {family.causal_lm.__name__}'s own")
            if type(mlp.act_fn) is not SiLUActivation:
                raise Unsupported(f"{where} activation is {type(mlp.act_fn).__name__}, not SiLU")
            head_dim = int(attn.head_dim)
            q = int(config.num_attention_heads) * head_dim
            kv = int(config.num_key_value_heads) * head_dim
            qkv = _siblings(attn, ("q_proj", "k_proj", "v_proj"), f"{where} attention")
            o_proj = _single(attn.o_proj, f"{where} o_proj")
            if (
                getattr(attn.o_proj, "in_features", None) != q
                or getattr(attn.k_proj, "out_features", None) != kv
            ):
                raise Unsupported(f"{where} projection widths differ from the config (sharded?)")
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight,
                    input_eps=float(layer.input_layernorm.variance_epsilon),
                    post_norm=layer.post_attention_layernorm.weight,
                    post_eps=float(layer.post_attention_layernorm.variance_epsilon),
                    qkv=qkv,
                    o_proj=o_proj,
                    gate_up=_siblings(mlp, ("gate_proj", "up_proj"), f"{where} mlp"),
                    down=_single(mlp.down_proj, f"{where} down_proj"),
                    kv=kv,
                    q=q,
                    intermediate=int(mlp.down_proj.in_features),
                    q_norm=(attn.q_norm.weight, float(attn.q_norm.variance_epsilon))
                    if family.qk_norm
                    else None,
                    k_norm=(attn.k_norm.weight, float(attn.k_norm.variance_epsilon))
                    if family.qk_norm
                    else None,
                )
            )
        self.head_dim = int(layers[0].self_attn.head_dim)
        self.kv_heads = int(config.num_key_value_heads)
        self.heads = int(config.num_attention_heads)
        self.groups = self.heads // self.kv_heads
        self.scaling = float(layers[0].self_attn.scaling)
        self.embed = model.model.embed_tokens.weight
        self.rotary: Any = model.model.rotary_emb
        self.norm = model.model.norm.weight
        self.norm_eps = float(model.model.norm.variance_epsilon)
        self.lm_head = _single(model.lm_head, "lm_head")
        half = self.head_dim // 2
        # rotate_half(x) = cat(-x2, x1) = roll(x, half) with the first half negated; the sign
        # goes on sin instead (exact).
        self._sign = torch.ones(self.head_dim, dtype=self.embed.dtype, device=self.embed.device)
        self._sign[:half] = -1
        self._half = half

    @staticmethod
    def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        # In place only on fresh tensors (h is x itself when x is already fp32); same rounding.
        scale = h.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        h = h * scale if h is x else h.mul_(scale)
        return weight * h.to(input_dtype)

    def decode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None,
        layers: list[PagedLayer],
    ) -> torch.Tensor:
        """Last-position logits [batch, vocab] for one new token per row ([batch, 1] ids and
        positions); `padding_mask` is [batch, cache width + 1] (1 = real) or None when no row
        is padded."""
        batch = input_ids.shape[0]
        # Rows stay 2-d ([batch, hidden]) through the layers: one token each.
        hidden = F.embedding(input_ids.view(batch), self.embed)
        cos, sin = self.rotary(hidden, position_ids=position_ids)
        # [batch, 1, head_dim]: broadcast over the heads of [batch, heads, head_dim].
        sin = sin * self._sign
        mask = None
        if padding_mask is not None:
            # SDPA turns a bool mask into this additive one (0 / -inf, query dtype) on every
            # call; once per step is enough.
            blocked = torch.scalar_tensor(float("-inf"), dtype=hidden.dtype, device=hidden.device)
            mask = torch.where(padding_mask.bool(), 0.0, blocked)[:, None, None, :]
        heads, kv_heads, dim, groups, half = self.heads, self.kv_heads, self.head_dim, self.groups, self._half
        for layer, cache in zip(self.layers, layers, strict=True):
            residual = hidden
            x = self._rms_norm(hidden, layer.input_norm, layer.input_eps)
            if len(layer.qkv) == 1:
                qkv = layer.qkv[0](x)
                value = qkv[:, layer.q + layer.kv :].view(batch, kv_heads, dim)
                if layer.q_norm is None or layer.k_norm is None:
                    qk = qkv[:, : layer.q + layer.kv].view(batch, heads + kv_heads, dim)
                else:
                    q = self._rms_norm(qkv[:, : layer.q].view(batch, heads, dim), *layer.q_norm)
                    k = self._rms_norm(
                        qkv[:, layer.q : layer.q + layer.kv].view(batch, kv_heads, dim), *layer.k_norm
                    )
                    qk = torch.cat((q, k), dim=1)
                qk = qk * cos + qk.roll(half, -1) * sin
                query, key = qk[:, :heads], qk[:, heads:]
            else:
                q = layer.qkv[0](x).view(batch, heads, dim)
                k = layer.qkv[1](x).view(batch, kv_heads, dim)
                value = layer.qkv[2](x).view(batch, kv_heads, dim)
                if layer.q_norm is not None and layer.k_norm is not None:
                    q, k = self._rms_norm(q, *layer.q_norm), self._rms_norm(k, *layer.k_norm)
                query = q * cos + q.roll(half, -1) * sin
                key = k * cos + k.roll(half, -1) * sin
            keys, values = cache.update(key.unsqueeze(2), value.unsqueeze(2))
            query = query.unsqueeze(2)  # [batch, heads, 1, head_dim]
            if groups == 1:
                out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scaling)
            elif mask is None:
                out = F.scaled_dot_product_attention(query, keys, values, scale=self.scaling, enable_gqa=True)
            else:
                packed_query = query.reshape(batch, kv_heads, groups, dim)
                out = F.scaled_dot_product_attention(
                    packed_query, keys, values, attn_mask=mask, scale=self.scaling
                )
            hidden = residual + layer.o_proj(out.reshape(batch, heads * dim))
            residual = hidden
            x = self._rms_norm(hidden, layer.post_norm, layer.post_eps)
            if len(layer.gate_up) == 1:
                gate_up = layer.gate_up[0](x)
                gate, up = gate_up[:, : layer.intermediate], gate_up[:, layer.intermediate :]
            else:
                gate, up = layer.gate_up[0](x), layer.gate_up[1](x)
            hidden = residual + layer.down(F.silu(gate) * up)
        return self.lm_head(self._rms_norm(hidden, self.norm, self.norm_eps))


def build_lean_decoder(model: Any) -> tuple[LeanLlamaDecoder | None, str]:
    """The lean decoder for `model`, or None and why the HF forward must be kept."""
    try:
        return LeanLlamaDecoder(model), "lean llama decode"
    except Unsupported as why:
        return None, str(why)
    except AttributeError as missing:  # a Llama class without an attribute the step reads
        return None, f"unexpected model layout: {missing}"
