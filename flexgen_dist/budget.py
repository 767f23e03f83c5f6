"""Memory and disk a policy will use, against what this process may really use.

The engine checks before it loads: a policy that would not fit ends with one line naming the
tier, the bytes it needs and the bytes there are, instead of an out-of-memory kill halfway.
Host memory available is the machine's (MemAvailable) or, when tighter, what the memory cgroup
(v1 or v2) leaves; the cgroup's page cache that the kernel could drop counts as available.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import psutil
import torch

from .compression import compressed_nbytes, compresses
from .int4 import weight_parts
from .errors import FlexGenError
from .models.base import Layer
from .policy import Policy, Tier, assign_weight_tiers, split_rows

GiB = 1 << 30
# allocator slack and fragmentation on top of the bytes counted. Measured over 45 runs in memory
# cgroups, the peak less the process's baseline was 0.86-1.07x the bytes counted (at most 0.06 GiB
# over; benchmark/RESULTS.md, "The planner on an AVX-512 machine"); with hardware.CODE_RESERVE
# this covers it, where 10 % made the planner leave a fifth of a tight limit unused
MARGIN = 1.05


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


def weight_plan(layers: list[Layer], policy: Policy, dtype: torch.dtype, host_is_compute: bool) -> Plan:
    """Weights at their homes (FlexGen's per-layer rule on stored bytes, as the executor places
    them), plus the compute-side buffers of the two layers in flight (weights read, copied or
    decompressed for one use) and the host read buffers of disk-homed weights."""
    compression = policy.weight_compression()

    def stored(w) -> int:
        if compresses(compression, w.compressible):
            return sum(weight_parts(w.shape, dtype, compression))
        return torch.Size(w.shape).numel() * _elem(dtype)

    plan, homes, in_flight, disk_reads = Plan(), {}, [], []
    for layer in layers:
        sizes = [stored(w) for w in layer.weights]
        moved = disk = 0
        for w, size, tier in zip(layer.weights, sizes, assign_weight_tiers(sizes, policy.tier_percents("w"))):
            tier = homes.setdefault(w.name, tier)  # a tied tensor lives where its first user put it
            if tier is Tier.DISK:
                disk += size
            dense = torch.Size(w.shape).numel() * _elem(dtype)
            # on a CPU a plain weight read from disk is used where it lands, in the read buffers
            used_in_place = (tier is Tier.COMPUTE or host_is_compute) and size == dense
            if not used_in_place:
                moved += dense
        in_flight.append(moved)
        disk_reads.append(disk)
    for layer in layers:
        for w in layer.weights:
            if homes.get(w.name) is not None:
                plan.add(homes.pop(w.name), "weights", stored(w))
    plan.add(Tier.COMPUTE, "weights in flight", 2 * max(in_flight, default=0))
    plan.add(Tier.HOST, "disk read buffers", 2 * max(disk_reads, default=0))
    return plan


def block_plan(layers: list[Layer], policy: Policy, dtype: torch.dtype, micro_batches: int, prompt_len: int,
               capacity: int, hidden: int, vocab: int, heads: int) -> Plan:
    """The KV cache of every micro-batch in flight for `capacity` tokens, its compute-side staging,
    the hidden states between layers and the largest prefill intermediates."""
    plan, elem, gbs = Plan(), _elem(dtype), policy.gpu_batch_size
    compression = policy.cache_compression()
    for layer in (la for la in layers if la.has_cache):
        per_row = 2 * layer.kv_heads * capacity * layer.head_dim * elem
        if compression is not None:
            per_row = 2 * capacity * compressed_nbytes((layer.kv_heads, layer.head_dim), dtype, compression)
        for tier, a, b in split_rows(gbs, policy.tier_percents("cache")):
            plan.add(tier, "KV cache", per_row * (b - a) * policy.num_gpu_batches * micro_batches)
        in_place = policy.cache_gpu_percent == 100 and compression is None
        if not in_place:  # a loaded (layer, batch) and the next one prefetched
            plan.add(Tier.COMPUTE, "KV staging", 2 * 2 * gbs * layer.kv_heads * capacity * layer.head_dim * elem)
    rows = policy.block_size * micro_batches
    plan.add(policy.act_tier, "activations", rows * prompt_len * hidden * elem)
    widest = max([max(w.shape) for la in layers for w in la.weights  # the MLP's inner width, not the vocabulary
                  if len(w.shape) == 2 and vocab not in w.shape] + [hidden])
    prefill = gbs * prompt_len * (3 * widest * elem + heads * prompt_len * 4) + gbs * vocab * 4  # query heads' scores
    plan.add(Tier.COMPUTE, "prefill intermediates", prefill)
    return plan


def cgroup_memory_available() -> int | None:
    """What the tightest memory cgroup around this process still lets it use (v1 or v2), counting
    the group's inactive page cache as free; None without a limit."""
    best = None
    for directory in _cgroup_dirs():
        limit = _read_int(directory, "memory.max", "memory.limit_in_bytes")
        usage = _read_int(directory, "memory.current", "memory.usage_in_bytes")
        if limit is None or usage is None or limit >= 1 << 60:
            continue
        reclaimable = _stat(directory).get("inactive_file", _stat(directory).get("total_inactive_file", 0))
        left = max(limit - usage + reclaimable, 0)
        best = left if best is None else min(best, left)
    return best


