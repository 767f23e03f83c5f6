"""Model specs: the shape of a model, from a built-in table or a Hugging Face config.json.

Each family folder (see `base.Family`) lists the `model_type`s it reads and its built-in configs;
this module only dispatches."""
from __future__ import annotations

import json
import os

from .base import Family, ModelError, ModelSpec
from .gpt_oss import FAMILY as GPT_OSS
from .llama import FAMILY as LLAMA
from .moe import FAMILY as MOE
from .opt import FAMILY as OPT

FAMILIES: dict[str, Family] = {f.name: f for f in (OPT, LLAMA, MOE, GPT_OSS)}
_BY_MODEL_TYPE = {t: family for family in FAMILIES.values() for t in family.model_types}

BUILTIN: dict[str, ModelSpec] = {s.name: s for family in FAMILIES.values() for s in family.builtin}


def family_of(spec: ModelSpec) -> Family:
    """The family that builds `spec`'s layers."""
    return FAMILIES[spec.family]


def builtin_spec(name: str) -> ModelSpec | None:
    """The built-in spec for `opt-1.3b`, `facebook/opt-1.3b` or `meta-llama/Llama-3.1-8B`, or None."""
    return BUILTIN.get(name.split("/")[-1].lower())


def spec_from_hf_config(config: dict, name: str) -> ModelSpec:
    """Translate a Hugging Face `config.json` dict into its family's ModelSpec."""
    model_type = config.get("model_type")
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        known = ", ".join(f"{f} (model_type {', '.join(m.model_types)})" for f, m in FAMILIES.items())
        raise ModelError(f"{name} is a '{model_type}' model; supported families: {known}")
    return family.spec_from_config(config, name)


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
