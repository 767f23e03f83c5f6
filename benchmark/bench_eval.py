"""Scoring throughput: lm-eval's `loglikelihood` requests of one multiple-choice workload through
lm-eval's `hf` backend and through the `flexgen` backend, same model, same requests, same dtype,
in one process (one run each after a warm-up call of the same requests).

    python benchmark/bench_eval.py --model DIR [--questions 32] [--percent 100:0:100:0:100:0 | auto]
        [--gpu-batch-size 32] [--num-gpu-batches 2] [--hf-batch-size 16] [--cpu-mem GIB] [--systems hf,flexgen]

Systems: `hf` (lm-eval's backend, the model in memory), `hf-offload` (the same with Accelerate's
`device_map="auto"` and `--hf-max-cpu-memory`, the rest offloaded to disk under `--offload-dir`),
`flexgen` (`--percent auto`: the planner chooses the policy), `flexgen-unpacked` (the engine with
every request in its own row: no shared context, no side-by-side rows).
Prints one JSON line per system: requests, tokens (context + continuation), seconds, tokens/s;
and each flexgen system's ratio over the first hf system. DIR: a Hugging Face directory with a tokenizer (e.g. SmolLM2 from
`python -m flexgen_dist.models.fetch smollm2-135m-instruct DIR`)."""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
         "his", "her", "it", "an", "were", "are", "which", "this", "be", "or", "has", "had", "one", "their",
         "not", "but", "new", "first", "two", "after", "also", "who", "its", "they", "been", "more", "time",
         "year", "people", "city", "world", "river", "music", "school", "state", "family", "war", "north",
         "south", "game", "team", "house", "water", "light"]


def workload(questions: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context, continuation) strings: `questions` contexts of 60-120 words, 4 choices of 1-5 words."""
    rng = random.Random(seed)
    out = []
    for _ in range(questions):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))).capitalize() + "."
        for _ in range(4):
            out.append((context, " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))))
    return out


def timed(lm, pairs) -> tuple[float, list]:
    from lm_eval.api.instance import Instance
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    lm.loglikelihood(requests)  # warm-up: the engine is built (and the store converted) at its first call
    t0 = time.perf_counter()
    results = lm.loglikelihood(requests)
    return time.perf_counter() - t0, results


def build(system: str, args):
    if system.startswith("hf"):
        from lm_eval.models.huggingface import HFLM
        offload = {"parallelize": True, "max_cpu_memory": args.hf_max_cpu_memory,
                   "offload_folder": args.offload_dir + "/hf"} if system == "hf-offload" else {}
        return HFLM(pretrained=args.model, dtype=args.dtype, device="cpu", batch_size=args.hf_batch_size, **offload)
    if system == "flexgen-unpacked":
        import functools

        from flexgen_dist.engine.engine import Engine
        Engine.score = functools.partialmethod(Engine.__dict__["score"], pack=False)
    from flexgen_dist.cli.eval import FlexGenLM
    policy = {} if args.percent == "auto" else {"percent": args.percent, "gpu_batch_size": args.gpu_batch_size,
                                                "num_gpu_batches": args.num_gpu_batches}
    if args.cpu_mem is not None:  # the planner's memory figure (`--cpu-mem` of `run`)
        policy["cpu_mem"] = args.cpu_mem
    return FlexGenLM(pretrained=args.model, dtype=args.dtype, offload_dir=args.offload_dir + "/" + system, **policy)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--percent", default="100:0:100:0:100:0")
    p.add_argument("--gpu-batch-size", type=int, default=32)
    p.add_argument("--num-gpu-batches", type=int, default=2)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--hf-max-cpu-memory", default="256MiB", help="hf-offload: Accelerate's memory for weights")
    p.add_argument("--cpu-mem", type=float, help="flexgen: GiB of memory the planner may use (default: what it finds)")
    p.add_argument("--offload-dir", default="/tmp/bench_eval_offload")
    p.add_argument("--systems", default="hf,flexgen")
    args = p.parse_args()
    pairs = workload(args.questions)
    rates, answers = {}, {}
    for system in args.systems.split(","):
        lm = build(system, args)
        seconds, results = timed(lm, pairs)
        tokens = sum(len(lm.tok_encode(c + x)) for c, x in pairs)
        rates[system], answers[system] = tokens / seconds, [r[0] for r in results]
        print(json.dumps({"system": system, "requests": len(pairs), "tokens": tokens, "seconds": round(seconds, 2),
                          "tokens_per_s": round(tokens / seconds, 1), "dtype": args.dtype,
                          **({"percent": args.percent, "gpu_batch_size": args.gpu_batch_size,
                              "num_gpu_batches": args.num_gpu_batches} if system.startswith("flexgen")
                             else {"batch_size": args.hf_batch_size})}), flush=True)
        engine = getattr(getattr(lm, "session", None), "engine", None)
        if engine is not None:  # the policy it ran (the planner's with --percent auto)
            p = engine.policy
            print(json.dumps({"system": system, "policy": ":".join(f"{v:g}" for v in (
                p.w_gpu_percent, p.w_cpu_percent, p.cache_gpu_percent, p.cache_cpu_percent, p.act_gpu_percent,
                p.act_cpu_percent)), "gpu_batch_size": p.gpu_batch_size, "num_gpu_batches": p.num_gpu_batches,
                "compress_weight": p.compress_weight, "dtype": str(engine.dtype)}), flush=True)
        if system == "flexgen-unpacked":
            from flexgen_dist.engine.engine import Engine
            Engine.score = Engine.__dict__["score"].func
        if hasattr(lm, "session"):
            lm.session.end()
        del lm
    base = next((s for s in rates if s.startswith("hf")), None)
    for system, rate in rates.items():
        if base is not None and system.startswith("flexgen"):
            diff = max(abs(x - y) for x, y in zip(answers[system], answers[base]))
            print(json.dumps({"ratio": f"{system} / {base}", "value": round(rate / rates[base], 2),
                              "max_abs_loglikelihood_diff": diff}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
