"""Llama-family specs: Hugging Face configs of model_type llama / mistral / qwen2 / qwen3, and the
built-in shapes of the sizes people run (for `--dummy-weights`, offline)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..base import ModelError, ModelSpec, eos_ids

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "llama3", "yarn")


@dataclass(frozen=True, kw_only=True)
class LlamaSpec(ModelSpec):
    """`max_positions` is what the engine may use: a sliding window smaller than the config's
    positions bounds it (sequences past the window are refused, not approximated)."""

    family: str = "llama"
    model_type: str = "llama"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "llama3" (Llama 3.1+): the next four fields; "yarn": factor, original
    rope_factor: float = 1.0  # max positions and the four yarn fields
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True  # yarn: round the blend's bounds to whole dimensions
    rope_attention_factor: float = 1.0  # yarn: cos and sin are scaled by it
    qkv_bias: bool = False  # Qwen2 always; Llama/Qwen3 when `attention_bias`
    o_bias: bool = False  # Llama/Qwen3 `attention_bias`
    qk_norm: bool = False  # Qwen3
    qk_norm_whole: bool = False  # OLMoE: q/k norms over the whole projection (all heads), not per head
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # set only when it is smaller than the config's positions
    config_max_positions: int = 0  # the config's max_position_embeddings where a window lowered max_positions



def rope_fields(config: dict, name: str) -> dict:
    """Rotary settings from either config format: transformers 5's `rope_parameters`, or the
    `rope_theta` + `rope_scaling` that checkpoints on the hub carry."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ModelError(f"{name}: rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelError(f"{name}: partial rotary embeddings (partial_rotary_factor) are not supported")
    out = {"rope_theta": float(theta), "rope_type": kind}
    if kind == "llama3":
        out.update(rope_factor=float(params["factor"]), rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_positions=int(params["original_max_position_embeddings"]))
    if kind == "yarn":
        out.update(_yarn_fields(params, config))
    return out


def _yarn_fields(params: dict, config: dict) -> dict:
    """YaRN's settings as transformers reads them: the factor defaults to the ratio of the context
    lengths, the attention factor to 0.1 ln(factor) + 1 (or the mscale ratio where both are set)."""
    original = int(params.get("original_max_position_embeddings") or config["max_position_embeddings"])
    factor = float(params.get("factor") or config["max_position_embeddings"] / original)
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else _yarn_mscale(factor)
    return dict(rope_factor=factor, rope_original_max_positions=original, rope_attention_factor=float(attention),
                rope_beta_fast=float(params.get("beta_fast") or 32), rope_beta_slow=float(params.get("beta_slow") or 1),
                rope_truncate=bool(params.get("truncate", True)))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def sliding_window_of(config: dict) -> int | None:
    """The sliding window that really applies: Mistral's when set; Qwen's only with use_sliding_window."""
    window = config.get("sliding_window")
    if config["model_type"].startswith("qwen"):
        layer_types = config.get("layer_types") or []
        sliding = config.get("use_sliding_window", False) and (not layer_types or "sliding_attention" in layer_types)
        window = window if sliding else None
    return window if window and window < config["max_position_embeddings"] else None


def refuse_unsupported(config: dict, name: str) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{name}: MLP activation {config['hidden_act']!r} is not supported (only silu)")
    if config.get("mlp_bias"):
        raise ModelError(f"{name}: MLP biases (mlp_bias) are not supported")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ModelError(f"{name}: pre-quantized checkpoints ({method}) are not supported; use float weights")


