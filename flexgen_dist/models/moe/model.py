"""Mixture-of-experts blocks: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

Attention, embedding and head are Llama's (`llama/model.py`; OLMoE's q/k norms over the whole
projection, Qwen3-MoE's per head). The MLP of a sparse block is a router and routed SwiGLU
experts, as transformers computes them: router logits in the model's dtype, softmax in float32
over all experts, top-k, renormalised where the family does (Mixtral always, the others with
`norm_topk_prob`), cast back to the dtype (Mixtral weights its experts' outputs in float32).
Tokens are grouped by expert: one matmul chain per used expert over its tokens, weighted and
scatter-added back. Each expert's weights are separate stored tensors (`WeightSpec.expert`), asked
for (`base.take`) only after routing, so an expert no token uses is never touched. Qwen2-MoE adds
a shared expert scaled by sigmoid(shared_expert_gate(x)).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F

from ...kernels.linear import linear
from ..base import Layer, over_tokens, specs, take
from ..llama.model import (
    attention_layer,
    layers_with_blocks,
    matmul_entries,
    mlp_layer,
    norm_entries,
    rms_norm,
)
from .config import MoeSpec

PROJECTIONS = ("gate", "up", "down")


def route(h: torch.Tensor, router: torch.Tensor, spec: MoeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts), each (tokens, k), for `h` (tokens, hidden)."""
    probs = torch.softmax(linear(h, router).float(), dim=-1)
    top, experts = torch.topk(probs, spec.experts_per_tok, dim=-1)
    if spec.norm_topk_prob or spec.model_type == "mixtral":
        top = top / top.sum(dim=-1, keepdim=True)
    return (top if spec.model_type == "mixtral" else top.to(h.dtype)), experts


def swiglu(h: torch.Tensor, gate, up, down) -> torch.Tensor:
    return linear(F.silu(linear(h, gate)) * linear(h, up), down)


