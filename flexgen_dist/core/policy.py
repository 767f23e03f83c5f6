"""The placement policy as data: where weights, KV cache and activations live, how batches are formed.
(The planner that chooses one lives in `planning`: `flexgen_dist.auto_policy`.)"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from .compression import CompressionConfig
from .errors import FlexGenError
from .types import Tier

# the six numbers of `--percent`, in its order: weights, KV cache, activations on the compute device
# and in host memory (the rest of each pair on disk)
PERCENT_FIELDS = ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                  "act_gpu_percent", "act_cpu_percent")


class PolicyError(FlexGenError):
    pass


@dataclass(kw_only=True)
class Policy:
    """FlexGen's policy. Each `*_gpu_percent`/`*_cpu_percent` pair leaves the rest to disk."""

    gpu_batch_size: int = 4
    """Sequences per batch that the compute device works on at once."""
    num_gpu_batches: int = 1
    """Batches per block; each layer's weights are loaded once per block (effective batch = product)."""
    w_gpu_percent: float = 100
    """Percent of each layer's weight bytes homed on the compute device."""
    w_cpu_percent: float = 0
    """Percent of each layer's weight bytes homed in host memory (the rest on disk)."""
    cache_gpu_percent: float = 100
    """Percent of the sequences whose KV cache lives on the compute device."""
    cache_cpu_percent: float = 0
    """Percent of the sequences whose KV cache lives in host memory (the rest on disk)."""
    act_gpu_percent: float = 100
    """Activations between layers on the compute device (0 or 100)."""
    act_cpu_percent: float = 0
    """Activations between layers in host memory (0 or 100; neither = disk)."""
    experts_gpu_percent: float | None = None
    """Percent of each MoE layer's experts homed on the compute device, whole experts (default: the
    weights' percent). Attention, router and shared expert follow the weights' percents."""
    experts_cpu_percent: float | None = None
    """Percent of each MoE layer's experts homed in host memory (the rest on disk; default: the
    weights' percent)."""
    expert_cache_gib: float | None = None
    """GiB of the compute device's memory that keeps routed experts homed on slower tiers (disk;
    host memory too when computing on a GPU) once read, keeping those used most; a cached expert
    costs no read (default: what the memory budget leaves after the rest of the plan; 0: no
    cache)."""
    overlap: bool = True
    """Prefetch weights and cache and store new KV on I/O threads while computing."""
    sep_layer: bool = True
    """Schedule attention and MLP as separate layers (finer-grained prefetch)."""
    pin_weight: bool = True
    """Pin host-homed weights when the compute device is a GPU (faster copies, more locked RAM)."""
    cpu_cache_compute: bool = False
    """Run decode attention on the CPU where the cache lives (only differs from the default on a GPU)."""
    compress_weight: bool = False
    """Store matmul weights as group-wise quantized codes on every tier; decompress just before use."""
    compress_embeddings: bool = False
    """With --compress-weight, quantize the vocabulary tables too (token and position embeddings,
    output head). Off by default, as most 4-bit formats keep them 16-bit: a small share of a large
    model's bytes and a large share of its quantization error (benchmark/RESULTS.md)."""
    compress_cache: bool = False
    """Store the KV cache quantized on every tier; compress on store, decompress on load."""
    compress_bits: Literal[4, 8] = 4
    """Bits per compressed value."""
    compress_group_size: int = 64
    """Values per compression group (each with its own minimum and step)."""

    def weight_compression(self) -> CompressionConfig | None:
        """Weights are grouped along their input dimension (dim 1), as the int4 matmul kernels read
        them (FlexGen groups output channels, dim 0; benchmark/RESULTS.md compares the two)."""
        if not self.compress_weight:
            return None
        return CompressionConfig(self.compress_bits, self.compress_group_size, dim=1, tables=self.compress_embeddings)

    def cache_compression(self) -> CompressionConfig | None:
        """The cache is grouped along head_dim (set per layer; dim here is a placeholder)."""
        return CompressionConfig(self.compress_bits, self.compress_group_size, dim=-1) if self.compress_cache else None

    @classmethod
    def from_percent(cls, percent, **kwargs) -> "Policy":
        if len(percent) != 6:
            raise PolicyError(f"--percent takes 6 numbers, got {len(percent)}")
        return cls(**dict(zip(PERCENT_FIELDS, percent)), **kwargs)

    @property
    def percent(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in PERCENT_FIELDS)

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def validate(self, name=str) -> "Policy":
        """Self, or a PolicyError in one line naming the field as `name(field)` does (the command
        line names its flags)."""
        for field_name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise PolicyError(f"{name(field_name)} must be a positive integer, got {value!r}")
        for kind in ("w", "cache", "act", "experts"):
            gpu, cpu = self.tier_percents(kind)[:2]
            for value in (gpu, cpu):
                if not 0 <= value <= 100:
                    raise PolicyError(f"{kind} percent {value:g} is outside 0-100")
            if gpu + cpu > 100:
                raise PolicyError(f"{kind} percents {gpu:g} + {cpu:g} sum to more than 100")
        if self.expert_cache_gib is not None and not self.expert_cache_gib >= 0:
            raise PolicyError(f"{name('expert_cache_gib')} must be 0 or more GiB, got {self.expert_cache_gib!r}")
        if self.compress_weight or self.compress_cache:
            CompressionConfig(self.compress_bits, self.compress_group_size)  # raises on bad values
        if not any(p == 100 for p in self.tier_percents("act")):
            raise PolicyError("activations must be 100% on one tier (act percents "
                              f"{self.act_gpu_percent:g} {self.act_cpu_percent:g})")
        return self

    def tier_percents(self, kind: str) -> tuple[float, float, float]:
        """(compute, host, disk) percents for 'w', 'cache', 'act' or 'experts' (the weights' unless set)."""
        gpu, cpu = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
        if kind == "experts":
            w_gpu, w_cpu = self.w_gpu_percent, self.w_cpu_percent
            gpu, cpu = (w_gpu if gpu is None else gpu), (w_cpu if cpu is None else cpu)
        return gpu, cpu, 100 - gpu - cpu

    @property
    def act_tier(self) -> Tier:
        return [Tier.COMPUTE, Tier.HOST, Tier.DISK][self.tier_percents("act").index(100)]

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def assign_weight_tiers(sizes: list[int], percents: tuple[float, float, float]) -> list[Tier]:
    """FlexGen's rule: a tensor goes where the midpoint of its cumulative byte range falls,
    with the layer's bytes laid out disk first, then host, then compute."""
    gpu, cpu, disk = percents
    total = sum(sizes) or 1
    bounds = [(disk, Tier.DISK), (disk + cpu, Tier.HOST), (100.0, Tier.COMPUTE)]
    tiers, cumulative = [], 0
    for size in sizes:
        mid = (cumulative + size / 2) / total * 100
        cumulative += size
        tiers.append(next(t for bound, t in bounds if mid < bound or t is Tier.COMPUTE))
    return tiers


