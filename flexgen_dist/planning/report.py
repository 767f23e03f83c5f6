"""The plan as printed: placement, batches, predicted memory per tier per rank, times, the busiest resource."""
from __future__ import annotations

from ..core.policy import Policy
from ..core.types import GiB, Tier, dtype_name
from ..storage.store import stored_nbytes
from .costmodel import expert_hit_rate, experts_touched
from .optimizer import Rank, RunPlan
from .profile import Budgets


# ----- the printed plan ------------------------------------------------------------------------
def describe(p: RunPlan, ranks: list[Rank], model=None) -> str:
    first = p.stages[0].policy
    lines = [f"plan: {p.num_prompts} prompts of {p.workload.prompt_len} tokens, {p.workload.gen_len} new tokens each; "
             f"dtype {dtype_name(p.dtype)}",
             f"  batches: gpu batch size {first.gpu_batch_size} x {first.num_gpu_batches} gpu batches"
             + (f" x {p.micro_batches} micro-batches" if len(p.stages) > 1 else "")
             + (f", prompts in {p.prefill_chunks} pieces" if p.prefill_chunks > 1 else "")
             + f" = {p.block_rows} sequences per block, {p.blocks} block(s)",
             f"  compression: weights {_onoff(first.compress_weight)}, KV cache {_onoff(first.compress_cache)}"]
    for i, (stage, rank) in enumerate(zip(p.stages, ranks)):
        pol = stage.policy
        lines.append(f"  rank {i}: layers {stage.first}-{stage.last - 1}; weights {_tiers(pol, 'w')}; "
                     f"KV cache {_tiers(pol, 'cache')}; activations on {pol.act_tier.value}")
        lines.append(f"    --percent {' '.join(f'{x:g}' for x in pol.percent)}")
        if model is not None:
            lines.extend(_experts(model, stage, p, rank.machine.cpu))
        lines.append("    predicted memory: " + _memory(stage.memory, rank))
        lines.append(f"    predicted per block: prefill {stage.prefill_s:.2f} s, decode {stage.decode_s:.2f} s; "
                     f"busiest resource: {stage.bottleneck} ("
                     + ", ".join(f"{k} {v:.2f} s" for k, v in stage.resources.items()) + ")")
    lines.append(f"  predicted: prefill {p.prefill_s:.2f} s + decode {p.decode_s:.2f} s per block, "
                 f"{p.total_s:.2f} s in all, {p.throughput:.2f} generated tokens/s")
    return "\n".join(lines)


def _experts(model, stage, p: RunPlan, cpu: bool) -> list[str]:
    """Where a MoE stage's experts live and how many of them a block step is expected to touch."""
    layers = [la for la in model.layers(stage.first, stage.last, False, False) if la.top_k]
    if not layers:
        return []
    layer, pol = layers[0], stage.policy
    each = sum(stored_nbytes(w, p.dtype, pol.weight_compression()) for w in layer.weights if w.expert == 0)
    decode = experts_touched(layer.num_experts, layer.top_k, pol.block_size)
    prefill = experts_touched(layer.num_experts, layer.top_k, pol.block_size * p.workload.prompt_len)
    return [(f"    experts: {len(layers)} MoE layers x {layer.num_experts} experts of {each / 2**20:.1f} MiB, "
             f"{layer.top_k} per token, on {_tiers(pol, 'experts')}; a block step touches about "
             f"{decode:.1f} per layer in decode, {prefill:.1f} in prefill (only those are read)"),
            f"    expert cache: {(pol.expert_cache_gib or 0):.2f} GiB in fast memory, serving about "
            f"{expert_hit_rate(stage.layers or layers, pol, p.dtype, cpu):.0%} of the routed experts' uses"]


def _onoff(flag: bool) -> str:
    return "4-bit" if flag else "no"


def _tiers(policy: Policy, kind: str) -> str:
    names = ("compute device", "host memory", "disk")
    parts = [f"{p:g}% {n}" for p, n in zip(policy.tier_percents(kind), names) if p]
    return ", ".join(parts) or "none"


def _memory(memory, rank: Rank) -> str:
    b: Budgets = rank.budgets
    if rank.machine.cpu:
        used = memory.total(Tier.COMPUTE) + memory.total(Tier.HOST)
        text = f"RAM {used / GiB:.2f} of {b.host / GiB:.2f} GiB"
    else:
        text = (f"GPU {memory.total(Tier.COMPUTE) / GiB:.2f} of {b.compute / GiB:.2f} GiB, "
                f"host {memory.total(Tier.HOST) / GiB:.2f} of {b.host / GiB:.2f} GiB")
    return text + f", disk {memory.total(Tier.DISK) / GiB:.2f} GiB"