def routed_experts(w, h: torch.Tensor, top: torch.Tensor, experts: torch.Tensor, num_experts: int,
                   names: tuple[str, ...], expert) -> torch.Tensor:
    """Sum over each token's experts of weight x expert(token): tokens grouped by expert (no loop
    over tokens), only the experts some token routes to asked for from `w`. Expert `e` is
    `expert(tokens, *w["experts.e.<name>"] for each of names)`."""
    k = experts.shape[1]
    chosen = experts.reshape(-1)
    order = torch.argsort(chosen, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(chosen, minlength=num_experts).tolist()
    used = [e for e, c in enumerate(counts) if c]
    tensors = take(w, [f"experts.{e}.{p}" for e in used for p in names])
    weights, out, start = top.reshape(-1), torch.zeros_like(h), 0
    for e in used:
        pairs = order[start:start + counts[e]]
        start += counts[e]
        tokens = pairs // k
        y = expert(h[tokens], *(next(tensors) for _ in names))
        out.index_add_(0, tokens, (y * weights[pairs, None]).to(out.dtype))
    return out


def moe_mlp(w, x: torch.Tensor, inputs, *, spec: MoeSpec) -> torch.Tensor:
    h = rms_norm(x, w["ln.weight"], spec.rms_norm_eps)
    return over_tokens(partial(sparse_mlp, w, spec=spec), h.reshape(-1, h.shape[-1]), inputs).view_as(x) + x


def sparse_mlp(w, tokens: torch.Tensor, *, spec: MoeSpec) -> torch.Tensor:
    """A sparse block's MLP over normed tokens (tokens, hidden), without the residual."""
    top, experts = route(tokens, w["router"], spec)
    out = routed_experts(w, tokens, top, experts, spec.num_experts, PROJECTIONS, swiglu)
    if spec.shared_ffn_dim:
        shared = swiglu(tokens, w["shared.gate.weight"], w["shared.up.weight"], w["shared.down.weight"])
        out = out + torch.sigmoid(linear(tokens, w["shared_gate"])) * shared
    return out


def _expert_specs(spec: MoeSpec, i: int, e: int) -> list:
    mlp, *names = spec.expert_names
    h, f = spec.hidden_size, spec.moe_ffn_dim
    shapes = ((f, h), (f, h), (h, f))
    entries = [(f"experts.{e}.{p}", f"{mlp}.experts.{e}.{n}.weight", shape, True, True)
               for p, n, shape in zip(PROJECTIONS, names, shapes)]
    return [dataclasses.replace(w, expert=e) for w in specs(f"layers.{i}.", entries)]


def moe_entries(spec: MoeSpec) -> list[tuple]:
    """The dense weights of a sparse block's MLP layer: norm, router, shared expert and its gate."""
    h, mlp = spec.hidden_size, spec.expert_names[0]
    entries = norm_entries("ln.weight", "post_attention_layernorm.weight", h)
    entries.append(("router", f"{mlp}.gate.weight", (spec.num_experts, h), False, True))
    if spec.shared_ffn_dim:
        f = spec.shared_ffn_dim
        entries += [*matmul_entries("shared.gate", "mlp.shared_expert.gate_proj", f, h),
                    *matmul_entries("shared.up", "mlp.shared_expert.up_proj", f, h),
                    *matmul_entries("shared.down", "mlp.shared_expert.down_proj", h, f),
                    ("shared_gate", "mlp.shared_expert_gate.weight", (1, h), False, True)]
    return entries


def _block(spec: MoeSpec, i: int, inv_freq: torch.Tensor) -> list[Layer]:
    attn = attention_layer(spec, i, inv_freq)
    if not spec.is_sparse(i):
        return [attn, mlp_layer(spec, i, spec.ffn_dim)]
    weights = specs(f"layers.{i}.", moe_entries(spec))
    weights += [w for e in range(spec.num_experts) for w in _expert_specs(spec, i, e)]
    return [attn, Layer(f"moe.{i}", weights, partial(moe_mlp, spec=spec), block=i,
                        top_k=spec.experts_per_tok, per_position=True)]


def build_layers(spec: MoeSpec, first: int = 0, last: int | None = None,
                 with_embed: bool = True, with_head: bool = True, sep_layer: bool = True) -> list[Layer]:
    """Schedule layers for transformer blocks [first, last), optionally with embedding and head."""
    return layers_with_blocks(spec, _block, first, last, with_embed, with_head, sep_layer)


def flops_per_token(spec: MoeSpec, context: int) -> tuple[float, float]:
    """(block FLOPs, output-head FLOPs) of one new token: the active weights only (attention, the
    router, k experts, the shared expert; dense MLP blocks whole) and QK^T, PV over the context."""
    h, q_out, kv_out = spec.hidden_size, spec.num_heads * spec.head_dim, spec.kv_heads * spec.head_dim
    attn = 2 * h * q_out + 2 * h * kv_out
    sparse = h * spec.num_experts + 3 * h * (spec.experts_per_tok * spec.moe_ffn_dim + spec.shared_ffn_dim)
    sparse += h if spec.shared_ffn_dim else 0
    dense = 3 * h * spec.ffn_dim
    weights = spec.num_layers * attn + spec.sparse_blocks * sparse + (spec.num_layers - spec.sparse_blocks) * dense
    return 2 * weights + spec.num_layers * 4 * q_out * context, 2 * spec.vocab_size * h


def checkpoint_keys(spec: MoeSpec) -> dict[str, tuple[str, ...]]:
    """Store name -> checkpoint key: `model.` + the name, an untied head as `lm_head.weight`. Experts
    are read as the hub stores them, one tensor per expert and projection (what `save_pretrained`
    writes too)."""
    keys = {w.name: (f"model.{w.name}",) for layer in build_layers(spec) for w in layer.weights}
    if "lm_head.weight" in keys:
        keys["lm_head.weight"] = ("lm_head.weight",)
    return keys
