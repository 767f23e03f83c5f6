"""Print the plan for a job without running it:

    python -m flexgen_dist.plan --model opt-1.3b --prompt-len 512 --gen-len 32 --num-prompts 64 --cpu-mem 4

where each tensor class lives, batches, stages, predicted memory per tier per rank, predicted
prefill and decode time and throughput, and the bottleneck. `--ranks N` plans an N-rank pipeline
on this machine (its cores shared by the ranks, as `launch/run_local.sh` does); `--rank-mem`
gives the ranks unequal memory. The first run on a machine measures it (see hardware.py).

The functions here are also what `flexgen_dist.run` uses to plan on every rank of a job.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace

import torch

from . import probe
from .budget import GiB, limit_host_memory
from .config import DEFAULT_OFFLOAD_DIR, PlannerConfig, pick
from .costmodel import Machine, Workload
from .dist import DistContext, broadcast, gather
from .errors import FlexGenError
from .flags import DefaultsHelpFormatter, OneLineErrorParser, add_fields
from .hardware import Budgets, budgets, dtype_name, load_profile, profile_model
from .memory import Devices
from .models import BUILTIN, builtin_spec, family_of, spec_from_dir
from .generation import DTYPES, prepare_offload_dir
from .planner import Model, Options, Rank, RunPlan, evaluate_stage, plan, run_plan
from .policy import Policy, Tier


def dtype_candidates(requested: str | None, device: torch.device, dim: int = 2048) -> tuple[torch.dtype, ...]:
    """The dtypes the planner may choose: the requested one, else those with a fast path here."""
    if requested not in (None, "auto"):
        return (DTYPES[requested],)
    if device.type == "cuda":
        return (probe.choose_cuda_dtype(device).dtype,)
    forced = probe._forced(probe.BF16_ENV)
    if forced is not None:
        return (torch.bfloat16 if forced else torch.float32,)
    if not probe.cpu_has_bf16_path():
        return (torch.float32,)
    speedup = probe.bf16_speedup(dim)
    if speedup > BF16_DOMINATES:  # half the bytes and this much faster: fp32 cannot win
        return (torch.bfloat16,)
    return (torch.float32,) if speedup < 1 / BF16_DOMINATES else (torch.float32, torch.bfloat16)


BF16_DOMINATES = 1.5


def this_rank(spec, config: PlannerConfig, offload_dir: str, dtypes, rank: int = 0, announce: bool = False) -> Rank:
    """This process's machine, measured as far as the model needs, and its budgets. With
    `announce`, a line before measuring anything and one when done, on stdout with the plan (stderr
    carries only warnings and errors): the first run of a model on a machine measures for one or
    two minutes on a small CPU, which would otherwise look like a hang."""
    device = Devices.detect().compute
    profile = load_profile(device, reprofile=config.reprofile)
    if announce:
        profile.on_first_measurement = lambda: print(
            f"measuring this machine for the planner (kept in {os.path.dirname(profile.path)} for later runs)",
            flush=True)
    profile_model(profile, device, dtypes, spec, family_of(spec), offload_dir)
    if announce and profile.measured_s:
        print(f"measured in {profile.measured_s:.0f} s", flush=True)
    cpu_mem = config.rank_mem[rank] if config.rank_mem else config.cpu_mem
    limits = budgets(device, offload_dir, config.gpu_mem, cpu_mem, config.disk_mem)
    return Rank(Machine(profile, device.type == "cpu", offload_dir, spec), limits)


def options_for(config: PlannerConfig, base: Policy, dtypes, stage_layers=None, micro_batches=None,
                fixed: dict | None = None, prefill_chunks: int | None = None) -> Options:
    """What the planner may choose: compression only when allowed or asked for, batch sizes only
    when not given (`fixed` holds the policy fields the user set)."""
    fixed = fixed or {}
    if "compress_weight" in fixed or "compress_cache" in fixed or not config.auto_compress:
        compression = ((base.compress_weight, base.compress_cache),)
    else:
        compression = ((False, False), (False, True), (True, False), (True, True))
    return Options(dtypes=tuple(dtypes), compression=compression, base=base, stage_layers=stage_layers,
                   micro_batches=(micro_batches,) if micro_batches else None, prefill_chunks=prefill_chunks,
                   gpu_batch_sizes=(fixed["gpu_batch_size"],) if "gpu_batch_size" in fixed else None,
                   gpu_batches=(fixed["num_gpu_batches"],) if "num_gpu_batches" in fixed else None)


@dataclass
class Decision:
    """What every rank needs from rank 0's plan."""

    policies: list[Policy]
    stage_layers: list[int]
    micro_batches: int
    dtype: str
    text: str  # the plan as printed
    prefill_chunks: int = 1


