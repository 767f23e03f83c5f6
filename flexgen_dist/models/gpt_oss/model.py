"""gpt-oss blocks, as transformers' `GptOssForCausalLM` computes them.

- Attention: Llama's projections (with biases) and rotary positions (YaRN), then a softmax in
  which each head's learned sink logit takes a share and gives no value back
  (`kernels.attention.attend_with_sinks`); on the sliding blocks a query sees only the keys less
  than `attention_window` positions behind it.
- RMSNorm scales in float32 before casting back (Llama casts first).
- MLP: a router with a bias; the top-k of its logits, softmaxed among themselves, weight each
  token's experts; tokens grouped by expert (`moe.model.routed_experts`). An expert is a SwiGLU
  with biases whose gate is clamped above at `swiglu_limit` and whose linear half is clamped to
  ±limit and shifted by one: (up + 1) * gate * sigmoid(alpha * gate).

The checkpoint keeps all of a layer's experts in fused tensors (`gate_up_proj` (E, hidden, 2 ffn),
gate and up columns interleaved; `down_proj` (E, ffn, hidden); their biases), in float or as
OpenAI released them (MXFP4 `_blocks` and `_scales`); each expert's projections are cut out of
them as separate stored tensors (`base.Derived`), so an expert is read only when routed to.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F

from ...kernels.attention import attend_with_sinks
from ...kernels.linear import linear
from ..base import Derived, Layer, StepInputs, over_tokens, specs
from ..llama.model import (
    attention_entries,
    attention_output,
    layers_with_blocks,
    norm_entries,
    queries_and_cache,
)
from ..moe.model import routed_experts
from .config import GptOssSpec

EXPERT_TENSORS = ("gate", "gate_bias", "up", "up_bias", "down", "down_bias")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x32).to(x.dtype)


def window_bias(inputs: StepInputs, end: int, window: int) -> torch.Tensor:
    """`inputs.attn_bias` with the keys `window` or more positions behind each query hidden too;
    made once per step and window. A pass over whole rows (start 0) measures the distance between
    the tokens' own position ids (a packed scoring row holds segments at the positions they would
    have alone); a later step between places in the KV buffer (rows there are contiguous after
    their left padding, so it is the same distance)."""
    key = ("window", window)
    if key not in inputs.extra:
        if inputs.start == 0:
            queries = keys = inputs.positions
        else:
            keys = torch.arange(end, device=inputs.positions.device)[None]
            queries = keys[:, inputs.start:]
        far = queries[:, :, None] - keys[:, None, :] >= window
        bias = inputs.attn_bias
        inputs.extra[key] = bias.masked_fill(far[:, None], torch.finfo(bias.dtype).min)
    return inputs.extra[key]


def attention(w, x, inputs: StepInputs, kv, *, spec: GptOssSpec, inv_freq: torch.Tensor, window: int | None):
    residual = x
    x = rms_norm(x, w["ln.weight"], spec.rms_norm_eps)
    q, keys, values = queries_and_cache(w, x, inputs, kv, spec=spec, inv_freq=inv_freq)
    bias = window_bias(inputs, keys.shape[2], window) if window else inputs.attn_bias
    return attention_output(w, attend_with_sinks(q, keys, values, bias, w["sinks"])) + residual


def route(h: torch.Tensor, w, spec: GptOssSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts), each (tokens, k): the top-k router logits, softmaxed among themselves."""
    top, experts = torch.topk(linear(h, w["router"], w["router_bias"]), spec.experts_per_tok, dim=-1)
    return torch.softmax(top, dim=-1), experts


def clamped_swiglu(h: torch.Tensor, gate, gate_bias, up, up_bias, down, down_bias, *, spec: GptOssSpec):
    g = linear(h, gate, gate_bias).clamp(max=spec.swiglu_limit)
    u = linear(h, up, up_bias).clamp(min=-spec.swiglu_limit, max=spec.swiglu_limit)
    return linear((u + 1) * (g * torch.sigmoid(g * spec.swiglu_alpha)), down, down_bias)


def moe_mlp(w, x: torch.Tensor, inputs, *, spec: GptOssSpec) -> torch.Tensor:
    h = rms_norm(x, w["ln.weight"], spec.rms_norm_eps)
    return over_tokens(partial(sparse_mlp, w, spec=spec), h.reshape(-1, h.shape[-1]), inputs).view_as(x) + x


def sparse_mlp(w, tokens: torch.Tensor, *, spec: GptOssSpec) -> torch.Tensor:
    """The routed experts over normed tokens (tokens, hidden), without the residual."""
    expert = partial(clamped_swiglu, spec=spec)
    return routed_experts(w, tokens, *route(tokens, w, spec), spec.num_experts, EXPERT_TENSORS, expert)


def _expert_specs(spec: GptOssSpec, i: int, e: int) -> list:
    h, f = spec.hidden_size, spec.moe_ffn_dim
    entries = [(f"experts.{e}.gate", f"experts.{e}.gate", (f, h), True, True),
               (f"experts.{e}.gate_bias", f"experts.{e}.gate_bias", (f,), False, False, "zeros"),
               (f"experts.{e}.up", f"experts.{e}.up", (f, h), True, True),
               (f"experts.{e}.up_bias", f"experts.{e}.up_bias", (f,), False, False, "zeros"),
               (f"experts.{e}.down", f"experts.{e}.down", (h, f), True, True),
               (f"experts.{e}.down_bias", f"experts.{e}.down_bias", (h,), False, False, "zeros")]
    return [dataclasses.replace(w, expert=e) for w in specs(f"layers.{i}.mlp.", entries)]


