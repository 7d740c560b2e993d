"""bf16 linear layers on the CPU through oneDNN with weights packed once.

`F.linear` on bf16 CPU tensors re-lays out the weight for oneDNN at every call; packing it
once (the same op torch.compile's CPU backend uses) makes a decode-sized matmul (1-8 rows)
about twice as fast on AMX/AVX512-BF16 machines, and decode is almost all matmuls. fp32 does
not gain (measured), so only bf16 models on the CPU are packed.

Sibling projections that read the same input (attention's q/k/v, the MLP's gate/up) are
also merged into one packed matmul: a decode step then makes 4 oneDNN calls per layer
instead of 7, each a thread-pool fork/join that stalls whenever another process holds one of
the cores. The outputs are bitwise those of the separate matmuls (the reduction over the
input features is the same; checked on SmolLM2 for 1-1024 rows and in the tests).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def packing_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class PackedLinear(nn.Module):
    """Inference-only stand-in for an nn.Linear whose weight is packed for oneDNN."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            # The batch-size hint only picks the packed layout; 1 suits decode and works for any size.
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


class _MergedMatmul:
    """One packed matmul over several linears' weights; its parts share the latest result.

    A part called with the very tensor (object identity) the latest result was computed from,
    and not yet handed that result, gets its slice; any other call computes afresh. The
    parent module calls each sibling once per forward with the same input, in any order.
    """

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.in_features = linears[0].in_features
        self.sizes = [linear.out_features for linear in linears]
        with torch.no_grad():
            weight = torch.cat([linear.weight.detach() for linear in linears])
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            biases = [linear.bias for linear in linears]
            if all(bias is None for bias in biases):
                self.bias: torch.Tensor | None = None
            else:
                self.bias = torch.cat(
                    [
                        torch.zeros(linear.out_features, dtype=weight.dtype)
                        if bias is None
                        else bias.detach()
                        for linear, bias in zip(linears, biases, strict=True)
                    ]
                )
        self._input: torch.Tensor | None = None
        self._parts: list[torch.Tensor | None] = []

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input or self._parts[index] is None:
            flat = x.reshape(-1, self.in_features)
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
            out = out.reshape(*x.shape[:-1], out.shape[-1])
            self._input, self._parts = x, list(out.split(self.sizes, dim=-1))
        result, self._parts[index] = self._parts[index], None
        if all(p is None for p in self._parts):
            self._input = None  # everyone has its part: hold no activations between forwards
        assert result is not None
        return result


class MergedLinearPart(nn.Module):
    """Stands in for one of the linears a _MergedMatmul packs together."""

    def __init__(self, merged: _MergedMatmul, index: int) -> None:
        super().__init__()
        self.merged = merged
        self.index = index
        self.in_features = merged.in_features
        self.out_features = merged.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merged.part(self.index, x)


# Children of one module that read the same input, in the order their outputs are packed.
MERGEABLE_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _packable(module: nn.Module | None) -> bool:
    # Exact type only: subclasses (quantised, LoRA, hooked) keep their own forward.
    return (
        type(module) is nn.Linear
        and module.weight.dtype == torch.bfloat16
        and module.weight.device.type == "cpu"
    )


def pack_cpu_linears(model: Any) -> int:
    """Swap every plain bf16 CPU nn.Linear of `model` for a packed one (sibling projections
    merged); returns how many linears were replaced."""
    if not packing_available():
        return 0
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        merged_names: set[str] = set()
        for names in MERGEABLE_SIBLINGS:
            linears = [getattr(parent, name, None) for name in names]
            if all(_packable(linear) for linear in linears):
                group = [linear for linear in linears if isinstance(linear, nn.Linear)]
                if len({linear.in_features for linear in group}) == 1:
                    merged = _MergedMatmul(group)
                    swaps += [(parent, name, MergedLinearPart(merged, i)) for i, name in enumerate(names)]
                    merged_names.update(names)
        for name, child in parent.named_children():
            if name not in merged_names and _packable(child) and isinstance(child, nn.Linear):
                swaps.append((parent, name, PackedLinear(child)))
    for parent, name, replacement in swaps:
        setattr(parent, name, replacement)
    return len(swaps)