def spec_from_config(config: dict, name: str) -> LlamaSpec:
    """A Llama / Mistral / Qwen2 / Qwen3 `config.json` -> LlamaSpec (ModelError on what it cannot run)."""
    refuse_unsupported(config, name)
    kind = config["model_type"]
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    bias = bool(config.get("attention_bias", False))
    window = sliding_window_of(config)
    eos = eos_ids(config.get("eos_token_id"))
    return LlamaSpec(
        name=name, model_type=kind, vocab_size=config["vocab_size"], hidden_size=hidden,
        ffn_dim=config["intermediate_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads, head_size=config.get("head_dim") or hidden // heads,
        max_positions=min(config["max_position_embeddings"], window or config["max_position_embeddings"]),
        pad_token_id=config.get("pad_token_id"), bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos[0] if eos else None, eos_token_ids=eos, rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        qkv_bias=kind == "qwen2" or bias, o_bias=kind != "qwen2" and bias, qk_norm=kind == "qwen3",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        sliding_window=window, config_max_positions=config["max_position_embeddings"] if window else 0,
        **rope_fields(config, name))


LLAMA3_ROPE = dict(rope_theta=500000.0, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                   rope_high_freq_factor=4.0, rope_original_max_positions=8192)
LLAMA31 = dict(vocab_size=128256, max_positions=131072, bos_token_id=128000, eos_token_id=128001,
               eos_token_ids=(128001, 128008, 128009), **LLAMA3_ROPE)
LLAMA32 = {**LLAMA31, "rope_factor": 32.0, "tie_word_embeddings": True}
QWEN25 = dict(model_type="qwen2", vocab_size=152064, max_positions=131072, rope_theta=1e6, rms_norm_eps=1e-6,
              qkv_bias=True, bos_token_id=151643, eos_token_id=151643, eos_token_ids=(151643,))


def _llama(name: str, hidden: int, ffn: int, layers: int, heads: int, kv: int, **extra) -> LlamaSpec:
    return LlamaSpec(name=name, hidden_size=hidden, ffn_dim=ffn, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, head_size=hidden // heads, **extra)


BUILTIN = [
    _llama("llama-3.1-8b", 4096, 14336, 32, 32, 8, **LLAMA31),
    _llama("llama-3.1-70b", 8192, 28672, 80, 64, 8, **LLAMA31),
    _llama("llama-3.1-405b", 16384, 53248, 126, 128, 8, **LLAMA31),
    _llama("llama-3.2-1b", 2048, 8192, 16, 32, 8, **LLAMA32),
    _llama("llama-3.2-3b", 3072, 8192, 28, 24, 8, **LLAMA32),
    _llama("qwen2.5-7b", 3584, 18944, 28, 28, 4, **QWEN25),
    _llama("qwen2.5-72b", 8192, 29568, 80, 64, 8, **{**QWEN25, "rms_norm_eps": 1e-5}),
    _llama("mistral-7b", 4096, 14336, 32, 32, 8, model_type="mistral", vocab_size=32000, max_positions=4096,
           sliding_window=4096, config_max_positions=32768, bos_token_id=1, eos_token_id=2, eos_token_ids=(2,)),
    _llama("smollm2-135m", 576, 1536, 30, 9, 3, vocab_size=49152, max_positions=8192, rope_theta=100000.0,
           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, eos_token_ids=(2,), pad_token_id=2),
]


def to_hf_config(spec: LlamaSpec) -> dict:
    """A Hugging Face `config.json` dict for `spec` (what `spec_from_config` reads back): lets a
    benchmark write a dummy checkpoint that transformers and this engine load alike."""
    rope = {"rope_theta": spec.rope_theta, "rope_type": spec.rope_type}
    if spec.rope_type == "llama3":
        rope.update(factor=spec.rope_factor, low_freq_factor=spec.rope_low_freq_factor,
                    high_freq_factor=spec.rope_high_freq_factor,
                    original_max_position_embeddings=spec.rope_original_max_positions)
    if spec.rope_type == "yarn":
        rope.update(yarn_parameters(spec))
    config = {"model_type": spec.model_type, "architectures": [_ARCHITECTURES[spec.model_type]],
              "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "intermediate_size": spec.ffn_dim,
              "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
              "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim, "hidden_act": "silu",
              "max_position_embeddings": spec.config_max_positions or spec.max_positions, "rms_norm_eps": spec.rms_norm_eps,
              "rope_theta": spec.rope_theta, "rope_scaling": rope if spec.rope_type != "default" else None,
              "attention_bias": spec.o_bias or (spec.qkv_bias and spec.model_type != "qwen2"),
              "tie_word_embeddings": spec.tie_word_embeddings, "sliding_window": spec.sliding_window,
              "bos_token_id": spec.bos_token_id, "pad_token_id": spec.pad_token_id,
              "eos_token_id": list(spec.eos_token_ids) if len(spec.eos_token_ids) > 1 else spec.eos_token_id}
    return config


def yarn_parameters(spec: LlamaSpec) -> dict:
    """The `rope_scaling` fields of a yarn spec (what `_yarn_fields` reads back)."""
    return dict(factor=spec.rope_factor, original_max_position_embeddings=spec.rope_original_max_positions,
                attention_factor=spec.rope_attention_factor, beta_fast=spec.rope_beta_fast,
                beta_slow=spec.rope_beta_slow, truncate=spec.rope_truncate)


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