def predict(spec, ranks: list[Rank], policies: list[Policy], stage_layers: list[int], micro: int, dtype,
            workload: Workload, num_prompts: int, prefill_chunks: int = 1) -> RunPlan:
    """The cost model's prediction for a given (hand-written) policy and stages."""
    model, stages, first = Model(spec, family_of(spec)), [], 0
    for s, (size, policy) in enumerate(zip(stage_layers, policies)):
        layers = model.layers(first, first + size, s == 0, s == len(stage_layers) - 1, policy.sep_layer)
        stages.append(evaluate_stage(layers, first, first + size, policy, dtype, ranks[s], micro, workload, spec))
        first += size
    return run_plan(stages, ranks, dtype, micro, workload, num_prompts, spec, prefill_chunks)


def model_spec(name_or_path: str):
    """The shape of a built-in model or of a local Hugging Face directory: all the planner needs."""
    path = os.path.expanduser(name_or_path)
    spec = spec_from_dir(path) if os.path.isdir(path) else builtin_spec(name_or_path)
    if spec is None:
        raise FlexGenError(f"model {name_or_path} is neither a built-in name ({', '.join(sorted(BUILTIN))}) "
                           f"nor a model directory")
    return spec


def check_workload(prompt_len: int, gen_len: int, num_prompts: int | None) -> None:
    """What `run` refuses, the planner refuses too, one line each (run words --gen-len's through
    GenerationConfig.validate and checks --prompt-len only for synthetic prompts)."""
    for flag, value in (("--prompt-len", prompt_len), ("--gen-len", gen_len), ("--num-prompts", num_prompts)):
        if value is not None and value < 1:
            raise FlexGenError(f"{flag} must be at least 1, got {value}")


def plan_one_rank(model: str, prompt_len: int, gen_len: int, num_prompts: int | None, *, offload_dir: str,
                  dtype: str, gpu_mem, cpu_mem, disk_mem, auto_compress: bool, fixed: dict) -> Policy:
    """`Policy.auto`: the best single-rank policy, with the chosen dtype as `planned_dtype`."""
    check_workload(prompt_len, gen_len, num_prompts)
    spec = model_spec(model)
    config = PlannerConfig(gpu_mem=gpu_mem, cpu_mem=cpu_mem, disk_mem=disk_mem, auto_compress=auto_compress)
    dtypes = dtype_candidates(dtype, Devices.detect().compute, spec.hidden_size)
    rank = this_rank(spec, config, prepare_offload_dir(offload_dir), dtypes)
    base = Policy(**fixed).validate()
    options = options_for(config, base, dtypes, fixed={k: v for k, v in fixed.items() if k in POLICY_CHOICES})
    best = plan(Model(spec, family_of(spec)), [rank], Workload(prompt_len, gen_len), num_prompts or 4096, options)
    policy = best.stages[0].policy
    policy.planned_dtype = dtype_name(best.dtype)
    return policy


# ----- a run's plan ----------------------------------------------------------------------------
@dataclass
class Planned:
    """What `run` planned: whether the policy is the planner's, rank 0's decision, and what the
    prediction of the run needs afterwards (the ranks' machines, the workload)."""

    auto: bool
    decision: Decision | None
    ranks: list[Rank]
    workload: Workload
    num_prompts: int
    spec: object
    options: Options | None = None


