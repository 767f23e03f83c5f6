"""OPT (all variants, including OPT-350m's post-LayerNorm layout with project_in/out).

Plain math over tensors, laid out as Hugging Face's `OPTForCausalLM` computes it.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ..kernels import linear
from .base import Layer, StepInputs, WeightSpec, merge_layers
from .registry import ModelSpec

POSITION_OFFSET = 2  # OPT's learned positions start at index 2


def checkpoint_key_to_name(key: str) -> str | None:
    """Map a Hugging Face state-dict key to our store name (None for keys we do not keep)."""
    if key.startswith("model."):
        key = key[len("model."):]
    if key == "lm_head.weight":
        return None  # tied to decoder.embed_tokens.weight
    return key


def _ln(x, w, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps)


def embed(w, ids: torch.Tensor, inputs: StepInputs, *, spec: ModelSpec) -> torch.Tensor:
    x = F.embedding(ids, w["embed_tokens"])
    if "project_in" in w:
        x = linear(x, w["project_in"])
    return x + F.embedding(inputs.positions + POSITION_OFFSET, w["embed_positions"])


DECODE_CHUNK_BYTES = 8 << 20


def attend(q, k, v, bias):
    """softmax(q k^T + bias) v, with q already scaled.

    Prefill uses the fused kernel. For decode (one query), CPU kernels on a key/value slice of a
    longer buffer are several times slower than a contiguous copy plus two plain matmuls. The copy
    is made a few sequences at a time: copies past malloc's mmap threshold (32 MB) are fresh pages
    on every call, and faulting them in costs more than the attention itself."""
    if q.shape[2] > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    row_bytes = k[0].numel() * k.element_size()
    rows = max(1, DECODE_CHUNK_BYTES // max(row_bytes, 1))
    return torch.cat([_attend_one_query(q[i:i + rows], k[i:i + rows], v[i:i + rows], bias[i:i + rows])
                      for i in range(0, q.shape[0], rows)])


def _attend_one_query(q, k, v, bias):
    scores = (q @ k.contiguous().transpose(-1, -2)).float() + bias
    return scores.softmax(dim=-1).to(q.dtype) @ v.contiguous()


def attention(w, x, inputs: StepInputs, kv, *, spec: ModelSpec) -> torch.Tensor:
    residual = x
    if spec.do_layer_norm_before:
        x = _ln(x, w, "ln", spec.layer_norm_eps)
    b, s, _ = x.shape
    heads = lambda t: t.view(b, s, spec.num_heads, spec.head_dim).transpose(1, 2)  # noqa: E731
    q = heads(linear(x, w["q.weight"], w["q.bias"]) * spec.head_dim ** -0.5)
    k_buf, v_buf = kv
    end = inputs.start + s
    k_buf[:, :, inputs.start:end] = heads(linear(x, w["k.weight"], w["k.bias"]))
    v_buf[:, :, inputs.start:end] = heads(linear(x, w["v.weight"], w["v.bias"]))
    out = attend(q, k_buf[:, :, :end], v_buf[:, :, :end], inputs.attn_bias)
    out = linear(out.transpose(1, 2).reshape(b, s, -1), w["out.weight"], w["out.bias"]) + residual
    if not spec.do_layer_norm_before:
        out = _ln(out, w, "ln", spec.layer_norm_eps)
    return out


def mlp(w, x, inputs: StepInputs, *, spec: ModelSpec) -> torch.Tensor:
    residual = x
    if spec.do_layer_norm_before:
        x = _ln(x, w, "ln", spec.layer_norm_eps)
    x = linear(F.relu_(linear(x, w["fc1.weight"], w["fc1.bias"])), w["fc2.weight"], w["fc2.bias"])
    x = x + residual
    if not spec.do_layer_norm_before:
        x = _ln(x, w, "ln", spec.layer_norm_eps)
    return x


def output_head(w, x, inputs: StepInputs, *, spec: ModelSpec) -> torch.Tensor:
    """Logits of the last position only, in float32 (b, vocab)."""
    x = x[:, -1]
    if "ln.weight" in w:
        x = _ln(x, w, "ln", spec.layer_norm_eps)
    if "project_out" in w:
        x = linear(x, w["project_out"])
    return linear(x, w["embed_tokens"]).float()


def _specs(prefix: str, entries: list[tuple]) -> list[WeightSpec]:
    """(key, name, shape, compressible[, used by linear]) -> WeightSpecs."""
    return [WeightSpec(key, f"{prefix}{name}", shape, e[0], *e[1:]) for key, name, shape, *e in entries]


def _linear(key: str, name: str, out_f: int, in_f: int):
    return [(f"{key}.weight", f"{name}.weight", (out_f, in_f), True, True),
            (f"{key}.bias", f"{name}.bias", (out_f,), False)]


def _layer_norm(key: str, name: str, dim: int):
    return [(f"{key}.weight", f"{name}.weight", (dim,), False),
            (f"{key}.bias", f"{name}.bias", (dim,), False)]


def build_layers(spec: ModelSpec, first: int = 0, last: int | None = None,
                 with_embed: bool = True, with_head: bool = True,
                 sep_layer: bool = True) -> list[Layer]:
    """Schedule layers for transformer blocks [first, last), optionally with embedding and head.

    Each pipeline stage builds only its own range; a single rank builds everything.
    """
    last = spec.num_layers if last is None else last
    h, e = spec.hidden_size, spec.embed_dim
    layers: list[Layer] = []
    if with_embed:
        entries = [("embed_tokens", "embed_tokens.weight", (spec.vocab_size, e), True),
                   ("embed_positions", "embed_positions.weight", (spec.max_positions + POSITION_OFFSET, h), True)]
        if spec.word_embed_proj_dim:
            entries.append(("project_in", "project_in.weight", (h, e), True, True))
        layers.append(Layer("embed", _specs("decoder.", entries), partial(embed, spec=spec)))
    for i in range(first, last):
        p = f"decoder.layers.{i}."
        attn = _specs(p, _layer_norm("ln", "self_attn_layer_norm", h)
                      + _linear("q", "self_attn.q_proj", h, h) + _linear("k", "self_attn.k_proj", h, h)
                      + _linear("v", "self_attn.v_proj", h, h) + _linear("out", "self_attn.out_proj", h, h))
        ffn = _specs(p, _layer_norm("ln", "final_layer_norm", h) + _linear("fc1", "fc1", spec.ffn_dim, h)
                     + _linear("fc2", "fc2", h, spec.ffn_dim))
        parts = [Layer(f"attn.{i}", attn, partial(attention, spec=spec), spec.num_heads, spec.head_dim),
                 Layer(f"mlp.{i}", ffn, partial(mlp, spec=spec))]
        layers.extend(parts if sep_layer else [merge_layers(f"block.{i}", parts)])
    if with_head:
        entries = []
        if spec.do_layer_norm_before:
            entries += _layer_norm("ln", "final_layer_norm", h)
        if spec.word_embed_proj_dim:
            entries.append(("project_out", "project_out.weight", (e, h), True, True))
        entries.append(("embed_tokens", "embed_tokens.weight", (spec.vocab_size, e), True, True))
        layers.append(Layer("head", _specs("decoder.", entries), partial(output_head, spec=spec)))
    return layers
