"""Planning a job: this rank's machine measured (`profile_model`) and its budgets, the options the
user left open, the optimizer's decision shared by every rank (`plan_run`), the prediction next to
the measurement after a run (`compare`), and `auto_policy` for the Python API. The command line
that prints a plan is `cli/plan.py` (`python -m flexgen_dist.plan`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..core.config import (
    DEFAULT_OFFLOAD_DIR,
    EngineConfig,
    JobConfig,
    PlannerConfig,
)
from ..core.errors import FlexGenError
from ..core.policy import Policy
from ..core.types import GiB, dtype_name
from ..dist.group import DistContext, broadcast, gather
from ..formats.prompts import encode
from ..kernels.probe import dtype_candidates
from ..models import BUILTIN, builtin_spec, family_of, spec_from_dir
from ..models.checkpoint import resolve_model
from ..storage.devices import Devices
from ..system.limits import limit_host_memory
from ..system.workdir import prepare_offload_dir
from .costmodel import Machine, Workload
from .measure import profile_model
from .optimizer import Model, Options, Rank, RunPlan, evaluate_stage, plan, run_plan
from .profile import budgets, load_profile
from .report import describe


def this_rank(spec, config: PlannerConfig, offload_dir: str, dtypes, rank: int = 0, announce: bool = False,
              options: Options | None = None) -> Rank:
    """This process's machine, measured as far as the model needs (its layers with 4-bit weights
    too where `options` may compress them), and its budgets. With
    `announce`, a line before measuring anything and one when done, on stdout with the plan (stderr
    carries only warnings and errors): the first run of a model on a machine measures for one or
    two minutes on a small CPU, which would otherwise look like a hang."""
    device = Devices.detect().compute
    profile = load_profile(device, reprofile=config.reprofile)
    if announce:
        profile.on_first_measurement = lambda: print(
            f"measuring this machine for the planner (kept in {os.path.dirname(profile.path)} for later runs)",
            flush=True)
    int4 = options is not None and any(weights for weights, _ in options.compression)
    profile_model(profile, device, dtypes, spec, family_of(spec), offload_dir, int4)
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
    """What `run` refuses, the planner refuses too, in the same words (`run` checks --gen-len
    through GenerationConfig.validate, and --prompt-len only for synthetic prompts)."""
    for flag, value in (("--prompt-len", prompt_len), ("--gen-len", gen_len), ("--num-prompts", num_prompts)):
        if value is not None and value < 1:
            raise FlexGenError(f"{flag} must be at least 1, got {value}")


def auto_policy(model: str, prompt_len: int, gen_len: int, num_prompts: int | None = None, *,
                offload_dir: str = DEFAULT_OFFLOAD_DIR, dtype: str = "auto", gpu_mem: float | None = None,
                cpu_mem: float | None = None, disk_mem: float | None = None, auto_compress: bool = False,
                **fixed) -> Policy:
    """The planner's policy for one rank running `model` (a built-in name or a local directory)
    on `num_prompts` prompts of `prompt_len` tokens and `gen_len` new tokens, within this
    machine's memory (or the GiB given). `fixed` are Policy fields to keep as given. Use it
    with the planner's dtype: `Engine.from_pretrained(..., policy=p, dtype=p.planned_dtype)`."""
    check_workload(prompt_len, gen_len, num_prompts)
    spec = model_spec(model)
    config = PlannerConfig(gpu_mem=gpu_mem, cpu_mem=cpu_mem, disk_mem=disk_mem, auto_compress=auto_compress)
    dtypes = dtype_candidates(dtype, Devices.detect().compute, spec.hidden_size)
    base = Policy(**fixed).validate()
    options = options_for(config, base, dtypes, fixed={k: v for k, v in fixed.items() if k in POLICY_CHOICES})
    rank = this_rank(spec, config, prepare_offload_dir(offload_dir), dtypes, options=options)
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