def plan_run(args, ctx: DistContext, policy: Policy, engine_config, requests) -> Planned:
    """Measure every rank and, with `--policy auto` (the default without --percent), plan the job."""
    from .weights import resolve_model
    config = PlannerConfig(**pick(PlannerConfig, args))
    auto = config.policy == "auto" or (config.policy is None and args.percent is None)
    model = resolve_model(args.model, dummy_weights=args.dummy_weights)
    spec = model.spec
    if config.rank_mem and len(config.rank_mem) != ctx.world_size:
        raise FlexGenError(f"--rank-mem has {len(config.rank_mem)} values for {ctx.world_size} ranks")
    mine = config.rank_mem[ctx.rank] if config.rank_mem else config.cpu_mem
    if mine is not None:  # the engine's own memory checks hold this rank to it too
        limit_host_memory(int(mine * GiB))
    workload, num_prompts = (job_workload(args, requests, args.tokenizer or model.tokenizer_path)
                             if ctx.first else (None, 0))
    device = Devices.detect().compute
    dtypes = dtype_candidates(engine_config.dtype, device, spec.hidden_size)
    fixed = {k: getattr(policy, k) for k in getattr(args, "given", set()) & POLICY_CHOICES}
    chunks = engine_config.prefill_chunks if "prefill_chunks" in getattr(args, "given", set()) else None
    options = options_for(config, policy, dtypes, engine_config.stage_layers, engine_config.micro_batches, fixed,
                          chunks)
    me = this_rank(spec, config, prepare_offload_dir(engine_config.offload_dir), dtypes, ctx.rank,
                   announce=ctx.first and not args.quiet)
    ranks = gather(ctx, me)
    decision = None
    if auto:
        decision = broadcast(ctx, _decide(ctx, spec, ranks, workload, num_prompts, options, args))
        if isinstance(decision, Exception):
            raise decision
        if ctx.first and not args.quiet:
            print(decision.text)
    return Planned(auto, decision, ranks, workload, num_prompts, spec, options)


POLICY_CHOICES = {"gpu_batch_size", "num_gpu_batches", "compress_weight", "compress_cache"}


def _decide(ctx, spec, ranks, workload, num_prompts, options, args):
    if not ctx.first:
        return None
    try:
        best = plan(Model(spec, family_of(spec)), ranks, workload, num_prompts or options.max_block, options)
        if not num_prompts:  # synthetic prompts without --num-prompts: one block, as the planner sizes it
            best = replace(best, num_prompts=best.block_rows)
        return Decision([s.policy for s in best.stages], best.stage_layers, best.micro_batches,
                        dtype_name(best.dtype), describe(best, ranks), best.prefill_chunks)
    except FlexGenError as e:
        return e


def job_workload(args, requests, tokenizer_path) -> tuple[Workload, int]:
    """(the lengths to plan for, the number of prompts; 0 = as many as one block holds). With a
    prompts file, the longest prompt and the largest max_tokens: every block must fit."""
    gen_len = args.max_new_tokens
    if requests is None:
        return Workload(args.prompt_len, gen_len), args.num_prompts or 0
    from .prompts import _encode
    tokenizer = None
    if tokenizer_path and any(r.prompt.ids is None for r in requests):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    longest = 1
    for r in requests:
        try:
            ids = r.prompt.ids if r.prompt.ids is not None else _encode(r.prompt, tokenizer)
        except (FlexGenError, TypeError, AttributeError):
            continue  # the batch job reports this request's problem itself
        longest = max(longest, len(ids))
        gen_len = max(gen_len, int(r.params.get("max_tokens", gen_len) or gen_len))
    return Workload(longest, gen_len), max(len(requests), 1)


