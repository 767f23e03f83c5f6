"""The command line: `python -m flexgen_dist.run --model opt-125m --dummy-weights ...`."""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from . import dist
from .dist import DistContext
from .errors import FlexGenError
from .generation import Engine, GenerationConfig, GenerationStats
from .memory import peak_rss_bytes
from .pipeline import parse_stage_layers
from .policy import Policy, Tier
from .prompts import read_prompts, synthetic_prompts, tokenize
from .weights import resolve_model

GiB = 1 << 30


def str2bool(value: str) -> bool:
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flexgen_dist.run", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON file of defaults for any flag below (keys as flag names with _); "
                   "flags given on the command line win")
    p.add_argument("--model", default="opt-125m", help="built-in name, local HF directory or hub id")
    p.add_argument("--dummy-weights", action="store_true", help="seeded random weights (benchmark mode)")
    p.add_argument("--tokenizer", help="tokenizer directory, when the model directory has none")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="text file (one prompt per line) or JSONL with 'prompt' or 'input_ids'")
    src.add_argument("--prompt-len", type=int, default=32, help="length of synthetic random-token prompts")
    p.add_argument("--num-prompts", type=int, help="synthetic prompts to make (default: one block)")
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--gpu-batch-size", type=int, default=4)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--percent", nargs="+", type=float, default=[100, 0, 100, 0, 100, 0],
                   metavar="P", help="W_GPU W_CPU CACHE_GPU CACHE_CPU ACT_GPU ACT_CPU; the rest of each pair on disk")
    p.add_argument("--pin-weight", type=str2bool, nargs="?", const=True, default=True)
    p.add_argument("--cpu-cache-compute", action="store_true")
    p.add_argument("--overlap", type=str2bool, nargs="?", const=True, default=True)
    p.add_argument("--sep-layer", type=str2bool, nargs="?", const=True, default=True)
    p.add_argument("--compress-weight", action="store_true", help="4-bit group-wise weights on every tier")
    p.add_argument("--compress-cache", action="store_true", help="4-bit group-wise KV cache on every tier")
    p.add_argument("--compress-bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--compress-group-size", type=int, default=64)
    p.add_argument("--offload-dir", default="~/flexgen_offload_dir",
                   help="may contain {rank} or {local_rank} to give each rank its own disk")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="compute dtype (default: float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[],
                   help="stop token: an id, or text that is one token (repeatable)")
    p.add_argument("--comm-device", choices=["cpu", "gpu"],
                   help="where stages exchange tensors: gpu = NCCL, cpu = gloo (default: gpu when CUDA is present)")
    p.add_argument("--stage-layers", help="transformer layers per rank, e.g. 6,6,7,5 (default: balanced by bytes)")
    p.add_argument("--micro-batches", type=int, help="blocks in flight through the pipeline (default: ranks)")
    p.add_argument("--comm-timeout", type=float, default=600.0, help="seconds to wait for a peer before failing")
    p.add_argument("--verbose", action="store_true", help="tracebacks from every rank")
    p.add_argument("--output", help="write one JSON object per prompt to this JSONL file")
    p.add_argument("--log-file", help="append one JSON line of metrics to this file")
    return p


def policy_from_args(args) -> Policy:
    return Policy.from_percent(args.percent, gpu_batch_size=args.gpu_batch_size,
                               num_gpu_batches=args.num_gpu_batches, overlap=args.overlap,
                               sep_layer=args.sep_layer, pin_weight=args.pin_weight,
                               cpu_cache_compute=args.cpu_cache_compute, compress_weight=args.compress_weight,
                               compress_cache=args.compress_cache, compress_bits=args.compress_bits,
                               compress_group_size=args.compress_group_size).validate()


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


