"""Batch generation with offloading: python -m flexgen_dist.run --model MODEL --prompts FILE --output OUT.jsonl
(under mpirun, one pipeline stage per rank). Every flag below is also a key of a --config file."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback

from ..core.config import (
    EngineConfig,
    GenerationConfig,
    JobConfig,
    PlannerConfig,
    field_docs,
    pick,
)
from ..core.errors import FlexGenError
from ..core.policy import PERCENT_FIELDS, Policy
from ..core.types import GiB, Tier
from ..dist.context import DistContext, detect
from ..dist.failures import fail, stop_watching, watch_for_failures
from ..dist.group import broadcast, gather, init, shutdown
from ..engine.engine import Engine
from ..formats.outputs import JobOutput, append_line, check_writable
from ..formats.prompts import synthetic_prompts
from ..formats.requests import Request, read_requests
from ..models.checkpoint import resolve_model
from ..planning.plan import compare, plan_run
from ..runtime.budget import MARGIN
from ..runtime.stages import check_stage_layers
from ..runtime.stats import GenerationStats
from ..system.limits import peak_rss_bytes
from ..system.workdir import exit_cleanly_on_signals
from .flags import (
    SHARED_FIELDS,
    DefaultsHelpFormatter,
    OneLineErrorParser,
    add_fields,
    add_shared_fields,
    check_config_keys,
    config_defaults,
    flag_name,
)

EXIT_FAILED_REQUESTS = 3  # the job ran, but no request succeeded (or any failed, with --fail-on-error)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m flexgen_dist.run", description=__doc__,
                           formatter_class=DefaultsHelpFormatter)
    p.add_argument("--config", help="JSON file of defaults for any flag below (keys as flag names with _); "
                   "flags given on the command line win")
    add_shared_fields(p)
    add_fields(p, JobConfig, skip=SHARED_FIELDS, title="job")
    add_fields(p, EngineConfig, skip=SHARED_FIELDS, title="engine")
    policy = add_fields(p, Policy, skip=PERCENT_FIELDS, title="policy")
    policy.add_argument("--percent", nargs="+", type=float, default=None, metavar="P",
                        help="W_GPU W_CPU CACHE_GPU CACHE_CPU ACT_GPU ACT_CPU: percents of weights, KV cache and "
                        "activations on the compute device and in host memory; the rest of each pair on disk "
                        "(given: the policy is manual; without --policy auto, 100 0 100 0 100 0)")
    add_fields(p, PlannerConfig, title="planner")
    generation = add_fields(p, GenerationConfig, skip=("stop", "seed", *SHARED_FIELDS), title="generation")
    generation.add_argument("--stop", action="append", default=[], metavar="ID_OR_TEXT",
                            help=field_docs(GenerationConfig)["stop"])
    return p


def policy_from_args(args) -> Policy:
    return Policy.from_percent(args.percent or Policy().percent, **{k: v for k, v in pick(Policy, args).items()
                                                                    if k not in PERCENT_FIELDS}).validate(flag_name)


def stop_ids(values: list[str], tokenizer) -> list[int]:
    ids = []
    for v in values:
        if v.lstrip("-").isdigit():
            ids.append(int(v))
            continue
        if tokenizer is None:
            raise FlexGenError(f"--stop {v!r} is text but there is no tokenizer; give a token id")
        encoded = tokenizer(v, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise FlexGenError(f"--stop {v!r} is {len(encoded)} tokens; a stop must be a single token")
        ids.append(encoded[0])
    return ids


def report(stats: GenerationStats) -> str:
    d = stats.as_dict()
    peaks = ", ".join(f"{tier} {n / GiB:.3f}" for tier, n in d["peak_bytes"].items())
    return "\n".join([
        f"prompts: {d['prompts']}  prompt tokens: {d['prompt_tokens']}  generated tokens: {d['generated_tokens']}",
        f"prefill latency: {d['prefill_latency_s']:.3f} s  prefill throughput: {d['prefill_throughput']:.2f} token/s",
        f"decode latency: {d['decode_latency_s']:.3f} s  decode throughput: {d['decode_throughput']:.2f} token/s",
        f"total latency: {d['total_latency_s']:.3f} s  total throughput: {d['total_throughput']:.2f} token/s",
        f"peak memory (GiB): {peaks}, process RSS {d['peak_rss_bytes'] / GiB:.3f}",
    ])


def run(args, ctx: DistContext) -> int:
    if ctx.first:  # before any loading: a run must not end in a file it cannot write
        for path, what in ((args.output, "--output"), (args.log_file, "--log-file")):
            if path:
                check_writable(path, what)
    if args.num_prompts is not None and args.num_prompts < 1:
        raise FlexGenError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    policy = policy_from_args(args)
    gen = GenerationConfig(**pick(GenerationConfig, args)).validate(flag_name)
    engine_config = EngineConfig(**pick(EngineConfig, args)).validate(flag_name)
    requests = read_requests(args.prompts) if args.prompts and ctx.first else None
    if engine_config.stage_layers:
        spec = resolve_model(args.model, dummy_weights=args.dummy_weights).spec
        check_stage_layers(engine_config.stage_layers, spec.num_layers, ctx.world_size)
    ctx = init(ctx, engine_config.comm_device, engine_config.comm_timeout)
    watch_for_failures(ctx)
    finished = broadcast(ctx, finished_already(args, gen) if ctx.first else None)
    if finished is not None:  # a rerun of a finished job: say so before planning, loading anything
        if ctx.first:
            print(f"nothing to generate: all {finished} requests are in {args.output} already "
                  "(delete it, or give another --output, to generate them again)")
        return 0
    engine_config.offload_dir = engine_config.offload_dir.format(rank=ctx.rank, local_rank=ctx.local_rank)
    planned = plan_run(ctx, JobConfig(**pick(JobConfig, args)), PlannerConfig(**pick(PlannerConfig, args)),
                       engine_config, gen.max_new_tokens, policy, requests, args.given)
    if planned.auto:
        policy = planned.decision.policies[ctx.rank]
        engine_config.stage_layers = planned.decision.stage_layers
        engine_config.micro_batches = planned.decision.micro_batches
        engine_config.prefill_chunks = planned.decision.prefill_chunks
        if len(planned.options.dtypes) > 1:  # else the planner had the probe's (or the user's) dtype only
            engine_config.dtype = planned.decision.dtype
    t0 = time.perf_counter()
    with Engine.from_pretrained(args.model, policy=policy, config=engine_config, dist=ctx) as engine:
        load_s = time.perf_counter() - t0
        if args.tokenizer:
            engine.tokenizer_path = args.tokenizer
        job = start_job(args, engine, gen, requests) if ctx.first else {}
        # synthetic prompts (no --prompts) are the job's own settings: a bad one ends the job
        engine.generate_batch(job.get("requests"), bucket=args.bucket, strict=args.strict or not args.prompts, done=job.get("done", ()),
                              on_records=job.get("write", lambda records: None), progress=False if args.quiet else None,
                              model_name=args.model, created=job.get("created"), **vars(gen))
        stages = gather(ctx, stage_summary(engine, load_s))
        if ctx.first:
            if job["output"] is not None:
                job["output"].finish()
            finish(args, engine, stages, compare(planned, engine, stages))
    return exit_status(args, engine.last_batch) if ctx.first else 0


def start_job(args, engine: Engine, gen: GenerationConfig, requests) -> dict:
    """Rank 0: the requests (synthetic ones without --prompts), the stop tokens, and the output
    journal with what it already holds."""
    if requests is None:
        count = engine.micro_batches * engine.policy.block_size if args.num_prompts is None else args.num_prompts
        requests = [Request(p.index, p) for p in synthetic_prompts(count, args.prompt_len, engine.spec.vocab_size, args.seed)]
    gen.stop = stop_ids(args.stop, engine.tokenizer)
    job = {"requests": requests, "output": None, "created": int(time.time())}
    if args.output:
        out = JobOutput(args.output, job_manifest(args, engine, gen, job["created"]))
        done = out.start()
        for note in out.notes:
            print(f"note: {note}", file=sys.stderr)
        job.update(output=out, write=out.append, created=out.manifest["created"],
                   done=range(len(requests)) if out.complete else set(done))
        if done or out.complete:
            print(f"resuming {args.output}: {len(requests) if out.complete else len(done)} of {len(requests)} "
                  "requests already done", file=sys.stderr)
    return job


def finished_already(args, gen: GenerationConfig) -> int | None:
    """Rank 0, before planning: the number of requests in `--output` if it is the whole, finished
    output of this same job (model, weights, input, tokenizer and generation settings as its
    manifest records them; a text `--stop` is compared only once the tokenizer is loaded); else
    None, and the job runs (its resume checks the output against all the manifest records)."""
    old = JobOutput.finished(args.output) if args.output else None
    if old is None:
        return None
    recorded = old.get("generation", {})
    stops = [int(v) for v in args.stop] if all(v.lstrip("-").isdigit() for v in args.stop) else recorded.get("stop")
    weights = resolve_model(args.model, dummy_weights=args.dummy_weights).source.fingerprint
    now = {"model": args.model, "weights": weights, "tokenizer": args.tokenizer, "input": job_input(args),
           "generation": {**vars(gen), "stop": stops}}
    return old["records"] if all(old.get(key) == value for key, value in now.items()) else None


def exit_status(args, info) -> int:
    """0, or EXIT_FAILED_REQUESTS when no request of the job succeeded (or, with --fail-on-error,
    when any failed); the failures' records are in the output either way."""
    if not info.errors:
        return 0
    print(f"error: {info.errors} of {info.requests} requests failed, the first: {info.first_error}",
          file=sys.stderr)
    none_ran = info.succeeded == 0 and not info.skipped
    return EXIT_FAILED_REQUESTS if none_ran or args.fail_on_error else 0


