"""bf16 linear layers on the CPU through oneDNN with weights packed once.

`F.linear` on bf16 CPU tensors re-lays out the weight for oneDNN at every call; packing it
once (the same op torch.compile's CPU backend uses) makes a decode-sized matmul (1-8 rows)
about twice as fast on AMX/AVX512-BF16 machines, and decode is almost all matmuls. fp32 does
not gain (measured), so only bf16 models on the CPU are packed.
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


def pack_cpu_linears(model: Any) -> int:
    """Swap every plain bf16 CPU nn.Linear of `model` for a PackedLinear; returns how many."""
    if not packing_available():
        return 0
    swaps: list[tuple[nn.Module, str, nn.Linear]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            # Exact type only: subclasses (quantised, LoRA, hooked) keep their own forward.
            if (
                type(child) is nn.Linear
                and child.weight.dtype == torch.bfloat16
                and child.weight.device.type == "cpu"
            ):
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)