def _block(spec: GptOssSpec, i: int, inv_freq: torch.Tensor) -> list[Layer]:
    entries = attention_entries(spec) + [("sinks", "self_attn.sinks", (spec.num_heads,), False, False)]
    attn = Layer(f"attn.{i}", specs(f"layers.{i}.", entries),
                 partial(attention, spec=spec, inv_freq=inv_freq, window=spec.window_of(i)),
                 spec.kv_heads, spec.head_dim, block=i)
    dense = norm_entries("ln.weight", "post_attention_layernorm.weight", spec.hidden_size) + [
        ("router", "mlp.router.weight", (spec.num_experts, spec.hidden_size), False, True),
        ("router_bias", "mlp.router.bias", (spec.num_experts,), False, False, "zeros")]
    weights = specs(f"layers.{i}.", dense) + [w for e in range(spec.num_experts) for w in _expert_specs(spec, i, e)]
    return [attn, Layer(f"moe.{i}", weights, partial(moe_mlp, spec=spec), block=i,
                        top_k=spec.experts_per_tok, per_position=True)]


def build_layers(spec: GptOssSpec, first: int = 0, last: int | None = None,
                 with_embed: bool = True, with_head: bool = True, sep_layer: bool = True) -> list[Layer]:
    """Schedule layers for transformer blocks [first, last), optionally with embedding and head."""
    return layers_with_blocks(spec, _block, first, last, with_embed, with_head, sep_layer)


def flops_per_token(spec: GptOssSpec, context: int) -> tuple[float, float]:
    """(block FLOPs, output-head FLOPs) of one new token: attention, the router and k experts; the
    sliding blocks attend to at most `attention_window` positions."""
    h, q_out, kv_out = spec.hidden_size, spec.num_heads * spec.head_dim, spec.kv_heads * spec.head_dim
    weights = 2 * h * q_out + 2 * h * kv_out + h * spec.num_experts + 3 * h * spec.experts_per_tok * spec.moe_ffn_dim
    attended = sum(min(context, spec.window_of(i) or context) for i in range(spec.num_layers))
    return 2 * weights * spec.num_layers + 4 * q_out * attended, 2 * spec.vocab_size * h


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 codes (..., groups, 16) uint8, two 4-bit values a byte (low nibble first), and their
    scales (..., groups) uint8 (a power of two, biased by 127) -> float32 (..., groups * 32)."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    values = torch.stack([table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]], dim=-1)
    values = values.reshape(*blocks.shape[:-1], 32)
    return torch.ldexp(values, scales.to(torch.int32)[..., None] - 127).flatten(-2)


def _cuts(prefix: str, e: int) -> dict[str, tuple[Derived, ...]]:
    """Expert `e`'s tensors from the float fused tensors, or else from their MXFP4 form."""
    fused, bias = f"{prefix}gate_up_proj", f"{prefix}gate_up_proj_bias"
    down, down_bias = f"{prefix}down_proj", f"{prefix}down_proj_bias"
    mx_gate_up = (f"{fused}_blocks", f"{fused}_scales")
    mx_down = (f"{down}_blocks", f"{down}_scales")
    return {  # the float form is (in, out) with gate and up interleaved; MXFP4 is (out, in)
        "gate": (Derived((fused,), e, lambda t: t[:, ::2].t()),
                 Derived(mx_gate_up, e, lambda b, s: dequantize_mxfp4(b, s)[::2])),
        "up": (Derived((fused,), e, lambda t: t[:, 1::2].t()),
               Derived(mx_gate_up, e, lambda b, s: dequantize_mxfp4(b, s)[1::2])),
        "down": (Derived((down,), e, lambda t: t.t()), Derived(mx_down, e, dequantize_mxfp4)),
        "gate_bias": (Derived((bias,), e, lambda t: t[::2]),),
        "up_bias": (Derived((bias,), e, lambda t: t[1::2]),),
        "down_bias": (Derived((down_bias,), e, lambda t: t),),
    }


def checkpoint_keys(spec: GptOssSpec) -> dict[str, tuple[str | Derived, ...]]:
    """Store name -> checkpoint key: `model.` + the name, an untied head as `lm_head.weight`, and
    each expert's projections and biases cut out of the layer's fused expert tensors."""
    keys: dict[str, tuple[str | Derived, ...]] = {}
    for layer in build_layers(spec):
        for w in layer.weights:
            if w.expert is None:
                keys[w.name] = (f"model.{w.name}",)
                continue
            prefix = w.name.split("experts.")[0]
            keys[w.name] = _cuts(f"model.{prefix}experts.", w.expert)[w.key.rsplit(".", 1)[1]]
    if "lm_head.weight" in keys:
        keys["lm_head.weight"] = ("lm_head.weight",)
    return keys
