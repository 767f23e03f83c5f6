"""Memory and disk a policy will use, against what this process may really use.

The engine checks before it loads: a policy that would not fit ends with one line naming the
tier, the bytes it needs and the bytes there are, instead of an out-of-memory kill halfway. What
the process may use is `system.limits.host_available` (the machine, its memory cgroup, --cpu-mem).
These are the numbers the planner plans with too (`planning/optimizer.py`).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field, replace

import torch

from ..core.errors import FlexGenError
from ..core.policy import Policy, split_rows, weight_homes
from ..core.types import GiB, Tier
from ..models.base import SCORE_CHUNK, Layer, only_multiplied
from ..storage.kvcache import kv_token_bytes
from ..storage.homes import reaches_math_packed
from ..storage.store import stored_as_int4, stored_nbytes, stored_parts
from ..system.limits import host_available, require_disk_space

# allocator slack and fragmentation on top of the bytes counted. Measured over 45 runs in memory
# cgroups, the peak less the process's baseline was 0.86-1.07x the bytes counted (at most 0.06 GiB
# over; benchmark/RESULTS.md, "The planner on an AVX-512 machine"); with hardware.CODE_RESERVE
# this covers it, where 10 % made the planner leave a fifth of a tight limit unused
MARGIN = 1.05


# host memory a CPU run of a mixture of experts takes beyond the bytes counted: oneDNN's kernels for
# the many row counts the experts' products have (0.25 GiB after one block of Qwen3-30B-A3B's shape,
# its primitive cache held to 128: see flexgen_dist/__init__.py) and the allocator's slack over the
# experts' reads. Measured there as 128 of its 3 MiB expert tensors; taken in proportion for smaller
# experts and at most that for larger ones (benchmark/RESULTS.md, "Scoring a mixture of experts
# larger than memory")
EXPERT_KERNELS, EXPERT_KERNELS_MAX = 128, 3 * GiB // 8


def expert_kernel_bytes(layers: list[Layer], dtype: torch.dtype) -> int:
    """`EXPERT_KERNELS` of the largest routed-expert tensor (as the math uses it), at most
    `EXPERT_KERNELS_MAX`; 0 without routed experts."""
    largest = max((torch.Size(w.shape).numel() for la in layers for w in la.weights if w.expert is not None),
                  default=0)
    return min(EXPERT_KERNELS * largest * _elem(dtype), EXPERT_KERNELS_MAX)


# the share of the memory a plan leaves that an unsized expert cache takes. All of it was too much:
# Qwen3-30B-A3B's shape, 8 blocks, batch 16 x 4 under a 5 GiB cgroup was killed for memory with a
# 1.89 GiB cache and peaked at 3.24 GiB without one (benchmark/RESULTS.md, "With the expert cache")
CACHE_SHARE = 0.5


# routed experts read ahead of the math in a layer whose batches run together (`runs_together`):
# a few experts' reads in flight keep the disk busy while one is multiplied
EXPERT_READ_AHEAD = 8


def runs_together(layer: Layer, policy: Policy) -> bool:
    """Whether the schedule runs every batch of a step through `layer` in one call: a per-position
    layer with routed experts, where the activations live on the compute device. Each expert is then
    used once per step, over all the block's tokens routed to it (one product of many rows, not one
    per batch), and dropped after that use: a layer's disk-homed experts are read a window ahead of
    the math (`EXPERT_READ_AHEAD`), never all held at once."""
    return layer.per_position and layer.top_k > 0 and policy.act_tier is Tier.COMPUTE


def tensors_per_expert(layer: Layer) -> int:
    """The stored tensors of each of the layer's routed experts (gate, up, down; gpt-oss adds biases)."""
    return max(collections.Counter(w.expert for w in layer.weights if w.expert is not None).values(), default=0)


def routed_window(layer: Layer, policy: Policy, sizes: dict[int, int]) -> int:
    """Bytes one use of `layer` holds at once of its routed experts' per-use bytes (`sizes`, by
    expert): all of them where each batch computes on its own (a large block routes to every
    expert, and a batch's experts are kept for the next), else the read-ahead window and the
    expert being multiplied (the largest ones, an upper bound)."""
    if not runs_together(layer, policy):
        return sum(sizes.values())
    return sum(sorted(sizes.values(), reverse=True)[:EXPERT_READ_AHEAD + 1])


