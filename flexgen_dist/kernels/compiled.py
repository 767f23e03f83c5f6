"""The compiled 4-bit CPU matmul (`csrc/int4_gemm.c`), built with the system's C compiler on first
use, cached, and called through ctypes.

PyTorch's CPU int4 kernel decodes each packed weight again for every few rows of activations, so
from about 8 rows on it is compute-bound and slower than a dense bf16 product. This one decodes
each weight once per tile (a block of rows of the weight against all rows of activations) and
multiplies with bf16 dot products where the CPU has them (AVX-512 BF16), else with float32 FMAs
(AVX-512, AVX2). It reads the store's layout as is (`Int4Weight`, 64- or 32-row blocks).

Built once per source and compiler into `cache_dir()` (announced on stderr), by an atomic
rename so that ranks starting together share one build; linked against OpenMP, whose runtime
PyTorch has already loaded (one thread pool, not two). Where there is no compiler, no x86-64
vector unit, or FLEXGEN_CKERNEL=0, `kernel()` is None and PyTorch's kernel stays in use;
FLEXGEN_CKERNEL=avx2 (or avx512, avx512bf16) limits the paths to those a CPU of that kind has, to
test them (avx512bf16: all but AMX).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .int4 import Int4Weight

SOURCE = Path(__file__).with_name("csrc") / "int4_gemm.c"


ENV = "FLEXGEN_CKERNEL"  # 0: never build or use; avx2 / avx512: only that CPU kind's paths


CACHE_ENV = "FLEXGEN_KERNEL_CACHE"  # where built kernels are kept (default: the user's cache dir)


CFLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")


AVX2_F32, AVX512_F32, AVX512_BF16, AVX512_BF16_FOLD, AMX_BF16 = 0, 1, 2, 3, 4  # the C source's paths


PATH_NAMES = {AVX2_F32: "AVX2 float32", AVX512_F32: "AVX-512 float32", AVX512_BF16: "AVX-512 BF16",
              AVX512_BF16_FOLD: "AVX-512 BF16 (one or two rows)", AMX_BF16: "AMX BF16"}


FOLD_MAX_ROWS = 2  # up to this many rows the BF16 products take the decode-light path


_LIMITS = {"avx2": {AVX2_F32}, "avx512": {AVX2_F32, AVX512_F32},
           "avx512bf16": {AVX2_F32, AVX512_F32, AVX512_BF16, AVX512_BF16_FOLD}}


AMX_INPUTS = 32  # the AMX path reads inputs 32 at a time: K must be a multiple


@dataclass(frozen=True)
class Kernel:
    """The loaded library and the paths it may take on this CPU."""

    lib: ctypes.CDLL
    paths: frozenset[int]

    def path_for(self, dtype: torch.dtype, rows: int, block: int, inputs: int = AMX_INPUTS) -> int | None:
        """The path for `rows` activations of `dtype` (`inputs` wide) and a weight in `block`-row
        blocks: AMX tile products where the CPU has them and more than two rows come (bf16
        activations), else bf16 dot products where the CPU has them, else float32 FMAs (bf16
        activations widened first); None where no path reads this layout or dtype."""
        if dtype not in (torch.float32, torch.bfloat16):
            return None
        if block == 64 and dtype == torch.bfloat16 and AVX512_BF16 in self.paths:
            if rows <= FOLD_MAX_ROWS:
                return AVX512_BF16_FOLD
            return AMX_BF16 if AMX_BF16 in self.paths and inputs % AMX_INPUTS == 0 else AVX512_BF16
        if block == 64 and AVX512_F32 in self.paths:
            return AVX512_F32
        return AVX2_F32 if AVX2_F32 in self.paths and block in (32, 64) else None

    def describe(self, dtype: torch.dtype, block: int) -> str:
        """The paths a decode step's products take, for the run report."""
        path = self.path_for(dtype, FOLD_MAX_ROWS + 1, block)
        return "none" if path is None else PATH_NAMES[path]


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flexgen_dist" / "kernels"


def _compiler() -> str | None:
    """$CC where set (and only it), else cc or gcc on the PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc")


def source_digest() -> str:
    """A short hash of the kernel's source: what a measurement of its speed depends on."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def _build_key(cc: str) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(CFLAGS).encode())
    return digest.hexdigest()[:16]


def _build(cc: str, target: Path) -> None:
    """Compile the source into `target`, atomically: a half-written library is never loaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"compiling the 4-bit CPU kernel once (cached in {target.parent})", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.fg_cpu_paths.restype = ctypes.c_int
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.fg_int4_mm.argtypes = [c_int, ptr, i64, i64, ptr, ptr, c_int, i64, i64, i64, c_int, ptr, c_int]
    lib.fg_int4_mm.restype = c_int
    return lib


def _allowed_paths(lib: ctypes.CDLL) -> frozenset[int]:
    bits = lib.fg_cpu_paths()
    paths = {p for p in PATH_NAMES if bits >> p & 1}
    limit = _LIMITS.get(os.environ.get(ENV, "").lower())
    return frozenset(paths & limit if limit is not None else paths)


@functools.cache
def load() -> tuple[Kernel | None, str]:
    """(the kernel, how it was found) or (None, why there is none). Built at most once per
    source and compiler; cached per process."""
    if os.environ.get(ENV, "").lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {ENV}={os.environ[ENV]}"
    if os.uname().machine not in ("x86_64", "AMD64"):
        return None, f"no compiled kernel for {os.uname().machine}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC)"
    try:
        target = cache_dir() / f"int4_gemm-{_build_key(cc)}.so"
        if not target.exists():
            _build(cc, target)
        lib = _load(target)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        text = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        return None, f"the compiled kernel could not be built or loaded: {text.strip().splitlines()[-1][:160] if text.strip() else type(e).__name__}"
    paths = _allowed_paths(lib)
    if not paths:
        return None, "this CPU has none of the compiled kernel's vector paths (AVX2 + FMA at least)"
    return Kernel(lib, paths), f"compiled kernel ({', '.join(PATH_NAMES[p] for p in sorted(paths))})"


def kernel() -> Kernel | None:
    return load()[0]


def input_dtype(path: int) -> torch.dtype:
    return torch.bfloat16 if path in (AVX512_BF16, AVX512_BF16_FOLD, AMX_BF16) else torch.float32


def int4_mm(k: Kernel, x: torch.Tensor, w: Int4Weight, path: int) -> torch.Tensor:
    """x (rows, K), contiguous, in `input_dtype(path)`, @ w.T -> float32 (rows, N); `w` in the CPU
    form, its scales and zeros float32 or bf16."""
    rows, n = x.shape[0], w.shape[0]
    y = torch.empty(rows, n, dtype=torch.float32)
    sz = w.scales_zeros
    status = k.lib.fg_int4_mm(path, x.data_ptr(), rows, w.shape[1], w.data.data_ptr(), sz.data_ptr(),
                              int(sz.dtype == torch.bfloat16), w.data.shape[0], n, w.group_size,
                              w.block_n, y.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise ValueError(f"the compiled int4 kernel refused its arguments (status {status})")  # a dispatch bug
    return y