def compare(planned: Planned, engine, stages: list[dict]) -> dict:
    """Rank 0, after the run: the prediction next to the measurement, and for a hand-written
    policy a warning when the planner expects much better."""
    stats = engine.last_stats
    measured = stats.total_throughput
    policies = [engine.policy] * len(stages) if not planned.auto else planned.decision.policies
    sizes = [st["layers"][1] - st["layers"][0] for st in stages]
    guess = predict(planned.spec, planned.ranks, policies, sizes, engine.micro_batches, engine.dtype,
                    planned.workload, stats.prompts, engine.prefill_chunks)
    out = {"predicted_throughput": guess.throughput, "predicted_prefill_s": guess.prefill_s * guess.blocks,
           "predicted_decode_s": guess.decode_s * guess.blocks, "auto": planned.auto,
           "lines": [f"predicted: {guess.throughput:.2f} token/s (prefill {guess.prefill_s * guess.blocks:.2f} s, "
                     f"decode {guess.decode_s * guess.blocks:.2f} s); measured: {measured:.2f} token/s"]}
    if not planned.auto:
        try:
            free = replace(planned.options, gpu_batch_sizes=None, gpu_batches=None, stage_layers=None,
                           micro_batches=None, prefill_chunks=None)  # the planner's choice in the run's place
            best = plan(Model(planned.spec, family_of(planned.spec)), planned.ranks, planned.workload,
                        stats.prompts, free)
        except FlexGenError:
            return out
        out["best_predicted_throughput"] = best.throughput
        if best.throughput > FAR_FROM_BEST * guess.throughput:
            pol = best.stages[0].policy
            out["lines"].append(
                f"warning: the planner expects {best.throughput:.2f} token/s for these {stats.prompts} prompts, "
                f"{best.throughput / guess.throughput:.1f}x this policy's {guess.throughput:.2f}: --policy auto, or "
                f"--percent {' '.join(f'{x:g}' for x in pol.percent)} --gpu-batch-size {pol.gpu_batch_size} "
                f"--num-gpu-batches {pol.num_gpu_batches} --dtype {dtype_name(best.dtype)}")
    return out


FAR_FROM_BEST = 1.5


# ----- the printed plan ------------------------------------------------------------------------
def describe(p: RunPlan, ranks: list[Rank]) -> str:
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
        lines.append("    predicted memory: " + _memory(stage.memory, rank))
        lines.append(f"    predicted per block: prefill {stage.prefill_s:.2f} s, decode {stage.decode_s:.2f} s; "
                     f"busiest resource: {stage.bottleneck} ("
                     + ", ".join(f"{k} {v:.2f} s" for k, v in stage.resources.items()) + ")")
    lines.append(f"  predicted: prefill {p.prefill_s:.2f} s + decode {p.decode_s:.2f} s per block, "
                 f"{p.total_s:.2f} s in all, {p.throughput:.2f} generated tokens/s")
    return "\n".join(lines)


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


# ----- the command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m flexgen_dist.plan", description=__doc__,
                           formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="opt-125m", help="built-in name or local Hugging Face directory")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=None, help="prompts in the job (default: as many as the best block holds, up to 4096)")
    p.add_argument("--ranks", type=int, default=1, help="pipeline ranks on this machine")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--offload-dir", default=DEFAULT_OFFLOAD_DIR)
    add_fields(p, PlannerConfig, skip=("policy",), title="planner")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = PlannerConfig(**pick(PlannerConfig, args))
        check_workload(args.prompt_len, args.gen_len, args.num_prompts)
        if args.ranks < 1:
            raise FlexGenError(f"--ranks must be at least 1, got {args.ranks}")
        spec = model_spec(args.model)
        if config.rank_mem and len(config.rank_mem) != args.ranks:
            raise FlexGenError(f"--rank-mem needs one value per rank ({args.ranks})")
        offload_dir = prepare_offload_dir(args.offload_dir)  # a first run's default dir does not exist yet
        device = Devices.detect().compute
        dtypes = dtype_candidates(args.dtype, device, spec.hidden_size)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads // args.ranks, 1))  # each rank's share of the cores
        ranks = [this_rank(spec, config, offload_dir, dtypes, r, announce=r == 0) for r in range(args.ranks)]
        num_prompts = args.num_prompts or 4096
        options = options_for(config, Policy(), dtypes)
        best = plan(Model(spec, family_of(spec)), ranks, Workload(args.prompt_len, args.gen_len), num_prompts, options)
        if args.num_prompts is None:
            best = replace(best, num_prompts=best.block_rows)
        print(describe(best, ranks))
    except FlexGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
