"""The Llama architecture: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM, TinyLlama.

Plain math over tensors, laid out as Hugging Face's `LlamaForCausalLM` (and its Mistral and Qwen
siblings) computes it: RMSNorm before attention and MLP, rotary positions (with Llama 3.1's
`llama3` frequency scaling), grouped-query attention (the KV cache holds `kv_heads` heads, see
`attention.py`), a SwiGLU MLP, Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorm, and a tied or
untied output head. Config parsing and built-in shapes live in `config.py`.
"""
from __future__ import annotations

import math
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
    ModelError,
    StepInputs,
    merge_layers,
    score_positions,
    specs,
)
from .config import LlamaSpec


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim / 2,) in float32, as transformers computes them."""
    dim = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if spec.rope_type == "default":
        return inv
    if spec.rope_type == "yarn":
        return _yarn_inv_freq(spec)
    # llama3: stretch low frequencies by `factor`, keep high ones, interpolate smoothly in between
    low_wavelen = spec.rope_original_max_positions / spec.rope_low_freq_factor
    high_wavelen = spec.rope_original_max_positions / spec.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / spec.rope_factor, inv)
    smooth = (spec.rope_original_max_positions / wavelen - spec.rope_low_freq_factor) / (
        spec.rope_high_freq_factor - spec.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.rope_factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    """YaRN: interpolated (divided by the factor) below the dimensions that turn `beta_slow` times
    over the original context, kept above those that turn `beta_fast` times, a linear ramp between."""
    dim, base, original = spec.head_dim, spec.rope_theta, spec.rope_original_max_positions

    def dimension_turning(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_turning(spec.rope_beta_fast), dimension_turning(spec.rope_beta_slow)
    if spec.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    turns = base ** (torch.arange(0, dim, 2).float() / dim)  # transformers' order of operations
    return 1.0 / (spec.rope_factor * turns) * (1 - keep) + 1.0 / turns * keep


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32, cast back before the scale (transformers' order, so float32 runs match exactly)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotary_tables(inputs: StepInputs, inv_freq: torch.Tensor, dtype: torch.dtype, attention_factor: float = 1.0):
    """(cos, sin), each (b, 1, s, head_dim), for the step's positions: computed by the step's first
    attention layer and kept in `inputs.extra` for the others (one table per step, not per layer)."""
    tables = inputs.extra.get("rope")
    if tables is None:
        freqs = inputs.positions[..., None].float() * inv_freq.to(inputs.positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        tables = inputs.extra["rope"] = ((emb.cos() * attention_factor).to(dtype),  # yarn's factor; 1 otherwise
                                         (emb.sin() * attention_factor).to(dtype))
    return tables


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def embed(w, ids: torch.Tensor, inputs: StepInputs, *, spec: LlamaSpec) -> torch.Tensor:
    return embedding(ids, w["embed_tokens"])


def attention(w, x, inputs: StepInputs, kv, *, spec: LlamaSpec, inv_freq: torch.Tensor) -> torch.Tensor:
    residual = x
    x = rms_norm(x, w["ln.weight"], spec.rms_norm_eps)
    end = inputs.start + x.shape[1]
    if spec.sliding_window and end > spec.sliding_window:  # the engine refuses such prompts up front
        raise ModelError(f"{spec.name}: {end} positions exceed the sliding window ({spec.sliding_window}); "
                         "sliding-window attention is not supported")
    q, keys, values = queries_and_cache(w, x, inputs, kv, spec=spec, inv_freq=inv_freq)
    return attention_output(w, attend(q, keys, values, inputs.attn_bias)) + residual


def queries_and_cache(w, x, inputs: StepInputs, kv, *, spec: LlamaSpec, inv_freq: torch.Tensor):
    """(q, keys, values) for normed hidden states `x` (b, s, hidden): the queries (b, heads, s,
    head_dim) rotated and scaled by head_dim^-0.5; this step's keys (rotated) and values written into
    the KV buffers at `inputs.start`, and the buffers' views up to the last new token."""
    b, s, _ = x.shape
    end = inputs.start + s
    q, k = linear(x, w["q.weight"], w.get("q.bias")), linear(x, w["k.weight"], w.get("k.bias"))
    if spec.qk_norm_whole:  # OLMoE: over all heads' features at once
        q = rms_norm(q, w["q_norm.weight"], spec.rms_norm_eps)
        k = rms_norm(k, w["k_norm.weight"], spec.rms_norm_eps)
    q, k = q.view(b, s, spec.num_heads, spec.head_dim), k.view(b, s, spec.kv_heads, spec.head_dim)
    v = linear(x, w["v.weight"], w.get("v.bias")).view(b, s, spec.kv_heads, spec.head_dim)
    if spec.qk_norm:  # Qwen3: RMSNorm over each head's own features, before the rotation
        q = rms_norm(q, w["q_norm.weight"], spec.rms_norm_eps)
        k = rms_norm(k, w["k_norm.weight"], spec.rms_norm_eps)
    cos, sin = rotary_tables(inputs, inv_freq, x.dtype, spec.rope_attention_factor)
    q = _rotate(q.transpose(1, 2), cos, sin) * spec.head_dim ** -0.5
    k_buf, v_buf = kv
    k_buf[:, :, inputs.start:end] = _rotate(k.transpose(1, 2), cos, sin)
    v_buf[:, :, inputs.start:end] = v.transpose(1, 2)
    return q, k_buf[:, :, :end], v_buf[:, :, :end]