def weight_homes(layers, policy: Policy, size) -> dict[str, Tier]:
    """Every weight's home tier, as the executor places them: FlexGen's rule (`assign_weight_tiers`)
    applied layer by layer to the bytes `size(weight_spec)` each takes where it lives; a weight
    two layers share (a tied embedding) is homed once, by the first. A layer's routed experts are
    placed apart, whole experts by the experts' percents, each expert's tensors on one tier. In
    layer order."""
    homes: dict[str, Tier] = {}
    for layer in layers:
        dense = [w for w in layer.weights if w.expert is None]
        for w, tier in zip(dense, assign_weight_tiers([size(w) for w in dense], policy.tier_percents("w"))):
            homes.setdefault(w.name, tier)
        experts: dict[int, list] = {}
        for w in layer.weights:
            if w.expert is not None:
                experts.setdefault(w.expert, []).append(w)
        sizes = [sum(size(w) for w in ws) for ws in experts.values()]
        for ws, tier in zip(experts.values(), assign_weight_tiers(sizes, policy.tier_percents("experts"))):
            for w in ws:
                homes.setdefault(w.name, tier)
    return homes


def split_rows(rows: int, percents: tuple[float, float, float]) -> list[tuple[Tier, int, int]]:
    """Split a batch of `rows` sequences into (tier, start, end) segments, compute first, then
    host, then disk; each tier gets whole sequences (rounded down, the rest goes to disk)."""
    gpu, cpu, _ = percents
    n_gpu = int(rows * gpu / 100)
    n_host = int(rows * (gpu + cpu) / 100) - n_gpu
    cuts = [(Tier.COMPUTE, 0, n_gpu), (Tier.HOST, n_gpu, n_gpu + n_host), (Tier.DISK, n_gpu + n_host, rows)]
    return [(tier, a, b) for tier, a, b in cuts if b > a]
