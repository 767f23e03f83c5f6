"""What this machine's compute device can do fast, measured at run time instead of assumed.

CPUs differ: with AMX or AVX-512 BF16, oneDNN multiplies bf16 several times faster than fp32; on
an AVX2-only CPU it has no bf16 path at all (a bf16 matmul falls back to a scalar loop, 100x
slower) and its weight-packing op raises. So the CPU dtype is chosen by a short timed probe on the
model's shapes, and the packed-weight fast path by trying the packing op once.

Both answers can be forced for tests and for users who know better, through environment variables:
`FLEXGEN_CPU_BF16=0|1` (treat bf16 as slow / fast) and `FLEXGEN_CPU_PACK=0|1` (never pack / pack
when the op works). Results are cached per process.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BF16_ENV = "FLEXGEN_CPU_BF16"
PACK_ENV = "FLEXGEN_CPU_PACK"
PROBE_ROWS = 32  # between a decode step's rows and a prefill's: both must win for bf16 to pay
PROBE_MIN_DIM = 1024  # smaller products are dominated by call overhead, not by the dtype
PROBE_MAX_DIM = 2048  # larger layers behave like this one; the probe must stay well under 1 s
PROBE_SAMPLES = 7


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype and why: `bf16_vs_fp32` is fp32 time / bf16 time (None if not measured)."""

    dtype: torch.dtype
    reason: str
    bf16_vs_fp32: float | None = None


def _forced(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() in ("1", "true", "yes", "on")


def _best_times(fns, rounds: int = PROBE_SAMPLES) -> list[float]:
    """The fastest of a few calls of each function, the calls interleaved so that load from other
    processes falls on all of them alike: the minimum is what the kernel costs."""
    for fn in fns:
        fn()  # first call: allocation and any one-time kernel setup
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


@contextlib.contextmanager
def _one_thread():
    """Time on one thread: with several, one descheduled thread (a busy shared machine) stalls the
    whole product, and the ratio of two dtypes is what matters, not the absolute speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def bf16_speedup(dim: int) -> float:
    """fp32 time / bf16 time of a (PROBE_ROWS, dim) x (dim, dim) product on this CPU, with bf16
    weights packed as the engine would pack them when that is possible."""
    dim = max(min(dim, PROBE_MAX_DIM), PROBE_MIN_DIM)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(PROBE_ROWS, dim, generator=g), torch.randn(dim, dim, generator=g) * 0.02
    xb, wb = x.bfloat16(), w.bfloat16()
    packed = try_pack(wb, PROBE_ROWS) if pack_supported() else None
    bf16 = (lambda: linear_packed(xb, packed)) if packed is not None else (lambda: F.linear(xb, wb))
    fp32 = lambda: F.linear(x, w)  # noqa: E731
    with _one_thread():
        fp32_s, = _best_times([fp32], rounds=1)
        # one bf16 call first: where bf16 has no fast path it is ~100x slower; don't repeat it then
        t0 = time.perf_counter()
        bf16()
        slow = time.perf_counter() - t0
        if slow > 20 * max(fp32_s, 1e-4):
            return fp32_s / slow
        fp32_s, bf16_s = _best_times([fp32, bf16])
    return fp32_s / bf16_s


def try_pack(w: torch.Tensor, rows_hint: int) -> torch.Tensor | None:
    """`w` in oneDNN's packed layout, or None where this CPU's oneDNN cannot pack it."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)
    except (RuntimeError, AttributeError):  # e.g. "bf16 path needs the cpu support avx512bw..."
        return None


def linear_packed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@functools.lru_cache(maxsize=None)
def pack_supported() -> bool:
    """Whether bf16 linear weights can be prepacked for oneDNN here: tried once on a tiny weight
    (and its product checked against F.linear), unless FLEXGEN_CPU_PACK says otherwise."""
    forced = _forced(PACK_ENV)
    if forced is False or not torch.backends.mkldnn.is_available():
        return False
    w = torch.randn(64, 64).bfloat16()
    packed = try_pack(w, 4)
    if packed is None:
        return False
    x = torch.randn(4, 64).bfloat16()
    try:
        return torch.equal(linear_packed(x, packed), F.linear(x, w))
    except RuntimeError:
        return False


def cpu_has_bf16_path() -> bool:
    """oneDNN's own answer to whether it has native bf16 kernels on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (RuntimeError, AttributeError):
        return False


def choose_cpu_dtype(dim: int) -> DtypeChoice:
    """bf16 where oneDNN has a bf16 path and it is measurably faster than fp32 for `dim`-wide
    layers; fp32 otherwise."""
    forced = _forced(BF16_ENV)
    if forced is not None:
        dtype = torch.bfloat16 if forced else torch.float32
        return DtypeChoice(dtype, f"forced by {BF16_ENV}={os.environ[BF16_ENV]}")
    if not cpu_has_bf16_path():
        return DtypeChoice(torch.float32, "oneDNN has no bf16 path on this CPU")
    speedup = bf16_speedup(dim)
    if speedup > 1.1:
        return DtypeChoice(torch.bfloat16, f"bf16 matmul {speedup:.1f}x faster than fp32 here", speedup)
    return DtypeChoice(torch.float32, f"bf16 matmul only {speedup:.2f}x the speed of fp32 here", speedup)


def choose_cuda_dtype(device: torch.device) -> DtypeChoice:
    if torch.cuda.is_bf16_supported():
        return DtypeChoice(torch.bfloat16, f"{torch.cuda.get_device_name(device)} supports bf16")
    return DtypeChoice(torch.float16, f"{torch.cuda.get_device_name(device)} has no bf16")


def choose_dtype(device: torch.device, dim: int) -> DtypeChoice:
    """The compute dtype for `--dtype auto` on `device`, for a model whose layers are `dim` wide."""
    return choose_cuda_dtype(device) if device.type == "cuda" else choose_cpu_dtype(dim)


def slow_bf16_warning(dim: int) -> str | None:
    """One line for an explicit bf16 request on a CPU where bf16 is slower than fp32, else None."""
    if _forced(BF16_ENV) is not None or cpu_has_bf16_path():
        return None
    speedup = bf16_speedup(dim)
    if speedup >= 0.9:
        return None
    return (f"warning: this CPU has no fast bf16 path: a bf16 matmul measured {1 / speedup:.0f}x slower "
            "than float32 here; --dtype auto (or float32) is faster")