def _cgroup_dirs() -> list[str]:
    """This process's memory cgroup directory and its ancestors (a limit may sit on any of them)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return []
    out = []
    for _, controllers, path in lines:
        base = "/sys/fs/cgroup/memory" if "memory" in controllers.split(",") else \
            "/sys/fs/cgroup" if controllers == "" else None
        if base is None or not os.path.isdir(base):
            continue
        parts = [p for p in path.split("/") if p]
        out += [os.path.join(base, *parts[:i]) for i in range(len(parts), 0, -1)]
    return out


def _read_int(directory: str, *names: str) -> int | None:
    for name in names:
        try:
            with open(os.path.join(directory, name)) as f:
                text = f.read().strip()
        except OSError:
            continue
        return 1 << 62 if text == "max" else int(text)
    return None


def _stat(directory: str) -> dict[str, int]:
    try:
        with open(os.path.join(directory, "memory.stat")) as f:
            return {k: int(v) for k, v in (line.split() for line in f)}
    except (OSError, ValueError):
        return {}


_HOST_LIMIT: list[int] = []  # bytes of host memory this process may use in all (--cpu-mem), if set


def limit_host_memory(total_bytes: int | None) -> None:
    """Hold this process to `total_bytes` of host memory in all (None: no limit of our own)."""
    _HOST_LIMIT[:] = [] if total_bytes is None else [int(total_bytes)]


FREE_RAM = "available RAM"  # host_available's source when no limit is tighter: it counts no page as ours


def host_available() -> tuple[int, str]:
    """(bytes this process may still allocate in host memory, where that number comes from)."""
    found = [(psutil.virtual_memory().available, FREE_RAM)]
    cgroup = cgroup_memory_available()
    if cgroup is not None:
        found.append((cgroup, "memory cgroup limit"))
    if _HOST_LIMIT:
        rss = psutil.Process().memory_info().rss
        found.append((max(_HOST_LIMIT[0] - rss, 0), f"--cpu-mem {_HOST_LIMIT[0] / GiB:g} GiB"))
    return min(found, key=lambda f: f[0])


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


def require_disk_space(need: int, directory: str, what: str, also: str = "") -> None:
    """Refuse, in one line naming both numbers, `need` bytes that `directory`'s filesystem lacks."""
    free = shutil.disk_usage(directory).free
    if need > free:
        raise FlexGenError(f"not enough disk space in {directory} for {what}: needs {need / 1e9:.2f} GB, "
                           f"{free / 1e9:.2f} GB free; free some space, use --offload-dir on a larger disk"
                           + (f", {also}" if also else ""))