class NotEnoughMemory(FlexGenError):
    pass


@dataclass
class Plan:
    """Bytes by tier and by what they hold, e.g. plan.bytes[Tier.HOST]["weights"]."""

    bytes: dict[Tier, dict[str, int]] = field(default_factory=lambda: {t: {} for t in Tier})

    def add(self, tier: Tier, what: str, n: int) -> None:
        self.bytes[tier][what] = self.bytes[tier].get(what, 0) + int(n)

    def total(self, tier: Tier) -> int:
        return sum(self.bytes[tier].values())

    def __add__(self, other: "Plan") -> "Plan":
        out = Plan()
        for plan in (self, other):
            for tier, parts in plan.bytes.items():
                for what, n in parts.items():
                    out.add(tier, what, n)
        return out

    def describe(self, tiers) -> str:
        parts = [f"{what} {n / GiB:.2f}" for t in tiers for what, n in self.bytes[t].items() if n]
        return ", ".join(parts) or "nothing"


def _elem(dtype: torch.dtype) -> int:
    return dtype.itemsize


def weight_plan(layers: list[Layer], policy: Policy, dtype: torch.dtype, host_is_compute: bool,
                int4_kernel: bool = False) -> Plan:
    """Weights at their homes (FlexGen's per-layer rule on stored bytes, as the executor places
    them), plus the compute-side buffers of the two layers in flight (weights read, copied or
    decompressed for one use), the host read buffers of disk-homed weights and of one layer's
    disk-homed routed experts (of a layer whose batches run together, the read-ahead window:
    `routed_window`), the expert cache (`Policy.expert_cache_gib`, at most what it could hold:
    `cacheable_expert_bytes`) and, on a CPU, the experts' kernels (`expert_kernel_bytes`).
    `int4_kernel`: the engine multiplies 4-bit weights from
    their codes (`Int4Choice.use`), so those that reach the math packed are used like plain ones,
    where they rest or copied packed; on a CPU a product with more rows than the kernel takes
    dequantizes one at a time into one reused buffer, counted at the largest."""
    compression = policy.weight_compression()
    only_linear = only_multiplied(layers)

    def stored(w) -> int:
        return stored_nbytes(w, dtype, compression)

    def packed(w) -> bool:
        return stored_as_int4(w, compression) and reaches_math_packed(only_linear[w.name], host_is_compute,
                                                                      int4_kernel)

    def moved_for_use(w, tier: Tier) -> int:
        """Compute-side bytes one use of `w` allocates besides its home and read buffers."""
        dense = torch.Size(w.shape).numel() * _elem(dtype)
        if packed(w) and not host_is_compute:
            return 0 if tier is Tier.COMPUTE else stored(w)  # copied to the GPU packed
        if packed(w):  # read from disk, used where it lands, but its scales may be turned to the feed's dtype
            return 2 * stored_parts(w, dtype, compression)[1] if tier is Tier.DISK else 0
        # on a CPU a plain weight read from disk is used where it lands, in the read buffers
        used_in_place = (tier is Tier.COMPUTE or host_is_compute) and stored(w) == dense
        return 0 if used_in_place else dense

    homes = weight_homes(layers, policy, stored)
    plan, in_flight, disk_reads, expert_reads, dequantized = Plan(), [], [], [], 0
    for layer in layers:
        moved, read = collections.Counter(), collections.Counter()  # by expert (None: the dense weights)
        for w in layer.weights:
            moved[w.expert] += moved_for_use(w, homes[w.name])
            read[w.expert] += stored(w) if homes[w.name] is Tier.DISK else 0
            if packed(w) and host_is_compute:
                dequantized = max(dequantized, torch.Size(w.shape).numel() * _elem(dtype))
        in_flight.append(moved.pop(None, 0) + routed_window(layer, policy, moved))
        disk_reads.append(read.pop(None, 0))
        expert_reads.append(routed_window(layer, policy, read))  # into buffers of their own, when routed to
    sizes = {w.name: stored(w) for layer in layers for w in layer.weights}
    for name, tier in homes.items():
        plan.add(tier, "weights", sizes[name])
    plan.add(Tier.COMPUTE, "weights in flight", 2 * max(in_flight, default=0) + dequantized)
    plan.add(Tier.HOST, "disk read buffers", 2 * max(disk_reads, default=0))
    plan.add(Tier.HOST, "routed experts read", max(expert_reads, default=0))  # one layer's at a time
    plan.add(Tier.COMPUTE, "expert cache", expert_cache_bytes(layers, policy, dtype, host_is_compute))
    if host_is_compute:
        plan.add(Tier.COMPUTE, "expert kernels", expert_kernel_bytes(layers, dtype))
    return plan