def attention_output(w, out: torch.Tensor) -> torch.Tensor:
    """The output projection of attention's result (b, heads, s, head_dim)."""
    b, _, s, _ = out.shape
    return linear(out.transpose(1, 2).reshape(b, s, -1), w["o.weight"], w.get("o.bias"))


def mlp(w, x, inputs: StepInputs, *, spec: LlamaSpec) -> torch.Tensor:
    h = rms_norm(x, w["ln.weight"], spec.rms_norm_eps)
    return linear(F.silu(linear(h, w["gate.weight"])) * linear(h, w["up.weight"]), w["down.weight"]) + x


def output_head(w, x, inputs: StepInputs, *, spec: LlamaSpec) -> torch.Tensor:
    """Logits of the last position only, in float32 (b, vocab); when scoring, the scores of the
    positions that predict `inputs.targets` (see `score_positions`)."""
    def logits_of(h):
        return linear(rms_norm(h, w["norm.weight"], spec.rms_norm_eps), w["lm_head"]).float()
    if inputs.targets is None:
        return logits_of(x[:, -1])
    return score_positions(x[:, -inputs.targets.shape[1]:], inputs.targets, logits_of, spec.vocab_size)


def matmul_entries(key: str, name: str, out_f: int, in_f: int, bias: bool = False) -> list[tuple]:
    entries = [(f"{key}.weight", f"{name}.weight", (out_f, in_f), True, True)]
    if bias:
        entries.append((f"{key}.bias", f"{name}.bias", (out_f,), False, False, "zeros"))
    return entries


def norm_entries(key: str, name: str, dim: int) -> list[tuple]:
    return [(key, name, (dim,), False, False, "ones")]


def attention_entries(spec: LlamaSpec) -> list[tuple]:
    """The (key, name, ...) entries of one block's attention layer (see `specs`)."""
    h, q_out, kv_out = spec.hidden_size, spec.num_heads * spec.head_dim, spec.kv_heads * spec.head_dim
    attn = (norm_entries("ln.weight", "input_layernorm.weight", h)
            + matmul_entries("q", "self_attn.q_proj", q_out, h, spec.qkv_bias)
            + matmul_entries("k", "self_attn.k_proj", kv_out, h, spec.qkv_bias)
            + matmul_entries("v", "self_attn.v_proj", kv_out, h, spec.qkv_bias)
            + matmul_entries("o", "self_attn.o_proj", h, q_out, spec.o_bias))
    if spec.qk_norm or spec.qk_norm_whole:
        q_dim, k_dim = (q_out, kv_out) if spec.qk_norm_whole else (spec.head_dim, spec.head_dim)
        attn += (norm_entries("q_norm.weight", "self_attn.q_norm.weight", q_dim)
                 + norm_entries("k_norm.weight", "self_attn.k_norm.weight", k_dim))
    return attn


