"""Throughput of the engine on dummy weights, with its share of the machine's roofline.

    python benchmark/bench_throughput.py --model opt-125m --prompt-len 512 --gen-len 32 \
        --batches 8x1,32x1,16x4 [--percent 0 0 100 0 100 0] [--drop-cache] [--hf-baseline 8] \
        [--roofline roofline.json] [--json results.jsonl]

Throughput = generated tokens / (prefill + decode time), FlexGen's definition. FLOPs are the
useful ones: 2 per weight per token for the matmuls, causal attention, and the output head for the
last position only.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from flexgen_dist import Engine, Policy
from flexgen_dist.models import builtin_spec, flops_per_token
from peer_systems import disk_read_bytes, drop_page_cache  # benchmark/ is on sys.path when run as a script


def flops(spec, batch: int, prompt: int, gen: int) -> tuple[float, float]:
    """(prefill, decode) useful FLOPs for `batch` sequences, from the model family's own count."""
    def token(context: int, with_head: bool) -> float:
        blocks, head = flops_per_token(spec, context)
        return blocks + (head if with_head else 0)
    prefill = batch * sum(token(c, c == prompt) for c in range(1, prompt + 1))
    decode = batch * sum(token(prompt + i, True) for i in range(1, gen))
    return prefill, decode


def run_engine(args, gbs: int, ngb: int, roofline: dict) -> dict:
    spec = builtin_spec(args.model)
    policy = Policy.from_percent(args.percent, gpu_batch_size=gbs, num_gpu_batches=ngb, overlap=args.overlap,
                                 compress_weight=args.compress_weight, compress_cache=args.compress_cache,
                                 compress_embeddings=args.compress_embeddings)
    engine = Engine.from_pretrained(args.model, policy=policy, offload_dir=args.offload_dir,
                                    dummy_weights=True, dtype=args.dtype)
    n = gbs * ngb
    prompts = torch.randint(3, spec.vocab_size, (n, args.prompt_len), generator=torch.Generator().manual_seed(0))
    engine.generate(prompts[:, :8].tolist(), max_new_tokens=2, ignore_eos=True)  # warm-up: kernels, thread pools
    dropped = drop_page_cache() if args.drop_cache else False
    read0, t0 = disk_read_bytes(), time.perf_counter()
    engine.generate(prompts.tolist(), max_new_tokens=args.gen_len, ignore_eos=True)
    wall = time.perf_counter() - t0
    read = disk_read_bytes() - read0
    engine.close()
    s = engine.last_stats.as_dict()
    pf, df = flops(spec, n, args.prompt_len, args.gen_len)
    dtype = engine.kernels["dtype"]
    peak = roofline.get(f"matmul_{dtype}_tflops", 0) * 1e12
    disk_peak = roofline.get("disk_odirect_4_stream_gbs", 0) * 1e9
    row = {"system": "flexgen-dist", "model": args.model, "gbs": gbs, "ngb": ngb, "batch": n,
           "prompt_len": args.prompt_len, "gen_len": args.gen_len, "percent": args.percent,
           "compress_weight": args.compress_weight, "compress_cache": args.compress_cache,
           "dtype": dtype, "dtype_requested": args.dtype, "dtype_reason": engine.kernels["dtype_reason"],
           "compressed_linear": engine.kernels.get("compressed_linear"), "page_cache_dropped": dropped, **{k: s[k] for k in (
               "prefill_latency_s", "prefill_throughput", "decode_latency_s", "decode_throughput",
               "total_throughput", "io_wait_s", "peak_rss_bytes")},
           "prefill_tflops": pf / s["prefill_latency_s"] / 1e12,
           "decode_tflops": df / max(s["decode_latency_s"], 1e-9) / 1e12,
           "disk_read_gb": read / 1e9, "disk_read_gbs": read / wall / 1e9}
    if peak:
        row["prefill_peak_share"] = row["prefill_tflops"] * 1e12 / peak
        row["decode_peak_share"] = row["decode_tflops"] * 1e12 / peak
    if disk_peak:
        row["disk_share"] = row["disk_read_gbs"] * 1e9 / disk_peak
    return row


def run_transformers(args, batch: int) -> dict:
    """transformers' own generate on the same config (random weights, everything in memory)."""
    from transformers import OPTConfig, OPTForCausalLM
    spec = builtin_spec(args.model)
    cfg = OPTConfig(hidden_size=spec.hidden_size, ffn_dim=spec.ffn_dim, num_hidden_layers=spec.num_layers,
                    num_attention_heads=spec.num_heads, word_embed_proj_dim=spec.embed_dim,
                    do_layer_norm_before=spec.do_layer_norm_before, vocab_size=spec.vocab_size)
    model = OPTForCausalLM(cfg).to(getattr(torch, args.hf_dtype)).eval()
    ids = torch.randint(3, spec.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, pad_token_id=1, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, **kw)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.gen_len,
                       min_new_tokens=args.gen_len, **kw)
        wall = time.perf_counter() - t0
    return {"system": "transformers", "model": args.model, "batch": batch, "prompt_len": args.prompt_len,
            "gen_len": args.gen_len, "total_throughput": batch * args.gen_len / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--batches", default="8x1,32x1", help="comma-separated GBSxNGB")
    p.add_argument("--percent", nargs=6, type=float, default=[100, 0, 100, 0, 100, 0])
    p.add_argument("--overlap", type=int, default=1)
    p.add_argument("--compress-weight", action="store_true")
    p.add_argument("--compress-cache", action="store_true")
    p.add_argument("--compress-embeddings", action="store_true", help="4-bit embeddings and output head too")
    p.add_argument("--dtype", default="auto", help="auto (the probe's choice), float32 or bfloat16")
    p.add_argument("--offload-dir", default=os.path.expanduser("~/flexgen_offload_dir"))
    p.add_argument("--drop-cache", action="store_true", help="drop the page cache before each timed run (root)")
    p.add_argument("--hf-baseline", type=int, nargs="*", default=[], metavar="BATCH")
    p.add_argument("--hf-dtype", default="bfloat16", help="dtype of the transformers baseline")
    p.add_argument("--roofline", help="JSON written by benchmark/roofline.py")
    p.add_argument("--json", help="append one JSON line per run here")
    args = p.parse_args()
    roofline = json.load(open(args.roofline)) if args.roofline else {}
    rows = []
    for item in args.batches.split(","):
        gbs, ngb = map(int, item.split("x"))
        rows.append(run_engine(args, gbs, ngb, roofline))
        print(json.dumps(rows[-1]), flush=True)
    for batch in args.hf_baseline:
        rows.append(run_transformers(args, batch))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({"date": time.strftime("%Y-%m-%d"), **row}) + "\n")


if __name__ == "__main__":
    main()
