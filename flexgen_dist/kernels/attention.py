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


SINK_CHUNK_BYTES = 64 << 20


def attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                      sinks: torch.Tensor) -> torch.Tensor:
    """`attend` with one learned logit per query head (`sinks`, (heads,)) joining each softmax as a
    key with no value: it takes a share of the attention and gives nothing back (gpt-oss). The
    scores and the softmax are float32; queries are taken a few at a time so the scores stay under
    `SINK_CHUNK_BYTES`. Keys and values are not repeated for grouped-query attention."""
    b, heads, s, d = q.shape
    kv_heads, t = k.shape[1], k.shape[2]
    group = heads // kv_heads
    sink = sinks.float().view(1, kv_heads, group, 1, 1)
    step = max(1, SINK_CHUNK_BYTES // max(1, b * heads * t * 4))
    outs = []
    for a in range(0, s, step):
        n = min(step, s - a)
        grouped = q[:, :, a:a + n].reshape(b, kv_heads, group * n, d)
        scores = (grouped @ k.transpose(-1, -2)).float().view(b, kv_heads, group, n, t) + bias[:, :, None, a:a + n]
        logits = torch.cat([scores, sink.expand(b, kv_heads, group, n, 1)], dim=-1)
        probs = logits.softmax(dim=-1)[..., :t].to(v.dtype).reshape(b, kv_heads, group * n, t)
        outs.append((probs @ v).view(b, heads, n, d))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
