"""The cost of the block schedule, predicted from a hardware profile: plain arithmetic, no model run.

For every schedule layer and token step the executor loads the layer's weights once, then for
each of the `num_gpu_batches` batches loads its KV cache, computes, and stores the new KV. With
`overlap`, loads and stores run on I/O threads while the compute thread works, so a layer costs
as much as its busiest resource:

- `compute`: the matmuls, attention and per-layer fixed cost on the compute device, plus, on a CPU,
  every conversion the CPU does (dequantizing weights and cache, staging cache rows, quantizing
  new KV), since those run on the same cores;
- `disk`: weight and cache reads, cache and activation writes;
- `link`: host <-> GPU copies (no GPU: nothing crosses a link).

Without overlap the resources add up. Costs are linear in the placement fractions, which is what
lets the planner hand them to a linear program (see `planner.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..core.compression import compresses
from ..core.policy import Policy, weight_homes
from ..core.types import Tier, dtype_name
from ..models.base import BLOCK, HEAD, Layer
from ..runtime.budget import cacheable_expert_bytes, expert_cache_bytes, runs_together
from ..storage.kvcache import kv_token_bytes
from ..storage.store import stored_nbytes
from .measure import DECODE_CONTEXT, PREFILL_TOKENS
from .profile import (
    HardwareProfile,
    choice_key,
    disk_key,
    layer_key,
    layer_kind,
    overhead_key,
)

RESOURCES = ("compute", "disk", "link")


UNMEASURED_DISK_RATE = 100e6  # bytes/s


COMM_LATENCY_S = 2e-4  # one hidden-state message between ranks, beyond its bytes


@dataclass(frozen=True)
class Placement:
    """Fractions of a layer's stored weight bytes and of each batch's cache rows per tier
    (compute, host, disk), each triple summing to 1. `staged`: whether the cache is copied into a
    compute-side buffer for each use (None: as the executor decides, i.e. unless it is all on the
    compute device and uncompressed); the planner fixes it to keep costs linear."""

    weights: tuple[float, float, float] = (1.0, 0.0, 0.0)
    cache: tuple[float, float, float] = (1.0, 0.0, 0.0)
    staged: bool | None = None
    expert_hits: float = 0.0  # share of routed-expert uses that the expert cache serves (no read)

    @classmethod
    def of(cls, policy: Policy) -> "Placement":
        return cls(tuple(p / 100 for p in policy.tier_percents("w")),
                   tuple(p / 100 for p in policy.tier_percents("cache")))


@dataclass(frozen=True)
class Machine:
    """What the cost model needs to know of one rank: its profile, whether its compute device is
    the CPU, and where its offload dir is (whose disk it measures)."""

    profile: HardwareProfile
    cpu: bool
    offload_dir: str
    spec: object  # the model's spec (its per-layer fixed cost is measured per model shape)

    def disk_s(self, read: float, write: float) -> float:
        """Seconds for these bytes; a disk too full to measure is priced as a slow one."""
        rates = self.profile.rates
        return read / rates.get(disk_key(self.offload_dir, "read"), UNMEASURED_DISK_RATE) + \
            write / rates.get(disk_key(self.offload_dir, "write"), UNMEASURED_DISK_RATE)


@dataclass(frozen=True)
class Step:
    """One token step of one batch: `rows` sequences, `new` tokens each, `context` tokens attended
    (including the new ones)."""

    rows: int
    new: int
    context: int


def elem(dtype: torch.dtype) -> int:
    return dtype.itemsize


def stored_bytes(layer: Layer, policy: Policy, dtype: torch.dtype) -> list[int]:
    """Each weight's bytes as stored (compressed where the policy compresses it)."""
    return [stored_nbytes(w, dtype, policy.weight_compression()) for w in layer.weights]