def cacheable_expert_bytes(layers: list[Layer], policy: Policy, dtype: torch.dtype, host_is_compute: bool) -> int:
    """Bytes, as the math uses them (uncompressed: an upper bound), of the routed experts whose use
    reads them from a slower tier: disk-homed ones, and host-homed ones when the compute device is
    a GPU. What an expert cache could hold at most."""
    compression = policy.weight_compression()
    homes = weight_homes(layers, policy, lambda w: stored_nbytes(w, dtype, compression))
    slow = (Tier.DISK,) if host_is_compute else (Tier.DISK, Tier.HOST)
    experts = {w.name: w for layer in layers for w in layer.weights if w.expert is not None}
    return sum(torch.Size(w.shape).numel() * _elem(dtype) for name, w in experts.items() if homes[name] in slow)


def expert_cache_bytes(layers: list[Layer], policy: Policy, dtype: torch.dtype, host_is_compute: bool) -> int:
    """The expert cache's size under `policy` (0 while unsized: see `sized_expert_cache`)."""
    if not policy.expert_cache_gib:
        return 0
    return min(int(policy.expert_cache_gib * GiB), cacheable_expert_bytes(layers, policy, dtype, host_is_compute))


def with_expert_cache(policy: Policy, layers: list[Layer], dtype: torch.dtype, host_is_compute: bool,
                      left: int) -> Policy:
    """`policy` with its expert cache sized, unless it is set already: CACHE_SHARE of `left` bytes
    (the memory the rest of the plan leaves), at most what the cache could hold; 0 when nothing is
    cacheable."""
    if policy.expert_cache_gib is not None:
        return policy
    room = max(int(left * CACHE_SHARE), 0) >> 20 << 20  # whole MiB, exact in GiB: never rounded up
    size = min(room, cacheable_expert_bytes(layers, policy, dtype, host_is_compute))
    return replace(policy, expert_cache_gib=size / GiB)  # (a size rounded up is capped by what is cacheable)


def memory_left(plan: Plan, compute: torch.device) -> int:
    """Bytes of the compute device's memory (on a CPU: the host's) that stay free once `plan` is
    placed, with the check's slack (`check_memory`); negative when it does not fit."""
    if compute.type == "cuda":
        free, _ = torch.cuda.mem_get_info(compute)
        return int(free / MARGIN) - plan.total(Tier.COMPUTE)
    available, _ = host_available()
    return int(available / MARGIN) - plan.total(Tier.COMPUTE) - plan.total(Tier.HOST)


# hidden-state-sized tensors a layer run over every batch at once holds at its peak (`runs_together`),
# besides its widest products (gate, up and their product): its input gathered, normed and routed,
# the sum of its experts' outputs, the shared expert's output and its own output
TOGETHER_COPIES = 6

SCRATCH_CACHE = (100.0, 0.0, 0.0)  # a scoring block's keys and values: on the compute device, never stored


