"""OPT specs: Hugging Face configs of model_type opt, and the built-in sizes (for `--dummy-weights`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import ModelError, ModelSpec, eos_ids

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
