"""Model specs: the shape of a model, from a built-in table or a Hugging Face config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from ..errors import FlexGenError


class ModelError(FlexGenError):
    """A model name, path or config the engine cannot use."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything the engine needs to know about a model's architecture."""

    name: str
    family: str = "opt"
    vocab_size: int = 50272
    hidden_size: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    max_positions: int = 2048
    word_embed_proj_dim: int | None = None  # differs from hidden_size only in OPT-350m
    do_layer_norm_before: bool = True  # False only in OPT-350m (post-LayerNorm)
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    layer_norm_eps: float = 1e-5

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _opt(name: str, hidden: int, layers: int, heads: int, **extra) -> ModelSpec:
    return ModelSpec(name=name, hidden_size=hidden, ffn_dim=4 * hidden, num_layers=layers,
                     num_heads=heads, **extra)


BUILTIN: dict[str, ModelSpec] = {
    s.name: s
    for s in [
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
}


def builtin_spec(name: str) -> ModelSpec | None:
    """The built-in spec for `opt-1.3b` or `facebook/opt-1.3b`, or None."""
    return BUILTIN.get(name.split("/")[-1].lower())


def spec_from_hf_config(config: dict, name: str) -> ModelSpec:
    """Translate a Hugging Face `config.json` dict into a ModelSpec."""
    model_type = config.get("model_type")
    if model_type != "opt":
        raise ModelError(f"{name} is a '{model_type}' model; supported families: opt")
    if config.get("activation_function", "relu") != "relu":
        raise ModelError(f"{name}: activation {config['activation_function']!r} is not supported")
    if not config.get("enable_bias", True) or not config.get("layer_norm_elementwise_affine", True):
        raise ModelError(f"{name}: OPT without biases or LayerNorm affine parameters is not supported")
    hidden = config["hidden_size"]
    proj = config.get("word_embed_proj_dim", hidden)
    return ModelSpec(
        name=name,
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        ffn_dim=config["ffn_dim"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        max_positions=config["max_position_embeddings"],
        word_embed_proj_dim=proj if proj != hidden else None,
        do_layer_norm_before=config.get("do_layer_norm_before", True),
        pad_token_id=config.get("pad_token_id", 1),
        bos_token_id=config.get("bos_token_id", 2),
        eos_token_id=config.get("eos_token_id", 2),
    )


def spec_from_dir(path: str) -> ModelSpec:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ModelError(f"{path} has no config.json; not a Hugging Face model directory")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_path} is not valid JSON: {e}") from None
    return spec_from_hf_config(config, os.path.basename(os.path.normpath(path)))


def spec_to_dict(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)
