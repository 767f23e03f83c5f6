"""Batch-job throughput: length bucketing on and off, and the cost of the crash-safe journal.

    python benchmark/bench_batch.py --model opt-125m --prompts 32 --min-len 16 --max-len 1024 \
        --gen-len 8 --gpu-batch-size 8 --rounds 2 [--json results.jsonl]

One engine (dummy weights) runs the same mixed-length prompts in alternating order (timings on a
shared machine drift): unbucketed, bucketed, bucketed + journal (JobOutput: append, flush, fsync
per block). Throughput = generated tokens / wall time of `generate_batch`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from flexgen_dist import Engine, Policy
from flexgen_dist.formats.outputs import JobOutput


def prompts(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[2] + [rng.randrange(3, 50000) for _ in range(rng.randint(low, high) - 1)] for _ in range(count)]


def timed(engine, reqs, gen_len: int, bucket: bool, journal: bool) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = JobOutput(os.path.join(d, "out.jsonl"), {"bench": 1}) if journal else None
        if out:
            out.start()
        t0 = time.perf_counter()
        engine.generate_batch(reqs, max_new_tokens=gen_len, ignore_eos=True, bucket=bucket, progress=False,
                              on_records=out.append if out else (lambda records: None))
        if out:
            out.finish()
        wall = time.perf_counter() - t0
    s, info = engine.last_stats, engine.last_batch
    return {"bucket": bucket, "journal": journal, "wall_s": wall, "throughput": s.generated_tokens / wall,
            "prefill_s": s.prefill_time, "decode_s": s.decode_time, "padding": info.padding,
            "padding_unbucketed": info.padding_unbucketed}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument("--gpu-batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--offload-dir", default=os.path.expanduser("~/flexgen_offload_dir"))
    p.add_argument("--json")
    args = p.parse_args()
    reqs = prompts(args.prompts, args.min_len, args.max_len)
    with Engine.from_pretrained(args.model, dummy_weights=True, policy=Policy(gpu_batch_size=args.gpu_batch_size),
                                offload_dir=args.offload_dir) as engine:
        engine.generate_batch(reqs[:args.gpu_batch_size], max_new_tokens=2, progress=False)  # warm up
        rows = []
        for r in range(args.rounds):
            for bucket, journal in [(False, False), (True, False), (True, True)]:
                row = {"round": r, "dtype": engine.kernels["dtype"], **timed(engine, reqs, args.gen_len, bucket, journal)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