def job_input(args) -> dict:
    """What the job's requests come from: the input file's digest, or the synthetic settings."""
    if args.prompts:
        return {"file_sha256": file_digest(args.prompts)}
    return {"synthetic": [args.prompt_len, args.num_prompts, args.seed]}


def job_manifest(args, engine: Engine, gen: GenerationConfig, created: int) -> dict:
    """What makes a job's results reusable by a rerun (not: batch sizes, placement, ranks)."""
    policy = engine.policy
    return {"version": 1, "model": args.model, "weights": engine.weights_id, "dtype": engine.kernels["dtype"],
            "compress_weight": policy.compress_weight and [policy.compress_bits, policy.compress_group_size],
            "compress_cache": policy.compress_cache and [policy.compress_bits, policy.compress_group_size],
            "generation": {**vars(gen)}, "tokenizer": args.tokenizer, "input": job_input(args), "created": created}


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_summary(engine: Engine, load_s: float) -> dict:
    return {"rank": engine.ctx.rank, "layers": list(engine.stage), "compute_s": engine.executor.timers.compute,
            "comm_wait_s": engine.ring.idle, "io_wait_s": engine.executor.timers.io_wait, "load_s": load_s,
            "peak_bytes": {t.value: engine.devices.usage[t].peak for t in Tier},
            "peak_rss_bytes": peak_rss_bytes()}


