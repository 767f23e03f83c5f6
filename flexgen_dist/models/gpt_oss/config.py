"""gpt-oss specs: Hugging Face configs of model_type gpt_oss, and the built-in shapes of
gpt-oss-20b and gpt-oss-120b (for `--dummy-weights`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..base import ModelError, eos_ids
from ..llama.config import rope_fields
from ..moe.config import MoeSpec, refuse_bad_top_k

MODEL_TYPES = ("gpt_oss",)
LAYER_TYPES = ("sliding_attention", "full_attention")
QUANTIZATIONS = ("mxfp4",)  # the experts as OpenAI released them; dequantized when the store is built


@dataclass(frozen=True, kw_only=True)
class GptOssSpec(MoeSpec):
    """A mixture of experts with attention sinks (one learned logit per head) and, on the blocks in
    `sliding_blocks`, attention over the last `attention_window` positions only; a router with a
    bias whose top-k logits are softmaxed; experts whose SwiGLU is clamped at `swiglu_limit` and
    carries biases. Every block is sparse."""

    family: str = "gpt_oss"
    model_type: str = "gpt_oss"
    attention_window: int = 128
    sliding_blocks: tuple[int, ...] = ()
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def window_of(self, block: int) -> int | None:
        """The attention window of block `block`, None where it attends to every position."""
        return self.attention_window if block in self.sliding_blocks else None


def _layer_types(config: dict, name: str) -> list[str]:
    layers = config["num_hidden_layers"]
    types = config.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                          for i in range(layers)]
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown or len(types) != layers:
        raise ModelError(f"{name}: layer_types {unknown[0] if unknown else types!r} is not supported "
                         f"(supported: {', '.join(LAYER_TYPES)}, one per layer)")
    return types


def _refuse_variants(config: dict, name: str) -> None:
    quantization = config.get("quantization_config") or {}
    method = quantization.get("quant_method")
    if quantization and method not in QUANTIZATIONS:
        raise ModelError(f"{name}: pre-quantized checkpoints ({method}) are not supported "
                         f"(supported: float weights, {', '.join(QUANTIZATIONS)} experts)")
    refuse_bad_top_k(config.get("num_local_experts"), config.get("num_experts_per_tok"), name)


def spec_from_config(config: dict, name: str) -> GptOssSpec:
    """A gpt-oss `config.json` -> GptOssSpec (ModelError on what it cannot run)."""
    _refuse_variants(config, name)
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    bias = bool(config.get("attention_bias", True))
    eos = eos_ids(config.get("eos_token_id"))
    types = _layer_types(config, name)
    return GptOssSpec(
        name=name, vocab_size=config["vocab_size"], hidden_size=hidden, ffn_dim=config["intermediate_size"],
        moe_ffn_dim=config["intermediate_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads, head_size=config.get("head_dim") or hidden // heads,
        max_positions=config["max_position_embeddings"], pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"), eos_token_id=eos[0] if eos else None, eos_token_ids=eos,
        rms_norm_eps=config.get("rms_norm_eps", 1e-5), tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bias, o_bias=bias, num_experts=config["num_local_experts"],
        experts_per_tok=config["num_experts_per_tok"], attention_window=config.get("sliding_window") or 128,
        sliding_blocks=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
        swiglu_alpha=float(config.get("swiglu_alpha", 1.702)), swiglu_limit=float(config.get("swiglu_limit", 7.0)),
        **rope_fields(config, name))


def _gpt_oss(name: str, layers: int, experts: int) -> GptOssSpec:
    return GptOssSpec(name=name, vocab_size=201088, hidden_size=2880, ffn_dim=2880, moe_ffn_dim=2880,
                      num_layers=layers, num_heads=64, num_kv_heads=8, head_size=64, max_positions=131072,
                      rms_norm_eps=1e-5, qkv_bias=True, o_bias=True, num_experts=experts, experts_per_tok=4,
                      attention_window=128, sliding_blocks=tuple(range(0, layers, 2)), rope_theta=150000.0,
                      rope_type="yarn", rope_factor=32.0, rope_original_max_positions=4096, rope_truncate=False,
                      rope_attention_factor=0.1 * math.log(32.0) + 1, pad_token_id=199999, bos_token_id=199998,
                      eos_token_id=200002, eos_token_ids=(200002, 199999, 200012))


BUILTIN = [_gpt_oss("gpt-oss-20b", 24, 32), _gpt_oss("gpt-oss-120b", 36, 128)]
