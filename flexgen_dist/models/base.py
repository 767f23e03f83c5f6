"""What every model family provides: per-layer weight specs and plain layer math.

A family never sees tiers, files or ranks. The executor hands each layer a dict of weight tensors
already on the compute device, the hidden states, and (for attention layers) a KV buffer to append to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class WeightSpec:
    """One stored tensor: `key` is the layer-local name the math uses, `name` the store-wide name."""

    key: str
    name: str
    shape: tuple[int, ...]
    compressible: bool = False  # matmul weights only; never LayerNorm parameters or biases
    linear: bool = False  # used as a `kernels.linear` weight (may be packed for the device)


@dataclass(frozen=True)
class StepInputs:
    """Per (token step, batch) tensors shared by every layer of the step."""

    positions: torch.Tensor  # (b, s) position ids of the new tokens
    attn_bias: torch.Tensor  # (b, 1, s, start + s) additive mask: 0 where visible, dtype-min elsewhere
    start: int  # index in the KV buffer of the first new token


@dataclass
class Layer:
    """One schedule layer: its weights and its math.

    `forward(weights, x, inputs, kv)` returns the new hidden states. Layers with `kv_heads` set
    receive `kv = (k_buf, v_buf)`, each `(b, kv_heads, capacity, head_dim)`; they write the new
    tokens' keys/values at `[:, :, start:start+s]` and attend over `[:, :, :start+s]`.
    """

    name: str
    weights: list[WeightSpec]
    forward: Callable
    kv_heads: int = 0
    head_dim: int = 0
    parts: list["Layer"] = field(default_factory=list)

    @property
    def has_cache(self) -> bool:
        return self.kv_heads > 0


def merge_layers(name: str, parts: list[Layer]) -> Layer:
    """Run several layers as one schedule layer (FlexGen's `--sep-layer 0`)."""
    weights = [WeightSpec(f"{i}.{w.key}", w.name, w.shape, w.compressible, w.linear)
               for i, p in enumerate(parts) for w in p.weights]
    cached = [p for p in parts if p.has_cache]
    assert len(cached) <= 1, "a merged layer holds at most one KV cache"

    def forward(weights, x, inputs, kv=None):
        for i, part in enumerate(parts):
            mine = {k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == str(i)}
            x = part.forward(mine, x, inputs, kv) if part.has_cache else part.forward(mine, x, inputs)
        return x

    return Layer(name, weights, forward, kv_heads=cached[0].kv_heads if cached else 0,
                 head_dim=cached[0].head_dim if cached else 0, parts=parts)