def experts_touched(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts that `tokens` tokens route to, each choosing `top_k` of
    `num_experts` (uniformly, independently): E * (1 - (1 - k/E)^tokens)."""
    if not num_experts:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def used_shares(layer: Layer, tokens: float) -> list[float]:
    """Per weight of `layer`, the expected share of its uses that read it when `tokens` tokens pass
    the layer: 1 for dense weights, experts touched / experts for a routed expert's."""
    experts = layer.num_experts
    share = experts_touched(experts, layer.top_k, tokens) / experts if experts else 1.0
    return [1.0 if w.expert is None else share for w in layer.weights]


def expert_hit_rate(layers: list[Layer], policy: Policy, dtype: torch.dtype, cpu: bool) -> float:
    """The expected share of routed-expert uses the expert cache serves on this stage: the share of
    the cacheable experts' bytes it holds. Routing taken as uniform and independent (as in
    `experts_touched`), a cache that keeps a stable set of experts (`runtime/expertcache.py`)
    serves each touched expert with that probability, whatever the batch; skewed routing, as real
    routers have, does better, so this is the pessimistic side."""
    cacheable = cacheable_expert_bytes(layers, policy, dtype, cpu)
    return expert_cache_bytes(layers, policy, dtype, cpu) / cacheable if cacheable else 0.0


def realized_placement(layer: Layer, homes: dict[str, Tier], policy: Policy, dtype: torch.dtype) -> Placement:
    """The fractions the executor really gives this layer: whole tensors go to one tier each,
    `homes` (of the stage's weights, `weight_homes`): a tied weight lives where its first layer put it."""
    sizes = stored_bytes(layer, policy, dtype)
    total = sum(sizes) or 1
    shares = tuple(sum(s for s, w in zip(sizes, layer.weights) if homes[w.name] is tier) / total for tier in Tier)
    return replace(Placement.of(policy), weights=shares)


def layer_cost(layer: Layer, step: Step, policy: Policy, place: Placement, dtype: torch.dtype,
               machine: Machine, heads: int, hidden: int) -> dict[str, float]:
    """Seconds per resource for this layer in one token step of a whole block-step (every batch)."""
    batches = policy.num_gpu_batches
    if runs_together(layer, policy):  # one call over every batch's positions
        step, batches = replace(step, rows=step.rows * batches), 1
    per_batch = dict.fromkeys(RESOURCES, 0.0)
    _add(per_batch, _compute(layer, step, place, dtype, machine, heads, policy.compress_weight))
    if layer.has_cache:
        _add(per_batch, _cache_traffic(layer, step, policy, place, dtype, machine))
    _add(per_batch, _activation_traffic(step, policy, dtype, machine, hidden))
    cost = {k: v * batches for k, v in per_batch.items()}  # every batch does the same
    _add(cost, _weight_load(layer, policy, place, dtype, machine, step.rows * step.new * batches))  # once per step
    return cost


def combine(cost: dict[str, float], overlap: bool) -> float:
    return max(cost.values()) if overlap else sum(cost.values())


def _add(into: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        into[k] += v


def _weight_load(layer: Layer, policy: Policy, place: Placement, dtype: torch.dtype, machine: Machine,
                 tokens: int) -> dict:
    """Disk reads of disk-homed weights, link copies of non-resident ones on a GPU, and
    decompression of compressed ones (every use, whatever their tier). Of a MoE layer's experts,
    only those the block's `tokens` are expected to touch are read, less those the expert cache
    serves (`place.expert_hits`; placement fractions applied to the bytes used, which keeps the
    cost linear in them)."""
    rates, name = machine.profile, dtype_name(dtype)
    shares = used_shares(layer, tokens)
    missed = [u if w.expert is None else u * (1 - place.expert_hits) for w, u in zip(layer.weights, shares)]
    stored = sum(s * u for s, u in zip(stored_bytes(layer, policy, dtype), missed))
    _, host, disk = place.weights
    cost = {"disk": machine.disk_s(disk * stored, 0)}
    if not machine.cpu:
        cost["link"] = (host + disk) * stored / rates.rate("copy to compute")
    if policy.compress_weight:
        config = policy.weight_compression()
        from_codes = multiplies_from_codes(layer, dtype, machine)  # those are never dequantized
        dense = sum(torch.Size(w.shape).numel() * elem(dtype) * u for w, u in zip(layer.weights, shares)
                    if compresses(config, w.compressible) and not (from_codes and w.linear))
        cost["compute"] = dense / rates.rate(f"decompress {name}")
    return cost


def multiplies_from_codes(layer: Layer, dtype: torch.dtype, machine: Machine) -> bool:
    """Whether this block layer's 4-bit matmul weights are multiplied from their codes by an int4
    kernel, as measured (`measure.measure_layers` times the layer so where the engine would)."""
    if layer.parts:
        return all(multiplies_from_codes(p, dtype, machine) for p in layer.parts)
    if layer.part != BLOCK:
        return False
    return bool(machine.profile.layer_points(layer_key(dtype, machine.spec, layer_kind(layer), "decode", 0, "int4")))


def _compute(layer: Layer, step: Step, place: Placement, dtype: torch.dtype, machine: Machine, heads: int,
             compressed: bool = False) -> dict:
    """The layer's own compute: block layers from the measured layers of this model (resident
    weights take the packed path where there is one; `compressed` 4-bit weights the int4 kernel
    where it was measured), the embedding and the head from the fixed cost and the matmul rates."""
    rates = machine.profile
    resident = place.weights[0] if machine.cpu else 1.0  # on a GPU every weight is used from GPU memory
    if layer.parts:  # a merged block (--sep-layer 0): its parts one after the other
        return {"compute": sum(_compute(p, step, place, dtype, machine, heads, compressed)["compute"]
                               for p in layer.parts)}
    job = rates.rates.get(f"executor job {dtype_name(dtype)} {machine.spec.family}", 0.0)
    if layer.part != BLOCK:  # the head (last positions only) multiplies with the plain weight: it is
        seconds = job + rates.rate(overhead_key(dtype, machine.spec))  # often the embedding's, tied
        for w in (w for w in layer.weights if w.linear):
            n, k = w.shape
            seconds += rates.matmul_s(dtype, step.rows, k, n)
        if layer.part == HEAD:  # the next tokens chosen from its logits, every step
            seconds += step.rows * machine.spec.vocab_size / rates.rate(choice_key(machine.spec.vocab_size), 1e12)
        return {"compute": seconds}
    if compressed and multiplies_from_codes(layer, dtype, machine):  # 4-bit on every tier alike
        seconds = _measured_layer(layer, step, dtype, machine, "int4")
    else:
        seconds = (resident * _measured_layer(layer, step, dtype, machine, "packed")
                   + (1 - resident) * _measured_layer(layer, step, dtype, machine, "plain"))
    return {"compute": job + seconds + _attention_beyond(layer, step, dtype, machine, heads)}


def _measured_layer(layer: Layer, step: Step, dtype: torch.dtype, machine: Machine, layout: str) -> float:
    """Seconds of this block layer at the step's rows (decode) or tokens (prefill), interpolated
    linearly between measured points and extrapolated in proportion beyond them. A profile without
    layer measurements (written by hand) prices the matmuls and the fixed cost instead."""
    phase, size = ("decode", step.rows) if step.new == 1 else ("prefill", step.rows * step.new)
    points = machine.profile.layer_points(layer_key(dtype, machine.spec, layer_kind(layer), phase, 0, layout))
    if not points and layout == "packed":  # nothing packs in this dtype here: resident weights are plain too
        points = machine.profile.layer_points(layer_key(dtype, machine.spec, layer_kind(layer), phase, 0, "plain"))
    if not points:
        return _priced_layer(layer, step, dtype, machine, layout == "packed")
    if size <= points[0][0]:
        return points[0][1] if phase == "decode" else points[0][1] * size / points[0][0]
    for (a, ta), (b, tb) in zip(points, points[1:]):
        if size <= b:
            return ta + (size - a) / (b - a) * (tb - ta)
    return points[-1][1] * size / points[-1][0]


def _priced_layer(layer: Layer, step: Step, dtype: torch.dtype, machine: Machine, packed: bool) -> float:
    """A block layer from matmul rates and the fixed cost, with attention as measured for
    DECODE_CONTEXT or PREFILL_TOKENS tokens (`_attention_beyond` adds the rest)."""
    rates = machine.profile
    seconds = rates.rate(overhead_key(dtype, machine.spec))
    tokens = step.rows * step.new
    touched = experts_touched(layer.num_experts, layer.top_k, tokens)
    for w in (w for w in layer.weights if w.linear):
        n, k = w.shape
        if w.expert is None:
            seconds += rates.matmul_s(dtype, tokens, k, n, packed=packed)
        else:  # each touched expert multiplies its share of the tokens' k choices
            rows = max(1, round(tokens * layer.top_k / touched))
            seconds += rates.matmul_s(dtype, rows, k, n, packed=packed) * touched / layer.num_experts
    if layer.has_cache:
        base = Step(step.rows, step.new, DECODE_CONTEXT if step.new == 1 else PREFILL_TOKENS)
        seconds += _attention_beyond(layer, replace(base, context=2 * base.context), dtype, machine,
                                     machine.spec.num_heads)
    return seconds


def _attention_beyond(layer: Layer, step: Step, dtype: torch.dtype, machine: Machine, heads: int) -> float:
    """Attention over more (or fewer) tokens than the layer was measured with."""
    if not layer.has_cache:
        return 0.0
    shape = f"{heads}/{layer.kv_heads}x{layer.head_dim}"
    if step.new == 1:
        kv = 2 * step.rows * layer.kv_heads * (step.context - DECODE_CONTEXT) * layer.head_dim * elem(dtype)
        return kv / machine.profile.rate(f"attention decode {dtype_name(dtype)} {shape}")
    flop = 4.0 * step.rows * heads * step.new * (step.context - PREFILL_TOKENS) * layer.head_dim
    return flop / machine.profile.rate(f"attention prefill {dtype_name(dtype)} {shape}")


def _cache_traffic(layer: Layer, step: Step, policy: Policy, place: Placement, dtype: torch.dtype,
                   machine: Machine) -> dict:
    """Loading the rows so far and storing the new tokens, for cache not used in place."""
    rates, name = machine.profile, dtype_name(dtype)
    on_compute, host, disk = place.cache
    compressed = policy.compress_cache
    staged = place.staged if place.staged is not None else (on_compute < 1.0 or compressed)
    if not staged:
        return {}
    past, new = step.context - step.new, step.new
    per_token_dense = 2 * step.rows * layer.kv_heads * layer.head_dim * elem(dtype)
    per_token_stored = per_token_dense
    if compressed:
        config = policy.cache_compression()
        per_token_stored = kv_token_bytes(step.rows, layer.kv_heads, layer.head_dim, dtype, config)
    cost = {"disk": machine.disk_s(disk * past * per_token_stored, disk * new * per_token_stored)}
    staging = (past + new) * per_token_dense / rates.rate("copy to compute")  # rows gathered, new ones scattered
    conversions = 0.0
    if compressed:
        conversions = past * per_token_dense / rates.rate(f"decompress {name}") + \
            new * per_token_dense / rates.rate(f"compress {name}")
    if machine.cpu:
        cost["compute"] = staging + conversions
    else:
        cost["link"] = (host + disk) * (past + new) * per_token_stored / rates.rate("copy to compute")
        cost["compute"] = conversions  # on the GPU, a small share of its time
    return cost


def _activation_traffic(step: Step, policy: Policy, dtype: torch.dtype, machine: Machine, hidden: int) -> dict:
    """Hidden states homed off the compute device travel there and back around every layer."""
    n = step.rows * step.new * hidden * elem(dtype)
    tier = policy.act_tier.value
    if tier == "disk":
        return {"disk": machine.disk_s(n, n)}
    if tier == "host" and not machine.cpu:
        return {"link": 2 * n / machine.profile.rate("copy to compute")}
    return {}


def layer_groups(layers: list[Layer]) -> list[tuple[Layer, int]]:
    """Identical layers once each, with their count (blocks repeat: their costs are equal)."""
    seen: dict[tuple, list] = {}
    for layer in layers:
        key = (layer.part, layer.kv_heads, layer.head_dim,
               tuple((w.shape, w.linear, w.compressible) for w in layer.weights))
        seen.setdefault(key, [layer, 0])[1] += 1
    return [(layer, n) for layer, n in seen.values()]


# ----- a stage, a run --------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """What is generated: prompts of `prompt_len` tokens, `gen_len` new tokens each. `scored`: a
    scoring workload instead (prefill only, `gen_len` 1), each row scoring that many positions."""

    prompt_len: int
    gen_len: int
    scored: int | None = None


def steps(workload: Workload, rows: int) -> list[tuple[Step, int]]:
    """(step, how many token steps it stands for): the prefill, then decode steps sampled at a few
    contexts (decode cost is linear in the context, so a few points weigh the rest exactly enough)."""
    out = [(Step(rows, workload.prompt_len, workload.prompt_len), 1)]
    decode = workload.gen_len - 1
    samples = min(decode, 4)
    for i in range(samples):
        lo, hi = i * decode // samples, (i + 1) * decode // samples
        middle = workload.prompt_len + 1 + (lo + hi - 1) // 2
        out.append((Step(rows, 1, middle), hi - lo))
    return out


def _placed_groups(layers: list[Layer], policy: Policy, dtype: torch.dtype, realized: bool, machine_cpu: bool):
    if not realized:
        return [(la, n, Placement.of(policy)) for la, n in layer_groups(layers)]
    homes = weight_homes(layers, policy, lambda w: stored_nbytes(w, dtype, policy.weight_compression()))
    hits = expert_hit_rate(layers, policy, dtype, machine_cpu)
    return [(la, n, replace(realized_placement(la, homes, policy, dtype), expert_hits=hits))
            for la, n in layer_groups(layers)]


def prefill_piece_time(layers: list[Layer], policy: Policy, dtype: torch.dtype, machine: Machine,
                       workload: Workload, pieces: int, heads: int, hidden: int) -> float:
    """Seconds of one of `pieces` prefill pieces (a prompt cut along its tokens) on this stage: each
    piece passes every layer, weights and all, for its share of the tokens; its attention reaches
    back over the pieces before it (on average half the prompt beyond its own tokens)."""
    tokens = -(-workload.prompt_len // pieces)
    step = Step(policy.gpu_batch_size, tokens, (workload.prompt_len + tokens) // 2)
    return sum(combine(layer_cost(layer, step, policy, place, dtype, machine, heads, hidden), policy.overlap) * n
               for layer, n, place in _placed_groups(layers, policy, dtype, True, machine.cpu))


def stage_times(layers: list[Layer], policy: Policy, dtype: torch.dtype, machine: Machine, workload: Workload,
                heads: int, hidden: int, realized: bool = True) -> tuple[float, float, dict[str, float]]:
    """(prefill s, decode s, seconds per resource over the run) of one block on this stage.
    `realized`: weights placed tensor by tensor as the executor does (else the exact fractions)."""
    prefill = decode = 0.0
    totals = dict.fromkeys(RESOURCES, 0.0)
    groups = _placed_groups(layers, policy, dtype, realized, machine.cpu)
    for step, count in steps(workload, policy.gpu_batch_size):
        for layer, n, place in groups:
            cost = layer_cost(layer, step, policy, place, dtype, machine, heads, hidden)
            seconds = combine(cost, policy.overlap) * count * n
            for k in RESOURCES:
                totals[k] += cost[k] * count * n
            if step.new > 1 or workload.gen_len == 1:
                prefill += seconds
            else:
                decode += seconds
    return prefill, decode, totals


def pipeline_time(prefill: list[float], decode: list[float], micro_batches: int, hidden_bytes: list[float],
                  machine_copy_rate: float, gen_len: int, pieces: int = 1) -> tuple[float, float]:
    """(prefill s, decode s) of one block of `micro_batches` micro-batches through the stages,
    given each stage's time for one prefill piece of a micro-batch (`prefill`; the prompt travels
    in `pieces` pieces) and for all decode steps of one micro-batch (`decode`), and the bytes of
    one message a stage sends (a prefill piece, a decode step).

    Prefill fills and drains the pipeline: the slowest stage works `micro_batches * pieces` times
    and the others add their share once. A decode step of a micro-batch needs its own previous
    token back from the last rank, so a step costs at least one trip around the ring; with enough
    micro-batches the slowest stage is busy throughout instead."""
    stages = len(prefill)
    comm_pre = comm_dec = 0.0
    if stages > 1:
        comm_pre = (COMM_LATENCY_S + hidden_bytes[0] / machine_copy_rate) * stages
        comm_dec = (COMM_LATENCY_S + hidden_bytes[-1] / machine_copy_rate) * stages
    fill = sum(prefill) - max(prefill) + comm_pre
    prefill_s = micro_batches * pieces * max(prefill) + fill
    steps_ = max(gen_len - 1, 0)
    if steps_ == 0:
        return prefill_s, 0.0
    per_step = [d / steps_ for d in decode]
    ring = sum(per_step) + comm_dec
    return prefill_s, steps_ * max(micro_batches * max(per_step), ring)
