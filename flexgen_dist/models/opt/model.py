"""OPT (all variants, including OPT-350m's post-LayerNorm layout with project_in/out).

Plain math over tensors, laid out as Hugging Face's `OPTForCausalLM` computes it.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ...core.compression import TABLE
from ...kernels.attention import attend
from ...kernels.linear import embedding, linear
from ..base import (
    EMBED,
    HEAD,
    Layer,
    StepInputs,
    merge_layers,
    score_positions,
    specs,
)
from .config import OPTSpec

POSITION_OFFSET = 2  # OPT's learned positions start at index 2


def _ln(x, w, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps)


def embed(w, ids: torch.Tensor, inputs: StepInputs, *, spec: OPTSpec) -> torch.Tensor:
    x = embedding(ids, w["embed_tokens"])
    if "project_in" in w:
        x = linear(x, w["project_in"])
    return x + embedding(inputs.positions + POSITION_OFFSET, w["embed_positions"])


def attention(w, x, inputs: StepInputs, kv, *, spec: OPTSpec) -> torch.Tensor:
    residual = x
    if spec.do_layer_norm_before:
        x = _ln(x, w, "ln", spec.layer_norm_eps)
    b, s, _ = x.shape
    heads = lambda t: t.view(b, s, spec.num_heads, spec.head_dim).transpose(1, 2)
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


def mlp(w, x, inputs: StepInputs, *, spec: OPTSpec) -> torch.Tensor:
    residual = x
    if spec.do_layer_norm_before:
        x = _ln(x, w, "ln", spec.layer_norm_eps)
    x = linear(F.relu_(linear(x, w["fc1.weight"], w["fc1.bias"])), w["fc2.weight"], w["fc2.bias"])
    x = x + residual
    if not spec.do_layer_norm_before:
        x = _ln(x, w, "ln", spec.layer_norm_eps)
    return x


def output_head(w, x, inputs: StepInputs, *, spec: OPTSpec) -> torch.Tensor:
    """Logits of the last position only, in float32 (b, vocab); when scoring, the scores of the
    positions that predict `inputs.targets` (see `score_positions`)."""
    def logits_of(h):
        if "ln.weight" in w:
            h = _ln(h, w, "ln", spec.layer_norm_eps)
        if "project_out" in w:
            h = linear(h, w["project_out"])
        return linear(h, w["embed_tokens"]).float()
    if inputs.targets is None:
        return logits_of(x[:, -1])
    return score_positions(x[:, -inputs.targets.shape[1]:], inputs.targets, logits_of, spec.vocab_size)


def _linear(key: str, name: str, out_f: int, in_f: int):
    return [(f"{key}.weight", f"{name}.weight", (out_f, in_f), True, True),
            (f"{key}.bias", f"{name}.bias", (out_f,), False, False, "zeros")]


def _layer_norm(key: str, name: str, dim: int):
    return [(f"{key}.weight", f"{name}.weight", (dim,), False, False, "ones"),
            (f"{key}.bias", f"{name}.bias", (dim,), False, False, "zeros")]


def build_layers(spec: OPTSpec, first: int = 0, last: int | None = None,
                 with_embed: bool = True, with_head: bool = True,
                 sep_layer: bool = True) -> list[Layer]:
    """Schedule layers for transformer blocks [first, last), optionally with embedding and head.

    Each pipeline stage builds only its own range; a single rank builds everything.
    """
    last = spec.num_layers if last is None else last
    h, e = spec.hidden_size, spec.embed_dim
    layers: list[Layer] = []
    if with_embed:
        entries = [("embed_tokens", "embed_tokens.weight", (spec.vocab_size, e), TABLE),
                   ("embed_positions", "embed_positions.weight", (spec.max_positions + POSITION_OFFSET, h), TABLE)]
        if spec.word_embed_proj_dim:
            entries.append(("project_in", "project_in.weight", (h, e), True, True))
        layers.append(Layer("embed", specs("decoder.", entries), partial(embed, spec=spec), part=EMBED))
    for i in range(first, last):
        p = f"decoder.layers.{i}."
        attn = specs(p, _layer_norm("ln", "self_attn_layer_norm", h)
                      + _linear("q", "self_attn.q_proj", h, h) + _linear("k", "self_attn.k_proj", h, h)
                      + _linear("v", "self_attn.v_proj", h, h) + _linear("out", "self_attn.out_proj", h, h))
        ffn = specs(p, _layer_norm("ln", "final_layer_norm", h) + _linear("fc1", "fc1", spec.ffn_dim, h)
                     + _linear("fc2", "fc2", h, spec.ffn_dim))
        parts = [Layer(f"attn.{i}", attn, partial(attention, spec=spec), spec.num_heads, spec.head_dim, block=i),
                 Layer(f"mlp.{i}", ffn, partial(mlp, spec=spec), block=i)]
        layers.extend(parts if sep_layer else [merge_layers(f"block.{i}", parts)])
    if with_head:
        entries = []
        if spec.do_layer_norm_before:
            entries += _layer_norm("ln", "final_layer_norm", h)
        if spec.word_embed_proj_dim:
            entries.append(("project_out", "project_out.weight", (e, h), True, True))
        entries.append(("embed_tokens", "embed_tokens.weight", (spec.vocab_size, e), TABLE, True))
        layers.append(Layer("head", specs("decoder.", entries), partial(output_head, spec=spec), part=HEAD))
    return layers


def flops_per_token(spec: OPTSpec, context: int) -> tuple[float, float]:
    """(block FLOPs, output-head FLOPs) of one new token attending to `context` tokens: 2 per
    weight for the matmuls (bias-free count), QK^T and PV over the context."""
    h = spec.hidden_size
    blocks = 2 * spec.num_layers * (4 * h * h + 2 * h * spec.ffn_dim) + 4 * spec.num_layers * h * context
    return blocks, 2 * spec.vocab_size * spec.embed_dim


def checkpoint_keys(spec: OPTSpec) -> dict[str, tuple[str, ...]]:
    """Store name -> checkpoint keys: `decoder.layers.0.fc1.weight` is saved as
    `model.decoder.layers.0.fc1.weight` by `OPTForCausalLM` and without the prefix by older
    checkpoints; the output head is the token embedding (tied), never read on its own."""
    return {w.name: (f"model.{w.name}", w.name) for layer in build_layers(spec) for w in layer.weights}
