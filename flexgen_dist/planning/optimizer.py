"""The planner: the policy (and, in a pipeline, the stages) that maximise generated tokens per
second within every rank's memory, from the cost model and a hardware profile.

For each discrete choice (dtype, gpu batch size, number of gpu batches, compression, micro-batches)
a linear program over the placement fractions (scipy's HiGHS) minimises the predicted time of a
block; the fractions are rounded to the percents the executor takes, checked against the budgets
with the engine's own memory accounting (`budget.py`), and the result priced again as the executor
will really place it. The best of all choices wins. A pipeline's stage boundaries are chosen by a
dynamic program over contiguous layer ranges, each stage planned on its own rank's budgets and
profile.

Invariant: a plan this module returns fits its budgets by `budget.weight_plan` + `budget.block_plan`,
the same numbers the engine refuses a policy on.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.optimize import linprog

from ..core.errors import FlexGenError
from ..core.policy import Policy
from ..core.types import GiB, Tier, dtype_name
from ..models.base import Layer
from ..runtime.budget import Plan, block_plan, weight_plan, with_expert_cache
from ..storage.store import stored_nbytes
from .costmodel import (
    RESOURCES,
    Machine,
    Placement,
    Workload,
    layer_cost,
    layer_groups,
    pipeline_time,
    prefill_piece_time,
    stage_times,
    steps,
)
from .profile import Budgets

TIE_BREAK_S = (1e-6, 2e-6, 1e-6, 2e-6)  # seconds per unit of host, disk share of weights, then cache


class Infeasible(FlexGenError):
    """No plan fits: the message names the tier and the bytes missing."""


@dataclass(frozen=True)
class Model:
    """What the planner needs of a model: its spec and its family (to build any stage's layers)."""

    spec: object
    family: object

    def layers(self, first: int, last: int, with_embed: bool, with_head: bool, sep_layer: bool = True) -> list[Layer]:
        return self.family.build_layers(self.spec, first, last, with_embed=with_embed, with_head=with_head,
                                        sep_layer=sep_layer)


@dataclass(frozen=True)
class Rank:
    """One rank's machine (profile, compute device kind, offload dir) and memory budgets."""

    machine: Machine
    budgets: Budgets


@dataclass(frozen=True)
class Options:
    """The discrete choices the planner may make, and what it must leave alone."""

    dtypes: tuple[torch.dtype, ...]
    compression: tuple[tuple[bool, bool], ...] = ((False, False),)  # (weights, cache) combinations allowed
    max_gpu_batch: int = 256
    max_block: int = 4096
    micro_batches: tuple[int, ...] | None = None  # None: one to four per stage
    prefill_chunks: int | None = None  # None: the planner chooses (pipelines only)
    gpu_batch_sizes: tuple[int, ...] | None = None  # None: powers of two up to max_gpu_batch
    gpu_batches: tuple[int, ...] | None = None  # None: powers of two up to the block limit
    stage_layers: list[int] | None = None  # fixed stage sizes (None: the planner chooses)
    base: Policy = field(default_factory=Policy)  # flags the planner keeps (overlap, sep_layer, ...)


@dataclass
class StagePlan:
    first: int
    last: int
    policy: Policy
    memory: Plan
    prefill_s: float  # one micro-batch through this stage, prefill
    decode_s: float  # one micro-batch through this stage, all decode steps
    resources: dict[str, float]  # seconds per resource over one micro-batch's block
    layers: list[Layer] | None = field(default=None, repr=False)  # what it runs (to price prefill pieces)

    @property
    def bottleneck(self) -> str:
        return max(self.resources, key=self.resources.get)


@dataclass
class RunPlan:
    """A plan for the whole job: one policy per stage (batching and compression common to all),
    the dtype, micro-batches, and the predicted times of the job."""

    dtype: torch.dtype
    micro_batches: int
    stages: list[StagePlan]
    workload: Workload
    num_prompts: int
    prefill_s: float  # per block
    decode_s: float  # per block
    prefill_chunks: int = 1  # pieces each micro-batch's prompt travels the pipeline in

    @property
    def block_rows(self) -> int:
        return self.micro_batches * self.stages[0].policy.block_size

    @property
    def blocks(self) -> int:
        return math.ceil(self.num_prompts / self.block_rows)

    @property
    def total_s(self) -> float:
        return self.blocks * (self.prefill_s + self.decode_s)

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the job (filler rows of a short last block count for nothing)."""
        return self.num_prompts * self.workload.gen_len / max(self.total_s, 1e-12)

    @property
    def stage_layers(self) -> list[int]:
        return [s.last - s.first for s in self.stages]


# ----- one stage -------------------------------------------------------------------------------
def _unique_weight_bytes(layers: list[Layer], policy: Policy, dtype) -> int:
    weights = {w.name: w for layer in layers for w in layer.weights}  # a tied weight once
    return sum(stored_nbytes(w, dtype, policy.weight_compression()) for w in weights.values())


@dataclass(frozen=True)
class _Memory:
    """A stage's memory as linear terms: bytes of all weights (W) and all KV cache (C), and the
    fixed bytes per tier that come with streaming weights or staging the cache."""

    weights: int
    cache: int
    fixed_compute: int
    fixed_host: int


def _memory_terms(layers, policy: Policy, dtype, micro_batches: int, workload: Workload, spec, cpu: bool,
                  streaming: bool, staged: bool) -> _Memory:
    capacity = _capacity(workload)
    probe = replace(policy, w_gpu_percent=0 if streaming else 100, w_cpu_percent=0,
                    cache_gpu_percent=0 if staged else 100, cache_cpu_percent=0)
    wp = weight_plan(layers, probe, dtype, cpu)
    bp = block_plan(layers, probe, dtype, micro_batches, workload.prompt_len, capacity, spec.hidden_size,
                    spec.vocab_size, spec.num_heads, workload.scored)
    full_cache = block_plan(layers, replace(probe, cache_gpu_percent=100), dtype, micro_batches, workload.prompt_len,
                            capacity, spec.hidden_size, spec.vocab_size, spec.num_heads, workload.scored)
    # scoring keeps its keys and values as scratch on the compute device: fixed bytes, not placed by the LP
    cache = 0 if workload.scored is not None else sum(full_cache.bytes[t].get("KV cache", 0) for t in Tier)
    fixed = wp + bp
    for tier in Tier:  # the placed bytes are the LP's; what remains is fixed
        fixed.bytes[tier].pop("weights", None)
        if workload.scored is None:
            fixed.bytes[tier].pop("KV cache", None)
    return _Memory(_unique_weight_bytes(layers, policy, dtype), cache, fixed.total(Tier.COMPUTE), fixed.total(Tier.HOST))


def _lp_fractions(layers, policy: Policy, dtype, rank: Rank, workload: Workload, spec, micro_batches: int,
                  streaming: bool, staged: bool) -> Placement | None:
    """The placement fractions minimising the stage's predicted time under its budgets, or None
    if none fits. Variables: host and disk shares of weights and of cache rows (the compute share is
    the rest), then one time per (layer group, step); on a CPU the cache's host share is held at 0
    (compute and host are one memory), the weights' only where they would be used alike."""
    machine, b = rank.machine, rank.budgets
    groups = layer_groups(layers)
    step_list = steps(workload, policy.gpu_batch_size)
    mem = _memory_terms(layers, policy, dtype, micro_batches, workload, spec, machine.cpu, streaming, staged)
    n_t = len(groups) * len(step_list)
    c = np.zeros(4 + n_t)
    c[:4] = TIE_BREAK_S  # among equally fast placements, keep data nearer the compute device
    a_ub, b_ub = [], []
    basis = [Placement((1, 0, 0), (1, 0, 0), staged), Placement((0, 1, 0), (1, 0, 0), staged),
             Placement((0, 0, 1), (1, 0, 0), staged), Placement((1, 0, 0), (0, 1, 0), staged),
             Placement((1, 0, 0), (0, 0, 1), staged)]
    for gi, (layer, count) in enumerate(groups):
        for si, (step, weight) in enumerate(step_list):
            t = 4 + gi * len(step_list) + si
            c[t] = count * weight
            costs = [layer_cost(layer, step, policy, p, dtype, machine, spec.num_heads, spec.hidden_size) for p in basis]
            for base, slopes in _time_rows(costs, policy.overlap):
                row = np.zeros(4 + n_t)
                row[:4] = slopes
                row[t] = -1
                a_ub.append(row)
                b_ub.append(-base)
    # memory: [w_host, w_disk, c_host, c_disk]
    w, kv = mem.weights, mem.cache
    if machine.cpu:  # compute and host are one memory
        a_ub.append(_pad([0, -w, 0, -kv], n_t)); b_ub.append(b.host - mem.fixed_compute - mem.fixed_host - w - kv)
    else:
        a_ub.append(_pad([-w, -w, -kv, -kv], n_t)); b_ub.append(b.compute - mem.fixed_compute - w - kv)
        a_ub.append(_pad([w, 0, kv, 0], n_t)); b_ub.append(b.host - mem.fixed_host)
    a_ub.append(_pad([0, 0, 0, kv], n_t)); b_ub.append(b.disk)  # disk-homed weights are read from the store
    a_ub.append(_pad([1, 1, 0, 0], n_t)); b_ub.append(1)
    a_ub.append(_pad([0, 0, 1, 1], n_t)); b_ub.append(1)
    # on a CPU host-homed weights cost no more memory than resident ones and are used plain, not
    # packed: where the profile measured the plain layout faster, they are the faster home
    w_host_max = 1 if not machine.cpu or _plain_differs(machine, dtype) else 0
    c_host_max = 0 if machine.cpu else 1
    bounds = [(0, w_host_max), (0, 1 if streaming else 0), (0, c_host_max if staged else 0), (0, 1 if staged else 0)]
    bounds += [(0, None)] * n_t
    result = linprog(c, A_ub=np.array(a_ub), b_ub=np.array(b_ub), bounds=bounds, method="highs")
    if result.status != 0:
        return None
    wh, wd, ch, cd = (float(v) for v in result.x[:4])
    return Placement((max(1 - wh - wd, 0), wh, wd), (max(1 - ch - cd, 0), ch, cd), staged)


def _plain_differs(machine: Machine, dtype) -> bool:
    """Whether resident weights take a packed path here (so host-homed, plain ones price apart)."""
    prefix = f"layer {dtype_name(dtype)} "
    return any(k.startswith(prefix) and k.endswith(" packed") for k in machine.profile.rates)


def _time_rows(rows: list[dict], overlap: bool):
    """Affine expressions (base, slopes over [w_host, w_disk, c_host, c_disk]) a layer-step's time
    must be at least: each resource with overlap, their sum without. `rows` are the costs at the
    basis placements (all on compute, then each variable at 1)."""
    origin, *units = rows
    names = [[r] for r in RESOURCES] if overlap else [list(RESOURCES)]
    for group in names:
        base = sum(origin[r] for r in group)
        slopes = [sum(u[r] for r in group) - base for u in (units[0], units[1], units[2], units[3])]
        yield base, slopes


def _pad(values, n_t: int) -> np.ndarray:
    return np.concatenate([np.array(values, dtype=float), np.zeros(n_t)])


def _policy_from(place: Placement, policy: Policy) -> Policy:
    """Percents from fractions, rounded toward the compute side being smaller (the rest to disk)."""
    (wg, wh, _), (cg, ch, _) = place.weights, place.cache
    pct = lambda f: math.floor(f * 100 + 1e-6)  # noqa: E731
    return replace(policy, w_gpu_percent=pct(wg), w_cpu_percent=min(pct(wh), 100 - pct(wg)),
                   cache_gpu_percent=pct(cg), cache_cpu_percent=min(pct(ch), 100 - pct(cg)))


def exact_memory(layers, policy: Policy, dtype, micro_batches: int, workload: Workload, spec, cpu: bool) -> Plan:
    """The bytes per tier the engine will account for this stage (and refuse it on)."""
    return weight_plan(layers, policy, dtype, cpu) + block_plan(
        layers, policy, dtype, micro_batches, workload.prompt_len, _capacity(workload), spec.hidden_size,
        spec.vocab_size, spec.num_heads, workload.scored)


def _capacity(workload: Workload) -> int:
    """Tokens each row's KV cache holds: a scoring block's are its prompt's."""
    return workload.prompt_len + (0 if workload.scored is not None else workload.gen_len)


def shortfall(memory: Plan, budgets: Budgets, cpu: bool) -> tuple[str, int] | None:
    """(tier, bytes missing) where `memory` exceeds `budgets`, else None."""
    if cpu:
        need = {"host memory": (memory.total(Tier.COMPUTE) + memory.total(Tier.HOST), budgets.host)}
    else:
        need = {"GPU memory": (memory.total(Tier.COMPUTE), budgets.compute),
                "host memory": (memory.total(Tier.HOST), budgets.host)}
    disk = memory.total(Tier.DISK) - memory.bytes[Tier.DISK].get("weights", 0)  # those are in the store already
    need["disk"] = (disk, budgets.disk)
    worst = max(need.items(), key=lambda kv: kv[1][0] - kv[1][1])
    tier, (used, have) = worst
    return (tier, used - have) if used > have else None


def _left(memory: Plan, budgets: Budgets, cpu: bool) -> int:
    """Bytes of the compute device's budget (on a CPU: host memory) that `memory` leaves free."""
    if cpu:
        return budgets.host - memory.total(Tier.COMPUTE) - memory.total(Tier.HOST)
    return budgets.compute - memory.total(Tier.COMPUTE)


def _fit(layers, policy: Policy, dtype, rank: Rank, micro_batches: int, workload: Workload, spec) -> Policy | None:
    """`policy`, or the nearest one with less on the compute device and in host memory, that fits
    the budgets by the engine's own accounting (rounding whole tensors and rows may overshoot)."""
    cpu = rank.machine.cpu
    for _ in range(60):
        memory = exact_memory(layers, policy, dtype, micro_batches, workload, spec, cpu)
        missing = shortfall(memory, rank.budgets, cpu)
        if missing is None:
            return policy
        if missing[0] == "disk":
            return None
        if policy.w_gpu_percent + policy.w_cpu_percent > 0:  # move weights first: 5 points at a time
            moved = min(5, policy.w_cpu_percent) if missing[0] == "host memory" and not cpu else 0
            if moved == 0 and policy.w_gpu_percent > 0:
                policy = replace(policy, w_gpu_percent=max(policy.w_gpu_percent - 5, 0))
            else:
                policy = replace(policy, w_cpu_percent=max(policy.w_cpu_percent - max(moved, 5), 0))
        elif policy.cache_gpu_percent + policy.cache_cpu_percent > 0:
            policy = replace(policy, cache_gpu_percent=max(policy.cache_gpu_percent - 10, 0),
                             cache_cpu_percent=max(policy.cache_cpu_percent - 10, 0))
        else:
            return None
    return None


def plan_stage(layers, first: int, last: int, policy: Policy, dtype, rank: Rank, micro_batches: int,
               workload: Workload, spec) -> StagePlan | None:
    """The fastest placement of `layers` for this discrete choice on this rank, or None. Where
    everything fits in memory that is the answer (nothing to move is never slower): on the compute
    device, or on a CPU with packing, in host memory (the weights used plain) if that is faster."""
    resident = replace(policy, w_gpu_percent=100, w_cpu_percent=0, cache_gpu_percent=100, cache_cpu_percent=0)
    if not policy.compress_cache and shortfall(exact_memory(layers, resident, dtype, micro_batches, workload, spec,
                                                            rank.machine.cpu), rank.budgets, rank.machine.cpu) is None:
        homes = [resident]
        if rank.machine.cpu and _plain_differs(rank.machine, dtype):  # the same memory, used plain
            homes.append(replace(resident, w_gpu_percent=0, w_cpu_percent=100))
        return min((evaluate_stage(layers, first, last, p, dtype, rank, micro_batches, workload, spec) for p in homes),
                   key=lambda st: st.prefill_s + st.decode_s)
    best = None
    variants = [(s, st) for s in (False, True) for st in (False, True) if not (policy.compress_cache and not st)]
    for streaming, staged in variants:
        place = _lp_fractions(layers, policy, dtype, rank, workload, spec, micro_batches, streaming, staged)
        if place is None:
            continue
        fitted = _fit(layers, _policy_from(place, policy), dtype, rank, micro_batches, workload, spec)
        if fitted is None:
            continue
        candidate = evaluate_stage(layers, first, last, fitted, dtype, rank, micro_batches, workload, spec)
        if best is None or candidate.prefill_s + candidate.decode_s < best.prefill_s + best.decode_s:
            best = candidate
    return best


def evaluate_stage(layers, first: int, last: int, policy: Policy, dtype, rank: Rank, micro_batches: int,
                   workload: Workload, spec) -> StagePlan:
    """The predicted times and memory of a given policy on this stage (what a hand-written
    `--percent` is compared with). An unsized expert cache gets the memory the rest leaves."""
    if policy.expert_cache_gib is None:
        rest = exact_memory(layers, policy, dtype, micro_batches, workload, spec, rank.machine.cpu)
        policy = with_expert_cache(policy, layers, dtype, rank.machine.cpu, _left(rest, rank.budgets, rank.machine.cpu))
    prefill, decode, totals = stage_times(layers, policy, dtype, rank.machine, workload, spec.num_heads,
                                          spec.hidden_size)
    memory = exact_memory(layers, policy, dtype, micro_batches, workload, spec, rank.machine.cpu)
    return StagePlan(first, last, policy, memory, prefill, decode, totals, layers)


# ----- the whole job ---------------------------------------------------------------------------
def _powers(limit: int) -> list[int]:
    return [1 << i for i in range(max(limit, 1).bit_length()) if 1 << i <= limit]


def candidates(options: Options, num_prompts: int, ranks: int):
    """(dtype, gpu batch size, gpu batches, compress weight, compress cache, micro-batches)."""
    micro = options.micro_batches or ((ranks, 2 * ranks, 4 * ranks) if ranks > 1 else (1,))
    rows_cap = min(options.max_block, max(num_prompts, 1))
    for dtype, (cw, cc), m in itertools.product(options.dtypes, options.compression, micro):
        for gbs in options.gpu_batch_sizes or _powers(min(options.max_gpu_batch, max(rows_cap // m, 1))):
            for ngb in options.gpu_batches or _powers(max(rows_cap // (gbs * m), 1)):
                yield dtype, gbs, ngb, cw, cc, m


def plan(model: Model, ranks: list[Rank], workload: Workload, num_prompts: int, options: Options) -> RunPlan:
    """The best plan for the job, or Infeasible naming what is missing."""
    best, closest = None, None
    for dtype, gbs, ngb, cw, cc, m in _screened(model, ranks, workload, num_prompts, options):
        policy = replace(options.base, gpu_batch_size=gbs, num_gpu_batches=ngb, compress_weight=cw, compress_cache=cc)
        result = _plan_stages(model, ranks, policy, dtype, m, workload, num_prompts, options)
        if isinstance(result, RunPlan):
            if best is None or result.throughput > best.throughput:
                best = result
        elif closest is None or result[1] < closest[1]:
            closest = result
    if best is None:
        tier, missing = closest if closest else ("memory", 0)
        raise Infeasible(f"no placement fits: even the smallest plan needs {missing / GiB:.2f} GiB more {tier} "
                         "than the budget allows (a smaller model, shorter prompts, more memory, or --offload-dir "
                         "on a disk with more space)")
    return best


PIPELINE_SHORTLIST = 3


def _screened(model: Model, ranks: list[Rank], workload: Workload, num_prompts: int, options: Options):
    """The discrete choices worth a full plan. One rank: all. A pipeline: its micro-batch counts
    for the few batch and compression choices that plan best for the whole model on one rank
    with every rank's memory (the slowest rank's machine), since a full stage search is costly."""
    if len(ranks) == 1:
        yield from candidates(options, num_prompts, 1)
        return
    one_block = model.layers(0, 1, False, False, options.base.sep_layer)

    def block_seconds(r: Rank) -> float:
        prefill, decode, _ = stage_times(one_block, replace(options.base, gpu_batch_size=8), options.dtypes[-1],
                                         r.machine, workload, model.spec.num_heads, model.spec.hidden_size)
        return prefill + decode
    slowest = max(ranks, key=block_seconds)
    pooled = Rank(slowest.machine, Budgets(sum(r.budgets.compute for r in ranks), sum(r.budgets.host for r in ranks),
                                           sum(r.budgets.disk for r in ranks)))
    scored = []
    micro = options.micro_batches or (len(ranks), 2 * len(ranks), 4 * len(ranks))
    for dtype, gbs, ngb, cw, cc, _ in candidates(replace(options, micro_batches=(micro[0],)), num_prompts, len(ranks)):
        policy = replace(options.base, gpu_batch_size=gbs, num_gpu_batches=ngb, compress_weight=cw, compress_cache=cc)
        result = _plan_stages(model, [pooled], policy, dtype, micro[0], workload, num_prompts,
                              replace(options, stage_layers=None))
        if isinstance(result, RunPlan):
            scored.append((result.throughput, (dtype, gbs, ngb, cw, cc)))
    scored.sort(key=lambda t: -t[0])
    for _, (dtype, gbs, ngb, cw, cc) in scored[:PIPELINE_SHORTLIST] or []:
        for m in micro:
            if gbs * ngb * m <= max(min(options.max_block, num_prompts), m):
                yield dtype, gbs, ngb, cw, cc, m
    if not scored:  # nothing fits even pooled: let the full search name what is missing
        yield from itertools.islice(candidates(options, num_prompts, len(ranks)), 1)


def _plan_stages(model: Model, ranks: list[Rank], policy: Policy, dtype, micro: int, workload: Workload,
                 num_prompts: int, options: Options):
    """A RunPlan for this discrete choice, or (tier, bytes missing) of its closest miss."""
    spec, n = model.spec, model.spec.num_layers
    memo: dict[tuple[int, int, int], StagePlan | None] = {}

    def stage(s: int, first: int, last: int):
        key = (s, first, last) if s in (0, len(ranks) - 1) else (s, 0, last - first)
        if key not in memo:
            layers = model.layers(first, last, s == 0, s == len(ranks) - 1, policy.sep_layer)
            memo[key] = plan_stage(layers, first, last, policy, dtype, ranks[s], micro, workload, spec)
        found = memo[key]
        return None if found is None else replace(found, first=first, last=last)

    sizes = options.stage_layers or _split(len(ranks), n, lambda s, a, b: stage(s, a, b))
    if sizes is None:
        return _closest_miss(model, ranks, policy, dtype, micro, workload)
    stages, first = [], 0
    for s, size in enumerate(sizes):
        planned = stage(s, first, first + size)
        if planned is None:
            return _closest_miss(model, ranks, policy, dtype, micro, workload)
        stages.append(planned)
        first += size
    return run_plan(stages, ranks, dtype, micro, workload, num_prompts, spec, options.prefill_chunks)


PREFILL_PIECES = (1, 2, 4, 8, 16)


def run_plan(stages: list[StagePlan], ranks: list[Rank], dtype, micro: int, workload: Workload, num_prompts: int,
             spec, prefill_chunks: int | None = None) -> RunPlan:
    """The job's plan from its stages: their times through the pipeline, with the hidden states
    each stage sends per micro-batch step (a prompt's piece at prefill, one token at decode).
    A pipeline's prompts travel in the number of pieces that finishes the prefill first (or in
    `prefill_chunks`): more pieces shorten fill and drain, each costs a pass over the weights."""
    row = stages[0].policy.block_size * spec.hidden_size * dtype.itemsize
    copy_rate = min(r.machine.profile.rate("copy to host") for r in ranks) / 2
    choices = [prefill_chunks] if prefill_chunks else \
        [c for c in PREFILL_PIECES if c <= workload.prompt_len and (c == 1 or len(stages) > 1)]
    best = None
    for pieces in choices:
        piece_s = [s.prefill_s if pieces == 1 else
                   prefill_piece_time(s.layers, s.policy, dtype, r.machine, workload, pieces, spec.num_heads,
                                      spec.hidden_size) for s, r in zip(stages, ranks)]
        times = pipeline_time(piece_s, [s.decode_s for s in stages], micro,
                              [row * -(-workload.prompt_len // pieces), row], copy_rate, workload.gen_len, pieces)
        if best is None or times[0] < best[1][0]:
            best = (pieces, times)
    pieces, (prefill, decode) = best
    return RunPlan(dtype, micro, stages, workload, num_prompts, prefill, decode, pieces)


def _split(stages: int, n: int, stage) -> list[int] | None:
    """Layers per stage minimising the slowest stage's time (prefill + decode of one micro-batch),
    every stage planned on its own rank; None if no split fits."""
    if stages == 1:
        return [n] if stage(0, 0, n) is not None else None
    inf = float("inf")
    best = {(0, 0): (0.0, [])}
    for s in range(stages):
        nxt = {}
        for (_, i), (worst, sizes) in best.items():
            for j in range(i + 1, n - (stages - s - 1) + 1):
                if s == stages - 1 and j != n:
                    continue
                planned = stage(s, i, j)
                if planned is None:
                    continue
                value = max(worst, planned.prefill_s + planned.decode_s)
                if value < nxt.get((s + 1, j), (inf,))[0]:
                    nxt[(s + 1, j)] = (value, sizes + [j - i])
        best = nxt
    done = best.get((stages, n))
    return done[1] if done else None


def _closest_miss(model: Model, ranks: list[Rank], policy: Policy, dtype, micro: int, workload: Workload):
    """(tier, bytes) the emptiest placement still lacks on the tightest rank, for the error line."""
    spec, n = model.spec, model.spec.num_layers
    per = -(-n // len(ranks))
    worst = ("memory", 0)
    for s, rank in enumerate(ranks):
        first = min(s * per, n - 1)
        layers = model.layers(first, min(first + per, n), s == 0, s == len(ranks) - 1, policy.sep_layer)
        emptiest = replace(policy, w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)
        memory = exact_memory(layers, emptiest, dtype, micro, workload, spec, rank.machine.cpu)
        missing = shortfall(memory, rank.budgets, rank.machine.cpu)
        if missing and missing[1] > worst[1]:
            worst = missing
    return worst
