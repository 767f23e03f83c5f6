"""What this machine's compute device can do fast, measured at run time instead of assumed.

CPUs differ: with AMX or AVX-512 BF16, oneDNN multiplies bf16 several times faster than fp32; on
an AVX2-only CPU it has no bf16 path at all (a bf16 matmul falls back to a scalar loop, 100x
slower) and its weight-packing op raises. So the CPU dtype is chosen by a short timed probe on the
model's shapes, and the packed-weight fast path by trying the packing op once.

Compressed (4-bit) matmul weights are multiplied from their packed codes where an int4 kernel for
the device exists (on a CPU the compiled one, `kernels.compiled`, else PyTorch's), runs for the
dtype, matches the dequantized product and (on a CPU) beats dequantize + dense at decode shapes;
see `int4_choice`.

The answers can be forced for tests and for users who know better, through environment variables:
`FLEXGEN_CPU_BF16=0|1` (treat bf16 as slow / fast), `FLEXGEN_CPU_PACK=0|1` (never pack / pack
when the op works) and `FLEXGEN_INT4=0|1|bf16` (never use the int4 kernel / use it whenever it
works and matches, fast or not, fed the model's dtype / the same, fed bf16 activations). Results
are cached per process.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import FlexGenError
from ..core.timing import typical_times
from ..core.types import DTYPES, dtype_name
from . import compiled
from .int4 import (
    _INT4_OPS,
    cpu_kernel_reads_store,
    dequantize_int4,
    int4_mm,
    int4_to_cpu_form,
    int4_to_cuda_form,
    quantize_int4,
    with_scales_in,
)

BF16_ENV = "FLEXGEN_CPU_BF16"


PACK_ENV = "FLEXGEN_CPU_PACK"


INT4_ENV = "FLEXGEN_INT4"


INT4_PROBE_ROWS = 8  # a decode step's rows: the shape the int4 kernel is for


INT4_PROBE_DIM = 2048  # large enough that the weight, not call overhead, sets the time


PROBE_ROWS = 32  # between a decode step's rows and a prefill's: both must win for bf16 to pay


PROBE_MIN_DIM = 1024  # smaller products are dominated by call overhead, not by the dtype


PROBE_MAX_DIM = 2048  # larger layers behave like this one; the probe must stay well under 1 s


PROBE_SAMPLES = 7


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype and why: `bf16_vs_fp32` is fp32 time / bf16 time (None if not measured).
    `requested` is what the user asked for: "auto" (the probe's choice, which also lets a kernel
    be fed a lower precision than `dtype` where that is faster), or the dtype's name (then every
    kernel computes in `dtype`)."""

    dtype: torch.dtype
    reason: str
    bf16_vs_fp32: float | None = None
    requested: str = "auto"

    @property
    def lower_feed_ok(self) -> bool:
        """Whether a kernel may be fed activations of lower precision than `dtype`."""
        return self.requested == "auto"