def block_plan(layers: list[Layer], policy: Policy, dtype: torch.dtype, micro_batches: int, prompt_len: int,
               capacity: int, hidden: int, vocab: int, heads: int, scored: int | None = None) -> Plan:
    """The KV cache of every micro-batch in flight for `capacity` tokens, its compute-side staging,
    the hidden states between layers and the largest prefill intermediates. `scored`: a scoring
    (prefill-only) block whose rows score that many positions each; its keys and values are
    scratch on the compute device (`scoring_cache`) and its head makes `scored` positions' logits."""
    plan, elem, gbs = Plan(), _elem(dtype), policy.gpu_batch_size
    compression = None if scored is not None else policy.cache_compression()
    percents = SCRATCH_CACHE if scored is not None else policy.tier_percents("cache")
    for layer in (la for la in layers if la.has_cache):
        per_row = capacity * kv_token_bytes(1, layer.kv_heads, layer.head_dim, dtype, compression)
        for tier, a, b in split_rows(gbs, percents):
            plan.add(tier, "KV cache", per_row * (b - a) * policy.num_gpu_batches * micro_batches)
        in_place = percents[0] == 100 and compression is None
        if not in_place:  # a loaded (layer, batch) and the next one prefetched
            plan.add(Tier.COMPUTE, "KV staging", 2 * 2 * gbs * layer.kv_heads * capacity * layer.head_dim * elem)
    rows = policy.block_size * micro_batches
    plan.add(policy.act_tier, "activations", rows * prompt_len * hidden * elem)
    widest = max([max(w.shape) for la in layers for w in la.weights  # the MLP's inner width, not the vocabulary
                  if len(w.shape) == 2 and vocab not in w.shape] + [hidden])
    if scored is None:
        logits = gbs * vocab * 4
    else:  # a few positions' logits at a time, their log-softmax and argmax (models.base.score_positions)
        logits = min(gbs * scored * vocab, max(SCORE_CHUNK, gbs * vocab)) * 4 * 3
    prefill = gbs * prompt_len * (3 * widest * elem + heads * prompt_len * 4) + logits  # query heads' scores
    plan.add(Tier.COMPUTE, "prefill intermediates", prefill)
    together = [layer for layer in layers if runs_together(layer, policy)]
    if together:  # every batch of a micro-batch group in one call (one group at a time):
        tokens = policy.block_size * prompt_len
        plan.add(Tier.COMPUTE, "batches run together",
                 tokens * (TOGETHER_COPIES * hidden + 3 * max(map(_widest, together))) * elem)
    return plan


def _widest(layer: Layer) -> int:
    """The widest output of the layer's matmul weights: a product's intermediate that may take
    every token at once (the shared expert's; a routed expert's, where all tokens choose it)."""
    return max((w.shape[0] for w in layer.weights if w.linear and len(w.shape) == 2), default=0)


def within(plan: Plan, earlier: Plan) -> bool:
    """Whether `plan` holds no more on any tier than `earlier` did."""
    return all(plan.total(t) <= earlier.total(t) for t in Tier)


def check_memory(plan: Plan, compute: torch.device, what: str) -> None:
    """Refuse, in one line, a plan that does not fit the memory this process may use."""
    if compute.type == "cuda":
        free, _ = torch.cuda.mem_get_info(compute)
        _refuse_if(plan.total(Tier.COMPUTE) * MARGIN, free, f"GPU memory for {what}", plan, [Tier.COMPUTE],
                   "free GPU memory")
        tiers = [Tier.HOST]
    else:  # the compute and host tiers are both this machine's RAM
        tiers = [Tier.COMPUTE, Tier.HOST]
    available, source = host_available()
    _refuse_if(sum(plan.total(t) for t in tiers) * MARGIN, available, f"host memory for {what}", plan, tiers, source)


def _refuse_if(need: float, have: int, what: str, plan: Plan, tiers, source: str) -> None:
    if need > have:
        raise NotEnoughMemory(
            f"not enough {what}: the policy needs {need / GiB:.2f} GiB ({plan.describe(tiers)} GiB, with "
            f"{MARGIN - 1:.0%} slack), {have / GiB:.2f} GiB is available ({source}); put more of the weights "
            "or KV cache on disk (--percent) or use a smaller --gpu-batch-size")


def check_disk(plan: Plan, directory: str, what: str) -> None:
    """Refuse, in one line, disk-homed bytes that the filesystem of `directory` cannot take."""
    require_disk_space(plan.total(Tier.DISK), directory, what, "or keep more in memory (--percent)")