def finish(args, engine: Engine, stages: list[dict], prediction: dict) -> None:
    """Rank 0: the report and the metrics line."""
    info = engine.last_batch
    if info.requests and info.skipped == info.requests:  # the output was whole but for its manifest
        print(f"nothing to generate: all {info.requests} requests are in {args.output} already "
              "(delete it, or give another --output, to generate them again)")
    else:
        print_report(engine, stages, prediction)
    print(f"output: {os.path.abspath(args.output) if args.output else 'none (no --output)'}")
    if args.log_file:
        append_line(args.log_file, json.dumps(log_entry(args, engine, stages, prediction)))


def print_report(engine: Engine, stages: list[dict], prediction: dict) -> None:
    """Throughput, the prediction next to it, the kernels, the batching and each rank's times."""
    stats, info = engine.last_stats, engine.last_batch
    print(report(stats))
    for line in prediction.get("lines", []):
        print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
    kernels = engine.kernels
    linear = f"linear layers: {kernels['linear']}"
    if "compressed_linear" in kernels:
        linear += f"; 4-bit linear layers: {kernels['compressed_linear']}"
    if engine.executor.expert_cache.capacity:
        print(engine.executor.expert_cache.describe())
    print(f"compute: {engine.devices.compute}, dtype {kernels['dtype']} ({kernels['dtype_reason']}), {linear}")
    print(f"requests: {info.requests} ({info.skipped} already done, {info.errors} errors) in {info.blocks} blocks; "
          f"padding {info.padding_unbucketed:.1%} in input order, {info.padding:.1%} as run; "
          f"load {max(s['load_s'] for s in stages):.2f} s")
    wall = stats.prefill_time + stats.decode_time
    for st in stages:
        peaks = ", ".join(f"{tier} {n / GiB:.3f}" for tier, n in st["peak_bytes"].items())
        print(f"rank {st['rank']}: layers {st['layers'][0]}-{st['layers'][1] - 1}  load {st['load_s']:.2f} s  "
              f"compute {st['compute_s']:.2f} s  waiting for input {st['comm_wait_s']:.2f} s "
              f"({st['comm_wait_s'] / max(wall, 1e-9):.0%})  peak GiB: {peaks}, RSS {st['peak_rss_bytes'] / GiB:.3f}")