def mlp_entries(spec: LlamaSpec, ffn_dim: int) -> list[tuple]:
    """The entries of a dense SwiGLU MLP layer of width `ffn_dim`."""
    h = spec.hidden_size
    return (norm_entries("ln.weight", "post_attention_layernorm.weight", h)
            + matmul_entries("gate", "mlp.gate_proj", ffn_dim, h) + matmul_entries("up", "mlp.up_proj", ffn_dim, h)
            + matmul_entries("down", "mlp.down_proj", h, ffn_dim))


def attention_layer(spec: LlamaSpec, i: int, inv_freq: torch.Tensor) -> Layer:
    return Layer(f"attn.{i}", specs(f"layers.{i}.", attention_entries(spec)),
                 partial(attention, spec=spec, inv_freq=inv_freq), spec.kv_heads, spec.head_dim, block=i)


def mlp_layer(spec: LlamaSpec, i: int, ffn_dim: int) -> Layer:
    return Layer(f"mlp.{i}", specs(f"layers.{i}.", mlp_entries(spec, ffn_dim)), partial(mlp, spec=spec), block=i)


def _block(spec: LlamaSpec, i: int, inv_freq: torch.Tensor) -> list[Layer]:
    return [attention_layer(spec, i, inv_freq), mlp_layer(spec, i, spec.ffn_dim)]


def build_layers(spec: LlamaSpec, first: int = 0, last: int | None = None,
                 with_embed: bool = True, with_head: bool = True, sep_layer: bool = True) -> list[Layer]:
    """Schedule layers for transformer blocks [first, last), optionally with embedding and head."""
    return layers_with_blocks(spec, _block, first, last, with_embed, with_head, sep_layer)


def layers_with_blocks(spec: LlamaSpec, block, first: int = 0, last: int | None = None, with_embed: bool = True,
                       with_head: bool = True, sep_layer: bool = True) -> list[Layer]:
    """`build_layers` with `block(spec, i, inv_freq)` building each transformer block's layers
    (a family sharing Llama's embedding, attention and head, with its own MLP)."""
    last = spec.num_layers if last is None else last
    table = (spec.vocab_size, spec.hidden_size)
    inv_freq = rope_inv_freq(spec)
    layers: list[Layer] = []
    if with_embed:
        entries = [("embed_tokens", "embed_tokens.weight", table, TABLE)]
        layers.append(Layer("embed", specs("", entries), partial(embed, spec=spec), part=EMBED))
    for i in range(first, last):
        parts = block(spec, i, inv_freq)
        layers.extend(parts if sep_layer else [merge_layers(f"block.{i}", parts)])
    if with_head:
        head = "embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        entries = norm_entries("norm.weight", "norm.weight", spec.hidden_size) + [("lm_head", head, table, TABLE, True)]
        layers.append(Layer("head", specs("", entries), partial(output_head, spec=spec), part=HEAD))
    return layers


def flops_per_token(spec: LlamaSpec, context: int) -> tuple[float, float]:
    """(block FLOPs, output-head FLOPs) of one new token attending to `context` tokens: 2 per
    matmul weight (GQA's narrower k/v projections included), QK^T and PV over the context."""
    h, q_out, kv_out = spec.hidden_size, spec.num_heads * spec.head_dim, spec.kv_heads * spec.head_dim
    weights = 2 * h * q_out + 2 * h * kv_out + 3 * h * spec.ffn_dim
    blocks = spec.num_layers * (2 * weights + 4 * q_out * context)
    return blocks, 2 * spec.vocab_size * h


def checkpoint_keys(spec: LlamaSpec) -> dict[str, tuple[str, ...]]:
    """Store name -> checkpoint key: `layers.3.mlp.up_proj.weight` is saved as
    `model.layers.3.mlp.up_proj.weight`; an untied output head as `lm_head.weight`. (Rotary buffers
    that old checkpoints saved are recomputed, never read.)"""
    keys = {w.name: (f"model.{w.name}",) for layer in build_layers(spec) for w in layer.weights}
    if "lm_head.weight" in keys:
        keys["lm_head.weight"] = ("lm_head.weight",)
    return keys
