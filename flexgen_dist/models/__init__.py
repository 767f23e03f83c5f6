"""Model families: each is a module in this package (see `base.py` for what one provides)."""
from .registry import (
    BUILTIN,
    FAMILIES,
    ModelError,
    ModelSpec,
    builtin_spec,
    family_of,
    spec_from_dir,
    spec_from_hf_config,
)


def flops_per_token(spec: ModelSpec, context: int) -> tuple[float, float]:
    """(transformer-block FLOPs, output-head FLOPs) of one new token attending to `context` tokens."""
    return family_of(spec).flops_per_token(spec, context)


def weight_bytes(spec: ModelSpec, bytes_per_value: float = 2.0) -> int:
    """Bytes of one copy of every stored weight (a tied embedding counted once)."""
    layers = family_of(spec).build_layers(spec)
    shapes = {w.name: w.shape for layer in layers for w in layer.weights}
    return int(sum(_numel(s) for s in shapes.values()) * bytes_per_value)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


__all__ = ["BUILTIN", "FAMILIES", "ModelError", "ModelSpec", "builtin_spec", "family_of", "flops_per_token",
           "spec_from_dir", "spec_from_hf_config", "weight_bytes"]
