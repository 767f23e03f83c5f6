"""OPT (all variants, including OPT-350m's post-LayerNorm layout with project_in/out).

Plain math over tensors, laid out as Hugging Face's `OPTForCausalLM` computes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..kernels import embedding, linear
from .attention import attend
from .base import (
    EMBED,
    HEAD,
    TABLE,
    Layer,
    ModelError,
    ModelSpec,
    StepInputs,
    eos_ids,
    merge_layers,
    specs,
)

POSITION_OFFSET = 2  # OPT's learned positions start at index 2
MODEL_TYPES = ("opt",)


@dataclass(frozen=True, kw_only=True)
class OPTSpec(ModelSpec):
    family: str = "opt"
    vocab_size: int = 50272
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    eos_token_ids: tuple[int, ...] = (2,)
    word_embed_proj_dim: int | None = None  # differs from hidden_size only in OPT-350m
    do_layer_norm_before: bool = True  # False only in OPT-350m (post-LayerNorm)
    layer_norm_eps: float = 1e-5

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size


SPEC = OPTSpec


def _opt(name: str, hidden: int, layers: int, heads: int, **extra) -> OPTSpec:
    return OPTSpec(name=name, hidden_size=hidden, ffn_dim=4 * hidden, num_layers=layers, num_heads=heads, **extra)


BUILTIN = [
    _opt("opt-125m", 768, 12, 12),
    _opt("opt-350m", 1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    _opt("opt-1.3b", 2048, 24, 32),
    _opt("opt-2.7b", 2560, 32, 32),
    _opt("opt-6.7b", 4096, 32, 32),
    _opt("opt-13b", 5120, 40, 40),
    _opt("opt-30b", 7168, 48, 56),
    _opt("opt-66b", 9216, 64, 72),
    _opt("opt-175b", 12288, 96, 96),
    _opt("opt-iml-1.3b", 2048, 24, 32),
    _opt("opt-iml-30b", 7168, 48, 56),
    _opt("opt-iml-max-1.3b", 2048, 24, 32),
    _opt("opt-iml-max-30b", 7168, 48, 56),
]


def spec_from_config(config: dict, name: str) -> OPTSpec:
    """An OPT `config.json` -> OPTSpec."""
    if config.get("activation_function", "relu") != "relu":
        raise ModelError(f"{name}: activation {config['activation_function']!r} is not supported")
    if not config.get("enable_bias", True) or not config.get("layer_norm_elementwise_affine", True):
        raise ModelError(f"{name}: OPT without biases or LayerNorm affine parameters is not supported")
    hidden = config["hidden_size"]
    proj = config.get("word_embed_proj_dim", hidden)
    eos = config.get("eos_token_id", 2)
    return OPTSpec(
        name=name, vocab_size=config["vocab_size"], hidden_size=hidden, ffn_dim=config["ffn_dim"],
        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        max_positions=config["max_position_embeddings"], word_embed_proj_dim=proj if proj != hidden else None,
        do_layer_norm_before=config.get("do_layer_norm_before", True), pad_token_id=config.get("pad_token_id", 1),
        bos_token_id=config.get("bos_token_id", 2), eos_token_id=eos_ids(eos)[0] if eos_ids(eos) else None,
        eos_token_ids=eos_ids(eos))


def flops_per_token(spec: OPTSpec, context: int) -> tuple[float, float]:
    """(block FLOPs, output-head FLOPs) of one new token attending to `context` tokens: 2 per
    weight for the matmuls (bias-free count), QK^T and PV over the context."""
    h = spec.hidden_size
    blocks = 2 * spec.num_layers * (4 * h * h + 2 * h * spec.ffn_dim) + 4 * spec.num_layers * h * context
    return blocks, 2 * spec.vocab_size * spec.embed_dim


def checkpoint_key_to_name(key: str) -> str | None:
    """Map a Hugging Face state-dict key to our store name (None for keys we do not keep)."""
    key = key.removeprefix("model.")
    if key == "lm_head.weight":
        return None  # tied to decoder.embed_tokens.weight
    return key


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
    """Logits of the last position only, in float32 (b, vocab)."""
    x = x[:, -1]
    if "ln.weight" in w:
        x = _ln(x, w, "ln", spec.layer_norm_eps)
    if "project_out" in w:
        x = linear(x, w["project_out"])
    return linear(x, w["embed_tokens"]).float()


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
