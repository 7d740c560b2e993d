"""Megatron-style sharding of a transformers decoder, done on the HF modules in place.

Every rank builds the model on the meta device, shards it there and reads only its slices
of the checkpoint (`slices.py`): attention q/k/v and MLP gate/up
are split column-wise (by attention head, by KV head, by intermediate channel), o_proj and
down_proj row-wise, each followed by an all-reduce SUM that restores the full hidden state.
Embeddings, norms (Qwen3's per-head q/k norms included), rotary tables and lm_head stay
replicated, so every rank computes identical logits after the last all-reduce.

The attention forward of Llama-family models reshapes with `-1` heads, so slicing the
Linear weights is enough for the math; the config's head counts are patched to the local
values too so that anything sizing a KV cache from the config sees this rank's share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

AllReduce = Callable[[torch.Tensor], None]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class UnshardableModel(ValueError):
    """The model cannot be split over this many ranks; the message says why."""


@dataclass(frozen=True)
class ShardPlan:
    """Per-rank sizes, derived from the config alone (checked before any process starts)."""

    world_size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world_size

    @property
    def local_kv_heads(self) -> int:
        return self.num_kv_heads // self.world_size

    @property
    def local_intermediate(self) -> int:
        return self.intermediate_size // self.world_size


def plan_shards(config: Any, world_size: int) -> ShardPlan:
    """Check that `config` (a transformers PretrainedConfig) splits evenly over `world_size`."""
    if world_size < 1:
        raise UnshardableModel(f"tensor parallel size must be at least 1, got {world_size}")
    model_type = getattr(config, "model_type", "unknown")
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        raise UnshardableModel(
            f"tensor parallel does not support mixture-of-experts models yet (model_type {model_type!r}); "
            "supported: dense decoders with q/k/v/o and gate/up/down projections (llama, qwen2, qwen3, mistral)"
        )
    try:
        num_heads = int(config.num_attention_heads)
        num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
        intermediate = int(config.intermediate_size)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    except AttributeError as exc:
        raise UnshardableModel(
            f"model_type {model_type!r} has no standard attention/MLP sizes in its config ({exc}); "
            "supported: dense decoders (llama, qwen2, qwen3, mistral)"
        ) from exc
    for what, count in (
        ("attention heads", num_heads),
        ("key/value heads", num_kv_heads),
        ("intermediate size", intermediate),
    ):
        if count % world_size:
            raise UnshardableModel(
                f"{what} ({count}) of model_type {model_type!r} is not divisible by tensor parallel size {world_size}"
            )
    return ShardPlan(world_size, head_dim, num_heads, num_kv_heads, intermediate)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard @ W_shard^T) + b: the bias is added once, after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, all_reduce: AllReduce) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight).contiguous()
        self._all_reduce(out)
        return out if self.bias is None else out + self.bias


def _column_slice(linear: nn.Linear, rank: int, rows_per_rank: int) -> None:
    """Keep output rows [rank*n, (rank+1)*n) (heads are laid out head-major along the rows)."""
    start, stop = rank * rows_per_rank, (rank + 1) * rows_per_rank
    linear.weight = nn.Parameter(linear.weight.data[start:stop].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[start:stop].clone(), requires_grad=False)
    linear.out_features = rows_per_rank


def _row_parallel(
    linear: nn.Linear, rank: int, cols_per_rank: int, all_reduce: AllReduce
) -> RowParallelLinear:
    start, stop = rank * cols_per_rank, (rank + 1) * cols_per_rank
    weight = linear.weight.data[:, start:stop].clone()
    bias = None if linear.bias is None else linear.bias.data.clone()
    return RowParallelLinear(weight, bias, all_reduce)


def _decoder_layers(model: nn.Module) -> list[Any]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnshardableModel(f"{type(model).__name__} has no model.layers list to shard")
    for index, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [
            f"self_attn.{name}"
            for name in ATTENTION_PROJECTIONS
            if not isinstance(getattr(attn, name, None), nn.Linear)
        ] + [f"mlp.{name}" for name in MLP_PROJECTIONS if not isinstance(getattr(mlp, name, None), nn.Linear)]
        if missing:
            raise UnshardableModel(
                f"{type(model).__name__} layer {index} lacks the Linear projections {missing}; "
                "tensor parallel supports dense llama-style decoders"
            )
    return list(layers)


def shard_model(model: nn.Module, rank: int, plan: ShardPlan, all_reduce: AllReduce) -> None:
    """Replace this rank's projections by their shards, in place (on meta parameters before the
    slices are read, or on real ones)."""
    layers = _decoder_layers(model)
    hd = plan.head_dim
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        _column_slice(attn.q_proj, rank, plan.local_heads * hd)
        _column_slice(attn.k_proj, rank, plan.local_kv_heads * hd)
        _column_slice(attn.v_proj, rank, plan.local_kv_heads * hd)
        attn.o_proj = _row_parallel(attn.o_proj, rank, plan.local_heads * hd, all_reduce)
        for name in ("num_heads", "num_attention_heads"):
            if hasattr(attn, name):
                setattr(attn, name, plan.local_heads)
        for name in ("num_key_value_heads", "num_kv_heads"):
            if hasattr(attn, name):
                setattr(attn, name, plan.local_kv_heads)
        _column_slice(mlp.gate_proj, rank, plan.local_intermediate)
        _column_slice(mlp.up_proj, rank, plan.local_intermediate)
        mlp.down_proj = _row_parallel(mlp.down_proj, rank, plan.local_intermediate, all_reduce)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = plan.local_intermediate
    config = getattr(model, "config", None)
    if config is not None:
        # head_dim first: with it unset, hidden_size // local heads would be wrong.
        config.head_dim = hd
        config.num_attention_heads = plan.local_heads
        config.num_key_value_heads = plan.local_kv_heads
        config.intermediate_size = plan.local_intermediate
