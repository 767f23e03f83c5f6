"""Device-specific fast paths the layer math can use without knowing where it runs.

On a CPU, oneDNN's bf16 matmul re-lays out ("packs") the weight on every call; for the few rows
of a decode step that costs more than the product itself. Weights that stay resident are packed
once at placement, and `linear` dispatches on whether it got a packed weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linear_weight(w: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """`w` (out, in) in oneDNN's blocked layout, tuned for about `rows_hint` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, for plain or packed weights (same results, bit for bit, in bf16)."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)