def log_entry(args, engine: Engine, stages: list[dict], prediction: dict) -> dict:
    """The --log-file line: what ran, how fast, and what was predicted."""
    stats, info = engine.last_stats, engine.last_batch
    width = info.max_prompt_len or args.prompt_len
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": args.model, "ranks": len(stages),
            **engine.kernels, "policy": engine.policy.describe(), "micro_batches": engine.micro_batches,
            "prefill_chunks": engine.prefill_chunks, "gen_len": args.max_new_tokens,
            "prompt_len": width, **stats.as_dict(), "batch": vars(info), "output": args.output,
            "stages": stages, "plan": {k: v for k, v in prediction.items() if k != "lines"},
            "predicted_bytes": {t.value: n for t, n in predicted_bytes(engine, width, args.max_new_tokens).items()}}


def predicted_bytes(engine: Engine, prompt_len: int, max_new_tokens: int) -> dict:
    """What the memory check expected this rank to hold, per tier (with the check's slack)."""
    plan = engine.memory_plan(prompt_len, max_new_tokens)
    return {t: int(plan.total(t) * (MARGIN if t is not Tier.DISK else 1)) for t in Tier}


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with `given`: the names set on the command line or in the --config file (what
    the planner must leave as the user chose it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from_file = {}
    if args.config:
        from_file = load_config(args.config, parser)
        parser.set_defaults(**from_file)
        args = parser.parse_args(argv)
    args.given = set(from_file) | given_on_command_line(argv)
    return args


def given_on_command_line(argv) -> set[str]:
    bare = build_parser()
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise FlexGenError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise FlexGenError(f"config file {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(values, dict):
        raise FlexGenError(f"config file {path} must hold one JSON object of flag names and values")
    check_config_keys(values, parser, path)
    return config_defaults(values)


def cli() -> int:
    """The console entry point: `main` with signals that end the run cleanly."""
    exit_cleanly_on_signals()
    return main()


def main(argv=None) -> int:
    ctx = detect()
    try:
        args = parse_args(argv)
        code = run(args, ctx)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FlexGenError as e:
        if ctx.world_size > 1:
            fail(ctx, e)  # does not return; removes this rank's temporary files first
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:  # a bug or a dead peer: with ranks, every failure must end the job
        if ctx.world_size > 1 and not isinstance(e, SystemExit):
            if "--verbose" in (argv or sys.argv):
                traceback.print_exc()
            fail(ctx, e)
        raise
    stop_watching(ctx)
    shutdown(ctx)
    return code
