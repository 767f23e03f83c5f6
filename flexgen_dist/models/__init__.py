"""models: one folder per family (`opt/`, `llama/`), each the plain math of its layers, its specs and
the explicit map of its weights to checkpoint keys (`base.Family`); where weights come from
(`checkpoint.py`); GGUF conversion (`fetch.py`). It knows nothing of tiers, files of the engine's own,
or ranks. May import: kernels, core."""
import torch

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
    return int(sum(torch.Size(s).numel() for s in shapes.values()) * bytes_per_value)


__all__ = ["BUILTIN", "FAMILIES", "ModelError", "ModelSpec", "builtin_spec", "family_of", "flops_per_token",
           "spec_from_dir", "spec_from_hf_config", "weight_bytes"]
