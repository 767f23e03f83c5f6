"""Measure this machine's roofline: matmul peak per dtype, DRAM read bandwidth, disk O_DIRECT reads.

    python benchmark/roofline.py [--disk-dir DIR] [--disk-gb 4] [--json out.json]

The engine's benchmark reports its share of these numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from flexgen_dist.system.io import aligned_empty


def best_of(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_tflops(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / best_of(lambda: a @ b) / 1e12


def dram_read_gbs(gb: float = 1.0) -> float:
    x = torch.ones(int(gb * 1e9 / 4), dtype=torch.float32)
    return x.numel() * 4 / best_of(lambda: x.sum()) / 1e9


def disk_read_gbs(directory: str, gb: float, block_mb: int = 16, threads: int = 4) -> dict:
    """Sequential O_DIRECT read of a fresh file: one stream, and `threads` streams over its parts."""
    path = os.path.join(directory, "roofline.bin")
    size = int(gb * 1e9) // (block_mb << 20) * (block_mb << 20)
    block = os.urandom(block_mb << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    out = {}
    try:
        for n in (1, threads):
            buf = [aligned_empty(block_mb << 20) for _ in range(n)]
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            step, part = block_mb << 20, size // n

            def read_part(i):
                view = memoryview(buf[i].numpy())
                for off in range(i * part, (i + 1) * part, step):
                    os.preadv(fd, [view], off)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(read_part, range(n)))
            out[f"disk_odirect_{n}_stream_gbs"] = size / (time.perf_counter() - t0) / 1e9
            os.close(fd)
    finally:
        os.remove(path)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--disk-dir", default="/tmp")
    p.add_argument("--disk-gb", type=float, default=4.0)
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args()
    result = {"threads": torch.get_num_threads()}
    for name, dtype in [("bfloat16", torch.bfloat16), ("float32", torch.float32)]:
        result[f"matmul_{name}_tflops"] = matmul_tflops(dtype)
    result["matmul_float16_tflops"] = matmul_tflops(torch.float16, n=512)  # very slow on some CPUs
    result["dram_read_gbs"] = dram_read_gbs()
    result.update(disk_read_gbs(args.disk_dir, args.disk_gb))
    for k, v in result.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
