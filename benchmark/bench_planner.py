"""The planner against hand-written policies, under real memory limits.

For each configuration (model, memory limit, lengths): one run with `--policy auto` and a grid
of hand-written policies, each in a fresh memory cgroup (benchmark/with_memory_limit.sh), each
on the same prompts. Records per run: the predicted and measured throughput, the peak memory
(RSS and the cgroup's peak), and whether it ran. Appends JSON lines to --out and prints a table.

    python benchmark/bench_planner.py --out benchmark/results-planner.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (model, cgroup limit, prompt_len, gen_len, prompts)
CONFIGS = [
    ("opt-125m", "2G", 64, 16, 64),
    ("smollm2-135m", "2G", 64, 16, 64),
    ("smollm2-135m", "1200M", 64, 16, 64),
    ("opt-1.3b", "5G", 32, 8, 64),
    ("opt-1.3b", "2500M", 32, 8, 64),
    ("opt-1.3b", "1700M", 32, 8, 64),
    ("llama-3.2-1b", "1700M", 32, 8, 64),  # 2.47 GB of bf16 weights: most must live on disk
]
# (weights on compute %, gpu batch size, gpu batches): eight hand-written policies per configuration
GRID = [(100, 8, 1), (100, 32, 1), (100, 8, 4), (100, 64, 1), (50, 8, 4), (50, 32, 2), (0, 16, 4), (0, 64, 1)]
# --disk-grid: eight policies with the weights (nearly) all on disk, for limits that force them there
DISK_GRID = [(0, 8, 1), (0, 32, 1), (0, 8, 4), (0, 64, 1), (0, 16, 4), (0, 32, 2), (10, 32, 2), (20, 64, 1)]

# issue 29's case (opt-1.3b, 2.5 GiB, prompt 32, 16 new tokens): its best hand policy at N and 2N
# prompts (a policy that ran with N must not be refused with 2N) and the auto plan at both
ISSUE29 = ("opt-1.3b", "2500M", 32, 16)
ISSUE29_RUNS = [(64, "auto", ["--policy", "auto"]), (128, "auto", ["--policy", "auto"])] + [
    (n, f"{name}-b32x2", ["--percent", *percent.split(), "--gpu-batch-size", "32", "--num-gpu-batches", "2",
                          "--dtype", "bfloat16"])
    for n in (64, 128) for name, percent in (("w0h30", "0 30 100 0 100 0"), ("w30", "30 0 100 0 100 0"))]


def run_one(model: str, limit: str, prompt_len: int, gen_len: int, prompts: int, policy: list[str], offload: str,
            ranks: int = 1):
    # N ranks: launch/run_local.sh N inside the one cgroup (the ranks share its memory and the cores)
    engine = [sys.executable, "-m", "flexgen_dist.run"] if ranks == 1 else \
        [os.path.join(ROOT, "launch", "run_local.sh"), str(ranks)]
    with tempfile.TemporaryDirectory() as tmp:
        log, report = os.path.join(tmp, "log.jsonl"), os.path.join(tmp, "mem.json")
        cmd = [os.path.join(HERE, "with_memory_limit.sh"), limit, "--", *engine,
               "--model", model, "--dummy-weights", "--prompt-len", str(prompt_len), "--gen-len", str(gen_len),
               "--num-prompts", str(prompts), "--ignore-eos", "--quiet", "--offload-dir", offload, "--log-file", log,
               *policy]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MEMLIMIT_REPORT": report})
        out = {"rc": proc.returncode, "wall_s": time.time() - t0}
        if os.path.exists(report):
            out["cgroup"] = json.load(open(report))
        if proc.returncode == 0 and os.path.exists(log):
            entry = json.loads(open(log).read().splitlines()[-1])
            out.update(measured=entry["total_throughput"], predicted=entry["plan"].get("predicted_throughput"),
                       policy=entry["policy"], dtype=entry["dtype"], peak_rss=entry.get("peak_rss_bytes"),
                       prefill_s=entry["prefill_latency_s"], decode_s=entry["decode_latency_s"],
                       predicted_prefill_s=entry["plan"].get("predicted_prefill_s"),
                       predicted_decode_s=entry["plan"].get("predicted_decode_s"),
                       predicted_bytes=entry.get("predicted_bytes"))
        else:
            lines = proc.stderr.strip().splitlines() or ["?"]
            out["error"] = next((x for x in reversed(lines) if x.startswith("error:")), lines[-1])[:300]
        return out


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "results-planner.jsonl"))
    p.add_argument("--offload-dir", default=os.path.expanduser("~/flexgen_offload_dir"))
    p.add_argument("--only", type=int, nargs="*", help="indexes of CONFIGS to run")
    p.add_argument("--auto-only", action="store_true", help="only the --policy auto run of each configuration")
    p.add_argument("--repeat", type=int, default=1, help="runs of the auto plan per configuration (the table takes the median)")
    p.add_argument("--issue29", action="store_true", help="only issue 29's case (ISSUE29_RUNS)")
    p.add_argument("--disk-grid", action="store_true", help="hand policies from DISK_GRID instead of GRID")
    p.add_argument("--ranks", type=int, default=1, help="pipeline ranks on this machine (launch/run_local.sh)")
    p.add_argument("--drop-caches", action="store_true", help="sync and drop the page cache before each run (root)")
    args = p.parse_args()
    if args.issue29:
        return run_issue29(args)
    for i, (model, limit, plen, glen, n) in enumerate(CONFIGS):
        if args.only and i not in args.only:
            continue
        runs = [("auto", ["--policy", "auto"])] * args.repeat
        runs += [] if args.auto_only else [(f"w{w}-b{b}x{g}", ["--percent", str(w), "0", "100", "0", "100", "0", "--gpu-batch-size", str(b),
                                    "--num-gpu-batches", str(g), "--dtype", "bfloat16"])
                                    for w, b, g in (DISK_GRID if args.disk_grid else GRID)]
        for name, policy in runs:
            if args.drop_caches:
                drop_page_cache()
            result = run_one(model, limit, plen, glen, n, policy, args.offload_dir, args.ranks)
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": i, "model": model, "limit": limit,
                    "prompt_len": plen, "gen_len": glen, "prompts": n, "run": name, **result}
            if args.ranks > 1:
                line["ranks"] = args.ranks
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"{model} {limit} {name}: " + (f"measured {result['measured']:.2f} predicted {result['predicted']:.2f} tok/s"
                                                  if "measured" in result else f"failed: {result.get('error')}"), flush=True)
    return 0


def run_issue29(args) -> int:
    model, limit, plen, glen = ISSUE29
    for n, name, policy in ISSUE29_RUNS:
        result = run_one(model, limit, plen, glen, n, policy, args.offload_dir)
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": "issue29", "model": model, "limit": limit,
                "prompt_len": plen, "gen_len": glen, "prompts": n, "run": name, **result}
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{model} {limit} {n} prompts {name}: " + (
            f"measured {result['measured']:.2f} predicted {result['predicted']:.2f} tok/s, cgroup peak "
            f"{result['cgroup']['peak_bytes'] / 2**30:.2f} GiB" if "measured" in result else f"failed: {result.get('error')}"),
            flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
