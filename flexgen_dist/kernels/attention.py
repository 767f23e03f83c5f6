"""Scaled dot-product attention over a KV buffer, for multi-head and grouped-query attention.

Query heads `g * group .. (g + 1) * group - 1` share key/value head `g` (the order of Hugging
Face's `repeat_kv`). Keys and values are never repeated: prefill hands the grouping to the fused
kernel (`enable_gqa`), and a decode step views its single query as `group` rows per KV head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DECODE_CHUNK_BYTES = 8 << 20


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + bias) v with q (b, heads, s, d) already scaled, k and v (b, kv_heads, t, d),
    bias (b, 1, s, t). Returns (b, heads, s, d).

    Prefill uses the fused kernel. For decode (one query), CPU kernels on a key/value slice of a
    longer buffer are several times slower than a contiguous copy plus two plain matmuls. The copy
    is made a few sequences at a time: copies past malloc's mmap threshold (32 MB) are fresh pages
    on every call, and faulting them in costs more than the attention itself."""
    if q.shape[2] > 1:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0, enable_gqa=gqa)
    row_bytes = k[0].numel() * k.element_size()
    rows = max(1, DECODE_CHUNK_BYTES // max(row_bytes, 1))
    return torch.cat([_attend_one_query(q[i:i + rows], k[i:i + rows], v[i:i + rows], bias[i:i + rows])
                      for i in range(0, q.shape[0], rows)])


def _attend_one_query(q, k, v, bias):
    b, heads, _, d = q.shape
    grouped = q.view(b, k.shape[1], heads // k.shape[1], d)  # (b, kv_heads, group, d): one matmul per KV head
    scores = (grouped @ k.contiguous().transpose(-1, -2)).float() + bias  # bias (b, 1, 1, t) broadcasts
    out = scores.softmax(dim=-1).to(q.dtype) @ v.contiguous()
    return out.view(b, heads, 1, d)
