"""Markdown tables from the JSON lines written by bench_throughput.py (for RESULTS.md).

    python benchmark/summarize.py benchmark/results-cpu.jsonl
"""
from __future__ import annotations

import json
import sys


def engine_row(r: dict) -> str:
    pct = " ".join(f"{p:g}" for p in r["percent"])
    pct += "".join(f" +{k.split('_')[1]}4" for k in ("compress_weight", "compress_cache") if r.get(k))
    share = lambda k: f"{r[k]:.0%}" if k in r else "–"  # noqa: E731
    disk = f"{r['disk_read_gbs']:.2f} ({share('disk_share')})" if r.get("disk_read_gb") else "–"
    return (f"| {r['model']} | {r['prompt_len']}/{r['gen_len']} | {r['gbs']}×{r['ngb']} = {r['batch']} | {pct} | "
            f"{r['total_throughput']:.2f} | {r['prefill_latency_s']:.1f} / {r['decode_latency_s']:.1f} | "
            f"{r['prefill_tflops']:.3f} ({share('prefill_peak_share')}) | {r['decode_tflops']:.3f} "
            f"({share('decode_peak_share')}) | {disk} | {r['peak_rss_bytes'] / 2**30:.2f} |")


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| model | prompt/gen | batch (gbs×ngb) | percent | total tok/s | prefill / decode s | "
          "prefill TFLOP/s (peak share) | decode TFLOP/s (peak share) | disk GB/s (share) | peak RSS GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["system"] == "flexgen-dist":
            print(engine_row(r))
    base = [r for r in rows if r["system"] == "transformers"]
    if base:
        print("\n| transformers generate | prompt/gen | batch | total tok/s |\n| --- | --- | --- | --- |")
        for r in base:
            print(f"| {r['model']} | {r['prompt_len']}/{r['gen_len']} | {r['batch']} | {r['total_throughput']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
