"""The packed int4 product against the dense one at decode shapes, on the CPU or a GPU.

    python benchmark/bench_int4_kernel.py [--device cuda] [--dtype float32] [--rows 1,8,32] [--json results.jsonl]

For each weight shape of OPT-1.3b, OPT-6.7b and a 7B Llama (out x in) and each row count: the time
of the engine's int4 product (`kernels.linear` on an `Int4Weight` in the device's kernel form, fed
the activations the probe chose for the model dtype) and of the dense product of the same
(dequantized) weight in the model dtype (bf16 by default; float32 is what an AVX2-only CPU
computes in), each weight cycled through enough copies that the cache cannot hold them, so a
decode-sized product reads its weight from memory as the model's would. Also checks the int4
product equals the dequantized one (to bf16 rounding).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from flexgen_dist.kernels.int4 import dequantize_int4, quantize_int4
from flexgen_dist.kernels import compiled, int4, probe
from flexgen_dist.kernels.linear import int4_for_device, linear, max_kernel_rows

SHAPES = {"opt-1.3b": [(2048, 2048), (8192, 2048), (2048, 8192)],
          "opt-6.7b": [(4096, 4096), (16384, 4096), (4096, 16384)],
          "llama-7b": [(11008, 4096), (4096, 11008)]}


def timed(fn, device: torch.device, seconds: float = 1.0) -> float:
    """Mean seconds per call after a warm-up, over at least `seconds`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if calls % 8 == 0:
            sync()
            if time.perf_counter() - t0 >= seconds:
                return (time.perf_counter() - t0) / calls


def weights(shape, device: torch.device, dtype: torch.dtype, fed: torch.dtype, stream_bytes: float):
    """Copies of one random weight shape, quantized on `device`: (int4 in the form the kernel reads
    fed `fed` activations, dense)."""
    n, k = shape
    g = torch.Generator(device).manual_seed(0)
    packed, dense = [], []
    for _ in range(max(2, int(stream_bytes // (n * k * dtype.itemsize)))):
        w = quantize_int4((torch.randn(n, k, generator=g, device=device) * 0.02).to(dtype), 64)
        dense.append(dequantize_int4(w))
        packed.append(int4_for_device(w, device, fed))
    return packed, dense


def measure(packed, dense, rows: int, device: torch.device) -> dict:
    n, k = dense[0].shape
    x = (torch.randn(rows, k, device=device) * 0.5).to(dense[0].dtype)
    got, want = linear(x, packed[0]).float(), F.linear(x, dense[0]).float()
    error = ((got - want).abs().max() / want.abs().max()).item()
    turn = {"int4": 0, "dense": 0}

    def cycle(kind, items, op):
        def call():
            op(x, items[turn[kind] % len(items)])
            turn[kind] += 1
        return call
    int4_s = timed(cycle("int4", packed, linear), device)
    dense_s = timed(cycle("dense", dense, F.linear), device)
    return {"shape": [n, k], "rows": rows, "int4_ms": int4_s * 1e3, "dense_ms": dense_s * 1e3,
            "speedup": dense_s / int4_s, "dense_GBps": n * k * dense[0].element_size() / dense_s / 1e9,
            "int4_GBps": n * k / 2 / int4_s / 1e9, "rel_error": error}


def kernel_of(w, rows: int) -> str:
    """Which kernel multiplies `rows` rows by `w` (the compiled one's path, or PyTorch's)."""
    if w.form != "cpu":
        return "PyTorch's int4 kernel (tinygemm)"
    if rows > max_kernel_rows(w, rows):
        return "dequantize + dense"
    chosen = int4.compiled_path(w, rows)
    return f"compiled: {compiled.PATH_NAMES[chosen[1]]}" if chosen else "PyTorch's int4 kernel"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--stream-gib", type=float, default=1.0,
                   help="dense GiB cycled per shape: past the last-level cache (an H200's L2 is 60 MB)")
    p.add_argument("--json", help="append one JSON line per product here")
    args = p.parse_args()
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    choice = probe.int4_choice(device.type, dtype, False)  # --dtype as given: fed it, never lower
    if not choice.use:
        raise SystemExit(f"error: the engine would not use an int4 kernel on {device} for {args.dtype}: {choice.reason}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for model in args.models.split(","):
        for shape in SHAPES[model]:
            packed, dense = weights(shape, device, dtype, choice.activations, args.stream_gib * 2**30)
            for rows in map(int, args.rows.split(",")):
                row = {"device": name, "torch": torch.__version__, "model": model, "dtype": args.dtype,
                       "int4_path": choice.reason, "kernel": kernel_of(packed[0], rows),
                       "date": time.strftime("%Y-%m-%d"), **measure(packed, dense, rows, device)}
                print(f"{model} {shape[0]}x{shape[1]} rows {rows} ({row['kernel']}): int4 {row['int4_ms']:.3f} ms, dense "
                      f"{row['dense_ms']:.3f} ms ({row['speedup']:.2f}x), error {row['rel_error']:.1e}", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
            del packed, dense


if __name__ == "__main__":
    main()
