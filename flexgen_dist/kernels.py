"""Device-specific fast paths the layer math can use without knowing where it runs.

On a CPU, oneDNN's bf16 matmul re-lays out ("packs") the weight on every call; for the few rows
of a decode step that costs more than the product itself. Weights that stay resident are packed
once at placement, where the probe found the packing op works on this CPU, and `linear`
dispatches on whether it got a packed weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import probe


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and probe.pack_supported()


def pack_linear_weight(w: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """`w` (out, in) in oneDNN's blocked layout, tuned for about `rows_hint` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, for plain or packed weights (same results, bit for bit, in bf16)."""
    if w.is_mkldnn:
        return probe.linear_packed(x, w, b)
    return F.linear(x, w, b)


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """The matmul path resident linear weights take, for the run report."""
    if can_pack(device, dtype):
        return "oneDNN prepacked bf16"
    return "F.linear"
