"""Model families: each is a module with `build_layers(spec, ...)` and `checkpoint_key_to_name(key)`."""
from . import opt
from .registry import BUILTIN, ModelError, ModelSpec, builtin_spec, spec_from_dir, spec_from_hf_config

FAMILIES = {"opt": opt}


def family_of(spec: ModelSpec):
    return FAMILIES[spec.family]


__all__ = ["BUILTIN", "FAMILIES", "ModelError", "ModelSpec", "builtin_spec", "family_of",
           "spec_from_dir", "spec_from_hf_config"]
