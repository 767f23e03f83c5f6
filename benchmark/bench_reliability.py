"""What the reliability checks cost and how well they predict, on dummy OPT-1.3b.

    python benchmark/bench_reliability.py integrity [--repeats 2]   # store checksums on vs off
    python benchmark/bench_reliability.py memory [--limit 8G]       # predicted vs cgroup peak

integrity: the disk-bound run (every weight on disk, page cache dropped) with the first-read
checksum of each store file (the default) and without it (FLEXGEN_VERIFY_STORE=0), alternated.
memory: five placements, each run under a memory cgroup (benchmark/with_memory_limit.sh); the
engine's predicted RAM (compute + host tiers, slack included) against the cgroup's peak, which
counts the page cache too. Rows are appended as JSON lines to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from peer_systems import drop_page_cache  # benchmark/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "opt-1.3b"
PLACEMENTS = {  # name: (percent, gpu batch size, num gpu batches)
    "all in memory": ([100, 0, 100, 0, 100, 0], 8, 1),
    "weights host": ([0, 100, 100, 0, 100, 0], 8, 2),
    "weights half on disk": ([30, 20, 100, 0, 100, 0], 8, 2),
    "weights on disk": ([0, 0, 100, 0, 100, 0], 16, 2),
    "weights + cache on disk": ([0, 0, 0, 0, 100, 0], 16, 2),
}


def cli(args: list, env=None, limit: str | None = None, report: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flexgen_dist.run", "--model", MODEL, "--dummy-weights", "--ignore-eos", *map(str, args)]
    if limit:
        cmd = ["bash", os.path.join(HERE, "with_memory_limit.sh"), limit, "--", *cmd]
    full_env = {**os.environ, **(env or {}), **({"MEMLIMIT_REPORT": report} if report else {})}
    p = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed: {p.stderr.strip().splitlines()[-1:]}")
    return p


def last_record(log: str) -> dict:
    with open(log) as f:
        return json.loads(f.read().splitlines()[-1])


def integrity(args) -> list[dict]:
    common = ["--percent", 0, 0, 100, 0, 100, 0, "--prompt-len", 32, "--gen-len", 16, "--num-prompts", 32,
              "--gpu-batch-size", 32, "--offload-dir", args.offload_dir]
    cli([*common, "--gen-len", 1])  # convert the store once, untimed
    rows = []
    for _ in range(args.repeats):
        for verify in ("1", "0"):
            log = tempfile.mktemp(suffix=".jsonl")
            dropped = drop_page_cache()
            cli([*common, "--log-file", log], env={"FLEXGEN_VERIFY_STORE": verify})
            r = last_record(log)
            os.remove(log)
            rows.append({"bench": "integrity", "model": MODEL, "verify": verify == "1", "page_cache_dropped": dropped,
                         "total_throughput": r["total_throughput"], "total_latency_s": r["total_latency_s"],
                         "dtype": r["dtype"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def memory(args) -> list[dict]:
    rows = []
    for name, (percent, gbs, ngb) in PLACEMENTS.items():
        common = ["--percent", *percent, "--prompt-len", 128, "--gen-len", 8, "--gpu-batch-size", gbs,
                  "--num-gpu-batches", ngb, "--offload-dir", args.offload_dir]
        cli([*common, "--gen-len", 1])  # the store exists before the measured run: conversion is not measured
        log, report = tempfile.mktemp(suffix=".jsonl"), tempfile.mktemp(suffix=".json")
        drop_page_cache()
        cli([*common, "--log-file", log], limit=args.limit, report=report)
        r, m = last_record(log), json.load(open(report))
        os.remove(log), os.remove(report)
        predicted = r["predicted_bytes"]["compute"] + r["predicted_bytes"]["host"]
        rows.append({"bench": "memory", "model": MODEL, "placement": name, "percent": percent, "gbs": gbs, "ngb": ngb,
                     "dtype": r["dtype"], "limit_bytes": m["limit_bytes"], "predicted_ram_bytes": predicted,
                     "cgroup_peak_bytes": m["peak_bytes"], "peak_rss_bytes": r["peak_rss_bytes"],
                     "predicted_over_peak": predicted / m["peak_bytes"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["integrity", "memory"])
    p.add_argument("--offload-dir", default=os.path.expanduser("~/flexgen_offload_dir"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--limit", default="8G", help="memory cgroup limit for the memory runs")
    p.add_argument("--json", default=os.path.join(HERE, "results-reliability.jsonl"))
    args = p.parse_args()
    rows = integrity(args) if args.what == "integrity" else memory(args)
    with open(args.json, "a") as f:
        for row in rows:
            f.write(json.dumps({"date": time.strftime("%Y-%m-%d"), **row}) + "\n")


if __name__ == "__main__":
    main()
