"""Llama-family benchmarks: throughput next to transformers on one checkpoint, and GQA decode attention.

    python benchmark/bench_llama.py checkpoint --model llama-3.2-1b DIR      # dummy weights, HF layout
    python benchmark/bench_llama.py run --checkpoint DIR --batch 16 --prompt-len 128 --gen-len 32 \
        [--systems flexgen-memory,flexgen-disk,transformers,accelerate-disk] [--json results.jsonl]
    python benchmark/bench_llama.py gqa [--model llama-3.1-8b --batch 16 --context 2048]
    python benchmark/bench_llama.py gguf --checkpoint DIR   # llama.cpp built, DIR as BF16 and Q4_0 GGUF

`run` times each system in its own process through peer_systems.py (same seeded random prompts,
a warm-up, then one timed generate; throughput = generated tokens / (prefill + decode time)).
With --drop-cache the page cache is dropped before each process starts, so no system finds
there what another (or the checkpoint's writer) read, charged to no memory limit.
"flexgen-disk" homes every weight on disk (read with O_DIRECT on every use); "accelerate-disk"
is transformers + Accelerate with `max_memory` too small for the weights, so they stay on disk.
"llamacpp-bf16" and "llamacpp-q4_0" run llama.cpp's llama-batched-bench on the GGUF files `gguf`
wrote for the checkpoint (bench_llamacpp.py's cache folder: its build, converter and files),
memory-mapped as llama.cpp does by default.
`gqa` times one decode step of attention with grouped K/V (this engine) against the same
attention over K/V repeated to every query head (transformers' eager `repeat_kv`) and prints the
K/V bytes each reads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from peer_systems import drop_page_cache

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = {
    "flexgen-memory": {"system": "flexgen", "percent": [100, 0, 100, 0, 100, 0]},
    "flexgen-disk": {"system": "flexgen", "percent": [0, 0, 100, 0, 100, 0]},
    "transformers": {"system": "transformers"},
    "accelerate-disk": {"system": "accelerate", "max_memory": {"cpu": "64MiB"}},
    # MoE: attention, router, embeddings in memory; every expert on disk, read when routed to
    "flexgen-experts-disk": {"system": "flexgen", "percent": [100, 0, 100, 0, 100, 0], "experts_percent": [0, 0]},
    "flexgen-experts-disk-nocache": {"system": "flexgen", "percent": [100, 0, 100, 0, 100, 0],
                                     "experts_percent": [0, 0], "expert_cache_gib": 0},
    # the same with 4-bit weights (--compress-weight): experts stored and read from disk packed
    "flexgen-experts-disk-4bit": {"system": "flexgen", "percent": [100, 0, 100, 0, 100, 0],
                                  "experts_percent": [0, 0], "compress_weight": True},
    "llamacpp-bf16": {"system": "llamacpp", "variant": "bf16"},
    "llamacpp-q4_0": {"system": "llamacpp", "variant": "q4_0"},
}


def write_checkpoint(model: str, path: str, seed: int = 0, shard_bytes: int = 1 << 30, layers: int = 0) -> str:
    """A Hugging Face checkpoint (config.json, bf16 safetensors shards) of a built-in Llama-family
    or mixture-of-experts spec (its first `layers` blocks when given), filled by the engine's own
    seeded dummy rule, so every system reads the same weights."""
    import dataclasses

    from safetensors.torch import save_file

    from flexgen_dist.models import builtin_spec, family_of
    from flexgen_dist.models.checkpoint import DummySource
    from flexgen_dist.models.llama.config import to_hf_config
    from flexgen_dist.models.moe.config import to_hf_config as moe_hf_config
    spec = builtin_spec(model)
    if spec is None or spec.family not in ("llama", "moe"):
        raise SystemExit(f"error: {model!r} is not a built-in Llama-family or MoE model")
    spec = dataclasses.replace(spec, num_layers=layers) if layers else spec
    hf_config = moe_hf_config if spec.family == "moe" else to_hf_config
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**hf_config(spec), "dtype": "bfloat16"}, f, indent=1)
    source = DummySource(spec, seed)
    shapes = {w.name: w.shape for layer in family_of(spec).build_layers(spec) for w in layer.weights}
    shard, size, index = {}, 0, {}
    for name, shape in shapes.items():
        key = name if name == "lm_head.weight" else f"model.{name}"
        shard[key] = source.get(name, shape, torch.bfloat16)
        size += shard[key].numel() * 2
        if size >= shard_bytes or name == list(shapes)[-1]:
            file = f"model-{len(set(index.values())):05d}.safetensors"
            save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
            index.update({k: file for k in shard})
            shard, size = {}, 0
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f, indent=1)
    return path


def run_one(system: str, args) -> dict:
    spec = {**SYSTEMS[system], "checkpoint": args.checkpoint, "batch": args.batch, "ngb": args.ngb,
            "prompt_len": args.prompt_len, "gen_len": args.gen_len, "dtype": args.dtype,
            "offload_dir": args.offload_dir}
    if SYSTEMS[system]["system"] != "flexgen":
        spec.pop("ngb")
    if SYSTEMS[system]["system"] == "llamacpp":
        cache = llamacpp_cache(args)
        spec.update(gguf=cache.gguf(spec.pop("variant"), os.path.basename(os.path.abspath(args.checkpoint))),
                    llamacpp_bin=cache.bin, threads=args.threads)
    if args.drop_cache and not drop_page_cache():
        raise SystemExit("error: --drop-cache needs root (writing /proc/sys/vm/drop_caches)")
    done = subprocess.run([sys.executable, os.path.join(HERE, "peer_systems.py"), json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        return {"label": system, "error": done.stderr.strip().splitlines()[-1:]}
    return {"label": system, **json.loads(done.stdout.strip().splitlines()[-1])}


def llamacpp_cache(args):
    from bench_llamacpp import Cache
    return Cache(args.cache_dir, args.threads)


def cmd_gguf(args) -> None:
    """llama.cpp built (if it is not) and the checkpoint converted to BF16 and Q4_0 GGUF files."""
    cache = llamacpp_cache(args)
    cache.build()
    for variant, path in cache.ggufs(args.checkpoint, os.path.basename(os.path.abspath(args.checkpoint))).items():
        print(f"{variant}: {path}")


def cmd_run(args) -> None:
    rows = []
    for system in args.systems.split(","):
        row = run_one(system, args)
        rows.append(row)
        if "error" in row:
            print(f"{system:16s} error: {row['error']}", flush=True)
            continue
        print(f"{system:16s} throughput {row['throughput']:8.2f} tok/s  prefill {row['prefill_s']:7.2f} s  "
              f"decode {row['decode_s']:7.2f} s  peak RSS {row['peak_rss_bytes'] / 2**30:5.2f} GiB  "
              f"disk read {row['disk_read_bytes'] / 2**30:6.2f} GiB", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({"date": time.strftime("%Y-%m-%d"), **row}) + "\n")


def cmd_gqa(args) -> None:
    from flexgen_dist.models import builtin_spec
    from flexgen_dist.kernels.attention import attend
    spec = builtin_spec(args.model)
    b, heads, kv, d, t = args.batch, spec.num_heads, spec.kv_heads, spec.head_dim, args.context
    dtype = torch.bfloat16
    q, k, v = torch.randn(b, heads, 1, d, dtype=dtype), torch.randn(b, kv, t, d, dtype=dtype), torch.randn(b, kv, t, d, dtype=dtype)
    bias = torch.zeros(b, 1, 1, t, dtype=torch.float32)

    def repeated():  # transformers' eager path: repeat_kv, then plain attention over every query head
        kr, vr = (x[:, :, None].expand(b, kv, heads // kv, t, d).reshape(b, heads, t, d) for x in (k, v))
        return attend(q, kr, vr, bias)

    for label, fn, kv_bytes in (("grouped (this engine)", lambda: attend(q, k, v, bias), 2 * k.numel() * 2),
                                ("repeat_kv (materialised)", repeated, 2 * k.numel() * 2 * heads // kv)):
        fn()
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            fn()
        ms = (time.perf_counter() - t0) / args.repeat * 1e3
        print(f"{spec.name} decode attention, batch {b}, context {t}, {heads} q / {kv} kv heads: {label:26s} "
              f"{ms:7.2f} ms/layer, K/V bytes {kv_bytes / 2**20:7.1f} MiB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoint")
    c.add_argument("--model", default="llama-3.2-1b")
    c.add_argument("--layers", type=int, default=0, help="only the first N blocks (0: all)")
    c.add_argument("path")
    r = sub.add_parser("run")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--systems", default="flexgen-memory,flexgen-disk,transformers")
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--ngb", type=int, default=1)
    r.add_argument("--prompt-len", type=int, default=128)
    r.add_argument("--gen-len", type=int, default=32)
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--offload-dir", default=os.path.expanduser("~/flexgen_bench/offload"))
    r.add_argument("--json")
    r.add_argument("--drop-cache", action="store_true",
                   help="drop the page cache before each system's process (root): what it finds there it read itself")
    for parser in (r, f := sub.add_parser("gguf")):
        parser.add_argument("--cache-dir", default="~/.cache/flexgen_dist/peers", help="bench_llamacpp.py's")
        parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    f.add_argument("--checkpoint", required=True)
    g = sub.add_parser("gqa")
    g.add_argument("--model", default="llama-3.1-8b")
    g.add_argument("--batch", type=int, default=16)
    g.add_argument("--context", type=int, default=2048)
    g.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    if args.cmd == "checkpoint":
        print(write_checkpoint(args.model, args.path, layers=args.layers))
    elif args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "gguf":
        cmd_gguf(args)
    else:
        cmd_gqa(args)


if __name__ == "__main__":
    main()