def plan_run(ctx: DistContext, job: JobConfig, config: PlannerConfig, engine_config: EngineConfig, gen_len: int,
             policy: Policy, requests, given: set[str], given_workload: Workload | None = None) -> Planned:
    """Measure every rank and, with `--policy auto` (the default without --percent), plan the job.
    `policy` is the one the flags give; `given` names the options the user set (kept as set).
    `given_workload` (rank 0's) replaces the one the job's requests give (a scoring workload)."""
    auto = plans_policy(config, given)
    model = resolve_model(job.model, dummy_weights=engine_config.dummy_weights)
    spec = model.spec
    if config.rank_mem and len(config.rank_mem) != ctx.world_size:
        raise FlexGenError(f"--rank-mem has {len(config.rank_mem)} values for {ctx.world_size} ranks")
    mine = config.rank_mem[ctx.rank] if config.rank_mem else config.cpu_mem
    if mine is not None:  # the engine's own memory checks hold this rank to it too
        limit_host_memory(int(mine * GiB))
    workload, num_prompts = (job_workload(job, gen_len, requests, job.tokenizer or model.tokenizer_path,
                                          spec.max_positions) if ctx.first else (None, 0))
    if workload is not None and given_workload is not None:
        workload = given_workload
    device = Devices.detect().compute
    dtypes = dtype_candidates(engine_config.dtype, device, spec.hidden_size)
    fixed = {k: getattr(policy, k) for k in given & POLICY_CHOICES}
    chunks = engine_config.prefill_chunks if "prefill_chunks" in given else None
    options = options_for(config, policy, dtypes, engine_config.stage_layers, engine_config.micro_batches, fixed,
                          chunks)
    me = this_rank(spec, config, prepare_offload_dir(engine_config.offload_dir), dtypes, ctx.rank,
                   announce=ctx.first and not job.quiet, options=options)
    ranks = gather(ctx, me)
    decision = None
    if auto:
        decision = broadcast(ctx, _decide(ctx, spec, ranks, workload, num_prompts, options))
        if isinstance(decision, Exception):
            raise decision
        if ctx.first and not job.quiet:
            print(decision.text)
    return Planned(auto, decision, ranks, workload, num_prompts, spec, options)


def plans_policy(config: PlannerConfig, given: set[str]) -> bool:
    """Whether the planner chooses the policy: `--policy auto`, or no policy and no --percent given."""
    return config.policy == "auto" or (config.policy is None and "percent" not in given)


POLICY_CHOICES = {"gpu_batch_size", "num_gpu_batches", "compress_weight", "compress_cache"}


def _decide(ctx, spec, ranks, workload, num_prompts, options):
    if not ctx.first:
        return None
    try:
        model = Model(spec, family_of(spec))
        best = plan(model, ranks, workload, num_prompts or options.max_block, options)
        if not num_prompts:  # synthetic prompts without --num-prompts: one block, as the planner sizes it
            best = replace(best, num_prompts=best.block_rows)
        return Decision([s.policy for s in best.stages], best.stage_layers, best.micro_batches,
                        dtype_name(best.dtype), describe(best, ranks, model), best.prefill_chunks)
    except FlexGenError as e:
        return e


def job_workload(job: JobConfig, gen_len: int, requests, tokenizer_path, max_positions: int) -> tuple[Workload, int]:
    """(the lengths to plan for, the number of prompts; 0 = as many as one block holds). With a
    prompts file, the longest prompt and the largest max_tokens of the requests that will run
    (every block must fit): not those the job will answer with an error record."""
    if requests is None:
        return Workload(job.prompt_len, gen_len), job.num_prompts or 0
    tokenizer = None
    if tokenizer_path and any(r.prompt.ids is None for r in requests):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    longest, runs, default_len = 1, 0, gen_len
    for r in requests:
        if r.error:
            continue  # answered with an error record, never run
        try:
            ids = r.prompt.ids if r.prompt.ids is not None else encode(r.prompt, tokenizer)
        except (FlexGenError, TypeError, AttributeError):
            continue  # the batch job reports this request's problem itself
        new = r.params.get("max_tokens", default_len)
        if len(ids) + new > max_positions:
            continue  # too long for the model: an error record too
        longest, gen_len, runs = max(longest, len(ids)), max(gen_len, new), runs + 1
    return Workload(longest, gen_len), max(runs, 1)


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