def generated_ids(row: list[int], stop: list[int], pad: int) -> list[int]:
    """The generated part of one output row, up to and including a stop token."""
    out = []
    for t in row:
        out.append(t)
        if t in stop:
            break
    return out


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
    policy = policy_from_args(args)
    gen = GenerationConfig(max_new_tokens=args.gen_len, do_sample=args.do_sample, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed).validate()
    prompts = read_prompts(args.prompts) if args.prompts and ctx.first else None
    stage_layers = None
    if args.stage_layers:
        spec = resolve_model(args.model, dummy_weights=args.dummy_weights).spec
        stage_layers = parse_stage_layers(args.stage_layers, spec.num_layers, ctx.world_size)
    ctx = dist.init(ctx, args.comm_device, args.comm_timeout)
    dist.watch_for_failures(ctx)
    engine = Engine.from_pretrained(args.model, policy=policy, offload_dir=args.offload_dir.format(
                                        rank=ctx.rank, local_rank=ctx.local_rank), dtype=args.dtype,
                                    dummy_weights=args.dummy_weights, seed=args.seed, dist=ctx,
                                    stage_layers=stage_layers, micro_batches=args.micro_batches,
                                    comm_timeout=args.comm_timeout)
    try:
        if args.tokenizer:
            engine.tokenizer_path = args.tokenizer
        job = None
        if ctx.first:  # rank 0 reads and tokenizes; every stage needs the same token ids
            if prompts is None:
                count = args.num_prompts or engine.micro_batches * policy.block_size
                prompts = synthetic_prompts(count, args.prompt_len, engine.spec.vocab_size, args.seed)
            job = (tokenize(prompts, engine.tokenizer), stop_ids(args.stop, engine.tokenizer))
        ids, gen.stop = dist.broadcast(ctx, job)
        out = engine.generate(ids, max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                              temperature=gen.temperature, top_p=gen.top_p, stop=gen.stop, seed=gen.seed)
        stages = dist.gather(ctx, stage_summary(engine))
        if ctx.first:
            finish(args, engine, prompts, ids, out, gen, stages)
    finally:
        engine.close()
    return 0


def stage_summary(engine: Engine) -> dict:
    return {"rank": engine.ctx.rank, "layers": list(engine.stage), "compute_s": engine.executor.timers.compute,
            "comm_wait_s": engine.ring.idle, "io_wait_s": engine.executor.timers.io_wait,
            "peak_bytes": {t.value: engine.devices.usage[t].peak for t in Tier},
            "peak_rss_bytes": peak_rss_bytes()}


def finish(args, engine: Engine, prompts, ids, out, gen: GenerationConfig, stages: list[dict]) -> None:
    """Rank 0: outputs in input order, the report, the metrics line."""
    width = max(map(len, ids))
    if args.output:
        write_outputs(args.output, prompts, out[:, width:].tolist(), gen.stop, engine)
    stats = engine.last_stats
    print(report(stats))
    if len(stages) > 1:
        wall = stats.prefill_time + stats.decode_time
        for st in stages:
            print(f"stage {st['rank']}: layers {st['layers'][0]}-{st['layers'][1] - 1}  compute {st['compute_s']:.2f} s"
                  f"  waiting for input {st['comm_wait_s']:.2f} s ({st['comm_wait_s'] / max(wall, 1e-9):.0%})")
    if args.log_file:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": args.model, "ranks": len(stages),
                 "dtype": str(engine.dtype).split(".")[-1], "policy": engine.policy.describe(),
                 "gen_len": args.gen_len, "prompt_len": width, **stats.as_dict(), "stages": stages}
        with open(args.log_file, "a") as f:
            f.write(json.dumps(entry) + "\n")


def write_outputs(path: str, prompts, rows: list[list[int]], stop: list[int], engine: Engine) -> None:
    tokenizer = engine.tokenizer
    with open(path, "w") as f:
        for prompt, row in zip(prompts, rows):
            ids = generated_ids(row, stop, engine.spec.pad_token_id)
            record = {"index": prompt.index, "output_ids": ids}
            if prompt.text is not None:
                record["prompt"] = prompt.text
            if tokenizer is not None:
                record["text"] = tokenizer.decode(ids, skip_special_tokens=True)
            f.write(json.dumps(record) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**load_config(args.config, parser))
        args = parser.parse_args(argv)
    return args


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise FlexGenError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise FlexGenError(f"config file {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FlexGenError(f"config file {path}: unknown key {unknown[0]!r}")
    return values


def main(argv=None) -> int:
    ctx = dist.detect()
    try:
        args = parse_args(argv)
        code = run(args, ctx)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FlexGenError as e:
        if ctx.world_size > 1:
            dist.fail(ctx, e)  # does not return
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:  # a bug or a dead peer: with ranks, every failure must end the job
        if ctx.world_size > 1 and not isinstance(e, SystemExit):
            if "--verbose" in (argv or sys.argv):
                traceback.print_exc()
            dist.fail(ctx, e)
        raise
    dist.stop_watching(ctx)
    dist.shutdown(ctx)
    return code


if __name__ == "__main__":
    sys.exit(main())