def _forced(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() in ("1", "true", "yes", "on")


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
        fp32_s, = typical_times([fp32], rounds=1)
        # one bf16 call first: where bf16 has no fast path it is ~100x slower; don't repeat it then
        t0 = time.perf_counter()
        bf16()
        slow = time.perf_counter() - t0
        if slow > 20 * max(fp32_s, 1e-4):
            return fp32_s / slow
        fp32_s, bf16_s = typical_times([fp32, bf16], PROBE_SAMPLES)
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


# bf16 is chosen where it is this much faster than fp32; the planner weighs both dtypes (bf16 holds
# half the bytes) unless one is this much faster than the other
BF16_WINS = 1.1
BF16_DOMINATES = 1.5


def _cpu_bf16_speedup(dim: int) -> tuple[float | None, DtypeChoice | None]:
    """(fp32 time / bf16 time for `dim`-wide layers, None) where it must be measured; (None, the
    answer) where it is settled without measuring: forced by FLEXGEN_CPU_BF16, or no bf16 path."""
    forced = _forced(BF16_ENV)
    if forced is not None:
        dtype = torch.bfloat16 if forced else torch.float32
        return None, DtypeChoice(dtype, f"forced by {BF16_ENV}={os.environ[BF16_ENV]}")
    if not cpu_has_bf16_path():
        return None, DtypeChoice(torch.float32, "oneDNN has no bf16 path on this CPU")
    return bf16_speedup(dim), None


def choose_cpu_dtype(dim: int) -> DtypeChoice:
    """bf16 where oneDNN has a bf16 path and it is measurably faster than fp32 for `dim`-wide
    layers; fp32 otherwise."""
    speedup, settled = _cpu_bf16_speedup(dim)
    if settled is not None:
        return settled
    if speedup > BF16_WINS:
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


# ----- packed int4 matmul ----------------------------------------------------------------------
@dataclass(frozen=True)
class Int4Choice:
    """Whether compressed linear weights are multiplied packed, with activations of which dtype
    (`activations`, None when not used), and why."""

    use: bool
    reason: str
    activations: torch.dtype | None = None


def _int4_trial(device: torch.device, dtype: torch.dtype, fed: torch.dtype, n: int, k: int):
    """A `dtype` int4 weight of this shape on `device` in the form its kernel reads when fed `fed`
    activations, `dtype` activations, and the dense weight to match."""
    g = torch.Generator().manual_seed(0)
    w = quantize_int4((torch.randn(n, k, generator=g) * 0.02).to(dtype), 64)
    x = torch.randn(INT4_PROBE_ROWS, k, generator=g).to(dtype)
    dense = dequantize_int4(w)
    w = with_scales_in(w.to(device), fed)
    w = int4_to_cpu_form(w) if device.type == "cpu" else int4_to_cuda_form(w)
    return w, x.to(device), dense.to(device)


def _int4_matches(device: torch.device, dtype: torch.dtype, fed: torch.dtype) -> str | None:
    """None if the int4 kernel runs here fed `fed` activations and gives the dequantized product
    (to the rounding of `fed`); else why not."""
    try:
        if device.type == "cpu" and not cpu_kernel_reads_store():
            return "the int4 kernel reads a layout this engine does not write"
        w, x, dense = _int4_trial(device, dtype, fed, 128, 256)
        got = int4_mm(x, w)[:, :128].float()
    except (RuntimeError, AttributeError, NotImplementedError, StopIteration) as e:
        return f"the int4 kernel fails here: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
    want = (x @ dense.T).float()
    tol = (1e-2 if fed in (torch.bfloat16, torch.float16) else 1e-4) * want.abs().max().item()
    if not (got - want).abs().max().item() <= tol:
        return "the int4 kernel's product differs from the dequantized one"
    return None


def int4_speedups(dtype: torch.dtype, feeds: list[torch.dtype]) -> list[float]:
    """(dequantize + dense) time / int4 kernel time for a decode step's product on this CPU, the
    kernel fed activations of each dtype in `feeds` (a float32 model's bf16 feed: 20-40x faster
    than its float32 one on an AVX2-only CPU, which has no fast float32 int4 product)."""
    trials = [_int4_trial(torch.device("cpu"), dtype, fed, INT4_PROBE_DIM, INT4_PROBE_DIM) for fed in feeds]
    w, x, _ = trials[0]
    kernels = [lambda w=w, x=x: int4_mm(x, w) for w, x, _ in trials]
    with _one_thread():
        first = []
        for kernel in kernels:
            t0 = time.perf_counter()
            kernel()
            first.append(time.perf_counter() - t0)
        # a feed many times slower than the best on its first call is not worth timing again
        kept = [i for i, s in enumerate(first) if s <= 4 * min(first)]
        *packed_s, dense_s = typical_times([kernels[i] for i in kept] + [lambda: F.linear(x, dequantize_int4(w))],
                                         rounds=3)
    best = dict(zip(kept, packed_s))
    return [dense_s / best.get(i, first[i]) for i in range(len(feeds))]


def _int4_feeds(device_type: str, dtype: torch.dtype, forced: bool | str | None,
                lower_feed_ok: bool) -> list[torch.dtype]:
    """The activation dtypes to try the kernel with: the model's, and, where a lower feed is
    allowed (--dtype auto), bf16 for a float32 model on a CPU; FLEXGEN_INT4=1 keeps the model's
    (exact), =bf16 only bf16 (none where the model's dtype is another and was asked for)."""
    if forced == "bf16":
        return [torch.bfloat16] if lower_feed_ok or dtype == torch.bfloat16 else []
    if forced is None and lower_feed_ok and device_type == "cpu" and dtype == torch.float32:
        return [dtype, torch.bfloat16]
    return [dtype]


def _fed(dtype: torch.dtype, fed: torch.dtype, lower_feed_ok: bool) -> str:
    """What the kernel is fed, for the reason: said where it is not simply the model's dtype, or
    where it is a float32 feed only because --dtype float32 was asked for."""
    if fed != dtype:
        return f", fed {dtype_name(fed)} activations, which --dtype auto allows"
    if not lower_feed_ok and dtype == torch.float32:
        return ", fed float32 activations as --dtype float32 asks"
    return ""


def _int4_settled(device_type: str, forced) -> Int4Choice | None:
    """The answer where no trial is needed: forced off, or no kernel for the device."""
    if forced is False:
        return Int4Choice(False, f"forced by {INT4_ENV}={os.environ[INT4_ENV]}")
    has_torch_kernel = device_type in _INT4_OPS and hasattr(torch.ops.aten, _INT4_OPS[device_type][1])
    if not has_torch_kernel and not (device_type == "cpu" and compiled.kernel() is not None):
        return Int4Choice(False, f"this PyTorch has no int4 kernel for {device_type}")
    return None


@functools.lru_cache(maxsize=None)
def int4_choice(device_type: str, dtype: torch.dtype, lower_feed_ok: bool) -> Int4Choice:
    """Packed int4 matmul where the kernel exists, runs fed `dtype` activations (or, for float32 on
    a CPU where `lower_feed_ok`, i.e. --dtype auto, bf16 ones), matches the dequantized product
    and (on a CPU, unless FLEXGEN_INT4=1 or bf16) beats dequantize + dense for a decode step; of
    two feeds that do, the faster. An explicit dtype is never lowered: the kernel is fed it, or
    not used."""
    env = os.environ.get(INT4_ENV, "").lower()
    forced = "bf16" if env == "bf16" else _forced(INT4_ENV) if env else None
    settled = _int4_settled(device_type, forced)
    if settled is not None:
        return settled
    tried = _int4_feeds(device_type, dtype, forced, lower_feed_ok)
    if not tried:
        return Int4Choice(False, f"{INT4_ENV}=bf16 asks for bf16 activations, which --dtype {dtype_name(dtype)} "
                                 "does not allow")
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    failures = {fed: _int4_matches(device, dtype, fed) for fed in tried}
    feeds = [fed for fed, why_not in failures.items() if why_not is None]
    if not feeds:
        return Int4Choice(False, next(iter(failures.values())))
    if forced:
        return Int4Choice(True, f"forced by {INT4_ENV}={os.environ[INT4_ENV]}{_fed(dtype, feeds[0], lower_feed_ok)}", feeds[0])
    if device_type == "cuda":
        return Int4Choice(True, "tinygemm int4 kernel", feeds[0])
    speedup, fed = max(zip(int4_speedups(dtype, feeds), feeds), key=lambda pair: pair[0])
    if speedup > 1.1:
        return Int4Choice(True, f"{speedup:.1f}x faster than dequantize + dense for a decode step{_fed(dtype, fed, lower_feed_ok)}", fed)
    return Int4Choice(False, f"int4 kernel only {speedup:.2f}x the speed of dequantize + dense here"
                             f"{_fed(dtype, fed, lower_feed_ok)}")


def choose_int4(device: torch.device, dtype: DtypeChoice) -> Int4Choice:
    """How an engine computing in `dtype` on `device` multiplies its compressed linear weights:
    decided once per engine (the executor keeps the answer, the run's summary reports it)."""
    return int4_choice(device.type, dtype.dtype, dtype.lower_feed_ok)


def resolve_dtype(dtype, device: torch.device, dim: int) -> DtypeChoice:
    """`auto` (or None) asks the probe; an explicit dtype is used as given, with a one-line
    warning where bf16 is requested on a CPU that has no fast bf16 path."""
    if isinstance(dtype, torch.dtype):
        return DtypeChoice(dtype, "requested", requested=dtype_name(dtype))
    if dtype in (None, "auto"):
        return choose_dtype(device, dim)
    if dtype not in DTYPES:
        raise FlexGenError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if DTYPES[dtype] == torch.bfloat16 and device.type == "cpu":
        message = slow_bf16_warning(dim)
        if message:
            print(message, file=sys.stderr)
    return DtypeChoice(DTYPES[dtype], "requested", requested=dtype)


def dtype_candidates(requested: str | None, device: torch.device, dim: int = 2048) -> tuple[torch.dtype, ...]:
    """The dtypes the planner may choose: the requested one; else, on a CPU, both where neither
    dominates the other (see BF16_DOMINATES), otherwise what `choose_dtype` would take."""
    if requested not in (None, "auto"):
        return (DTYPES[requested],)
    if device.type == "cuda":
        return (choose_cuda_dtype(device).dtype,)
    speedup, settled = _cpu_bf16_speedup(dim)
    if settled is not None:
        return (settled.dtype,)
    if speedup > BF16_DOMINATES:  # half the bytes and this much faster: fp32 cannot win
        return (torch.bfloat16,)
    return (torch.float32,) if speedup < 1 / BF16_DOMINATES else (torch.float32, torch.bfloat16)
