"""4-bit matmul weights in the layout PyTorch's CPU int4 kernel reads, kept as such on every tier.

`_weight_int4pack_mm_for_cpu` multiplies by a weight (N out, K in) quantized in groups of G
consecutive *input* values, each value `(code - 8) * scale + zero`, with the codes laid out by
`_convert_weight_to_int4pack_for_cpu`, whose layout depends on the CPU: rows in blocks of B (64
with AVX-512, 32 with AVX2 only); in a block, for each k, B / 2 bytes whose low nibble is row j's
code and high nibble row j + B / 2's. The weight store writes the layout of the CPU it runs on
(`Int4Weight`, `block_n`), so a disk-homed weight loads with no repack at all; a weight quantized
in another layout is shuffled (`to_block`) and a GPU converts it into tinygemm's form, once per
placement or load (`kernels.int4_for_device`); `dequantize_int4` gives the dense weight where the
kernel is missing or slower (prefill).

Invariants of an `Int4Weight`: `data` is uint8 (ceil(N / 64) * 64, K / 2) in the CPU layout of
`block_n`-row blocks;
`scales_zeros` is (K / G, rows of data, 2), in `scale_dtype(dtype)` as quantized and stored (bf16
for a float32 weight, whose scales and zeros are bf16 values), or in the dtype of the activations
the kernel is fed (`kernels.int4_for_device`; exact either way); padding rows have code 8, scale
0 and zero 0 (their value is 0); `shape` is (N, K). `form` says which kernel the data is laid out
for: "cpu", or "cuda" (then `data` is tinygemm's int32 tensor and only that kernel can read it).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, replace

import torch

from ..core.compression import CompressionConfig
from . import compiled
from .quantize import compressed_parts, fake_quantize

BLOCK_N = 64  # rows per block of the default CPU layout (AVX-512's); the largest, so padded rows fill any


BLOCKS = (64, 32)  # the CPU kernel's layouts: AVX-512's, AVX2's


GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the kernels accept


ZERO_CODE = 8  # codes are offsets from zero: value = (code - 8) * scale + zero


QUANTIZE_ROWS = 64 * BLOCK_N  # rows quantized at a time (a multiple of BLOCK_N: only the last part is padded)


DEQUANTIZE_CHUNK_BYTES = 4 << 20  # codes unpacked at a time when dequantizing


@dataclass
class Int4Weight:
    data: torch.Tensor
    scales_zeros: torch.Tensor
    shape: tuple[int, int]
    group_size: int
    dtype: torch.dtype  # of the dense weight (never inferred from the scales: a float32 weight's are bf16)
    form: str = "cpu"
    block_n: int = BLOCK_N  # rows per block of the CPU layout `data` is in

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales_zeros))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device, non_blocking: bool = False) -> "Int4Weight":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, data=move(self.data), scales_zeros=move(self.scales_zeros))


def fits(shape, num_bits: int, group_size: int) -> bool:
    """Whether a weight of `shape` can take this layout: 2-D, 4-bit, whole groups of an accepted size."""
    return (num_bits == 4 and len(shape) == 2 and group_size in GROUP_SIZES and shape[1] % group_size == 0)


def padded_rows(n: int) -> int:
    return -(-n // BLOCK_N) * BLOCK_N  # a multiple of every layout's block


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a `dtype` weight's scales and zeros are kept in: bf16 for float32 (a CPU without
    fast float32 int4 products feeds the kernel bf16 activations and scales; half the bytes),
    else `dtype`."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


def parts(shape, dtype: torch.dtype, group_size: int) -> tuple[int, int]:
    """Bytes of the packed codes and of the scales and zeros of a `dtype` weight of `shape`."""
    rows, k = padded_rows(shape[0]), shape[1]
    elem = torch.empty((), dtype=scale_dtype(dtype)).element_size()
    return rows * k // 2, (k // group_size) * rows * 2 * elem


def _round_up(x32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r = x32.to(dtype)
    return torch.where(r.float() < x32, torch.nextafter(r, torch.full_like(r, float("inf"))), r)


def _scales_zeros(groups: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, in `scale_dtype(dtype)`: zero near where code 8 falls, then the smallest scale
    (rounded up) with which codes 0..15 reach both the group's minimum and its maximum. Choosing
    zero first keeps every value within half a step of its code even after zero is rounded. A
    float32 weight's are bf16 (at 1/256 of a step's precision in the scale, which costs nothing
    measurable)."""
    grid = scale_dtype(dtype)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    zero = (lo + (hi - lo) * (ZERO_CODE / 15)).to(grid)
    z = zero.float()
    need = torch.maximum((z - lo) / ZERO_CODE, (hi - z) / (15 - ZERO_CODE))
    return _round_up(need, grid), zero


def _to_layout(codes: torch.Tensor, block: int = BLOCK_N) -> torch.Tensor:
    """uint8 codes (rows, K), rows a multiple of `block` -> the CPU kernel's packed bytes (rows, K / 2)."""
    rows, k = codes.shape
    blocks = codes.view(rows // block, 2, block // 2, k).transpose(2, 3)  # (blocks, 2, K, block / 2)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).contiguous().view(rows, k // 2)


def _from_layout(data: torch.Tensor, k: int, block: int = BLOCK_N) -> torch.Tensor:
    """The CPU layout's bytes -> uint8 codes (rows, K)."""
    rows = data.shape[0]
    packed = data.view(rows // block, k, block // 2).transpose(1, 2)  # (blocks, block / 2, K)
    codes = torch.empty(rows // block, 2, block // 2, k, dtype=torch.uint8, device=data.device)
    codes[:, 0] = packed & 0xF
    codes[:, 1] = packed >> 4
    return codes.view(rows, k)


def to_block(w: Int4Weight, block: int) -> Int4Weight:
    """`w` in the CPU layout of `block`-row blocks (stores are written in this CPU's: this serves
    weights quantized in the default layout, e.g. the probe's trial one). From 64 to 32 the
    nibbles move in place of a whole unpack and repack: a 64-row block's byte j holds rows j and
    j + 32; the first 32-row block's byte j (j < 16) takes rows j and j + 16 from the low nibbles
    of bytes j and j + 16, the second rows 32 + j and 48 + j from their high nibbles."""
    if w.block_n == block:
        return w
    if w.form != "cpu":
        raise ValueError(f"an int4 weight in {w.form} form has no CPU layout")  # a dispatch bug
    k = w.shape[1]
    if (w.block_n, block) != (64, 32):
        return replace(w, data=_to_layout(_from_layout(w.data, k, w.block_n), block), block_n=block)
    old = w.data.view(-1, k, 32)
    low, high = old[..., :16], old[..., 16:]
    new = torch.empty(old.shape[0], 2, k, 16, dtype=torch.uint8, device=old.device)
    torch.bitwise_or(low & 0xF, high << 4, out=new[:, 0])
    torch.bitwise_or(low >> 4, high & 0xF0, out=new[:, 1])
    return replace(w, data=new.view(w.data.shape), block_n=block)


def quantize_int4(w: torch.Tensor, group_size: int, block: int = BLOCK_N) -> Int4Weight:
    """`w` (N, K) in the CPU layout of `block`-row blocks, grouped along K; every value within half
    a step of the original. Large weights are quantized QUANTIZE_ROWS rows at a time (whole blocks
    of the layout), so the float32 temporaries stay small: a vocabulary table's would otherwise be
    several times its size."""
    n, k = w.shape
    if n > QUANTIZE_ROWS:
        parts = [quantize_int4(w[i:i + QUANTIZE_ROWS], group_size, block) for i in range(0, n, QUANTIZE_ROWS)]
        return Int4Weight(torch.cat([p.data for p in parts]), torch.cat([p.scales_zeros for p in parts], dim=1),
                          (n, k), group_size, dtype=w.dtype, block_n=block)
    groups = w.float().reshape(n, k // group_size, group_size)
    scale, zero = _scales_zeros(groups, w.dtype)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(groups[..., 0]))
    offsets = ((groups - zero.float()[..., None]) / safe[..., None]).round_()
    codes = (offsets + ZERO_CODE).clamp_(0, 15).to(torch.uint8).view(n, k)
    rows = padded_rows(n)
    codes = torch.cat([codes, codes.new_full((rows - n, k), ZERO_CODE)])
    pad = lambda t: torch.cat([t, t.new_zeros(rows - n, t.shape[1])])  # noqa: E731
    scales_zeros = torch.stack([pad(scale).T, pad(zero).T], dim=-1).contiguous()
    return Int4Weight(_to_layout(codes, block), scales_zeros, (n, k), group_size, dtype=w.dtype, block_n=block)


def with_scales_in(w: Int4Weight, dtype: torch.dtype) -> Int4Weight:
    """`w` whose scales and zeros are `dtype` values, for a kernel fed activations of `dtype`
    (exact for a float32 weight's scales, which are bf16 values); the dense weight's dtype stays."""
    return w if w.scales_zeros.dtype == dtype else replace(w, scales_zeros=w.scales_zeros.to(dtype))


def dequantize_int4(w: Int4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (N, K) weight in `w.dtype`: (code - 8) * scale + zero, as the kernel computes it;
    written into `out` (rows of `w.data` x K, `w.dtype`) when given: a fresh tensor of a weight's
    size costs more in page faults than the arithmetic (26 of 49 ms for 8192 x 2048 float32).
    Codes are unpacked DEQUANTIZE_CHUNK_BYTES at a time, so the dense weight is the only large
    allocation."""
    if w.form != "cpu":
        raise ValueError(f"an int4 weight in {w.form} form cannot be dequantized")  # a dispatch bug
    (n, k), rows, g = w.shape, w.data.shape[0], w.group_size
    values = torch.empty(rows, k, dtype=w.dtype, device=w.device) if out is None else out
    scale, zero = (w.scales_zeros[..., i].T[..., None].to(w.dtype) for i in (0, 1))
    step = max(1, DEQUANTIZE_CHUNK_BYTES // (k * w.block_n)) * w.block_n
    for r in range(0, rows, step):
        part = values[r:r + step]
        part.copy_(_from_layout(w.data[r:r + step], k, w.block_n).view(torch.int8).sub_(ZERO_CODE))
        part.view(-1, k // g, g).mul_(scale[r:r + step]).add_(zero[r:r + step])  # offsets exact in int8
    return values[:n]


def take_rows(w: Int4Weight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of the dense weight, dequantized from the CPU layout alone, with
    `dequantize_int4`'s arithmetic (so bit for bit its rows): an embedding looked up in the
    4-bit weight its tied output head multiplies with. Result: ids.shape + (K,)."""
    if w.form != "cpu":
        raise ValueError(f"rows cannot be taken from an int4 weight in {w.form} form")  # a dispatch bug
    flat, k, half = ids.reshape(-1), w.shape[1], w.block_n // 2
    within = flat % w.block_n  # row b*B + h*B/2 + j: byte j of block b at every k, nibble h
    packed = w.data.view(-1, k, half)[flat // w.block_n, :, within % half]  # (n, K)
    codes = torch.where((within >= half)[:, None], packed >> 4, packed & 0xF).to(w.dtype)
    grouped = codes.view(len(flat), k // w.group_size, w.group_size)
    scale, zero = (w.scales_zeros[:, flat, i].T[..., None].to(w.dtype) for i in (0, 1))
    grouped.sub_(ZERO_CODE).mul_(scale).add_(zero)
    return codes.view(*ids.shape, k)


def fake_quantize_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """What a packed-int4 run sees in place of `w`."""
    return dequantize_int4(quantize_int4(w, group_size))


def weight_parts(shape, dtype: torch.dtype, config) -> tuple[int, int]:
    """Bytes of a compressed matmul weight's two store files (codes, then scales): this layout
    where the weight fits it, else `compression`'s generic one."""
    if fits(shape, config.num_bits, config.group_size):
        return parts(shape, dtype, config.group_size)
    return compressed_parts(shape, dtype, config)


def fake_quantize_weight(w: torch.Tensor, config) -> torch.Tensor:
    """What a run with weight compression `config` sees in place of the matmul weight `w`, in
    whichever layout the store keeps it."""
    if fits(w.shape, config.num_bits, config.group_size):
        return fake_quantize_int4(w, config.group_size)
    return fake_quantize(w, config)


_INT4_OPS = {"cpu": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
             "cuda": ("_convert_weight_to_int4pack", "_weight_int4pack_mm")}


def _int4_op(device_type: str, which: int):
    name = _INT4_OPS[device_type][which]
    return getattr(torch.ops.aten, name)


def compiled_path(w: Int4Weight, rows: int) -> tuple[compiled.Kernel, int] | None:
    """(kernel, path) where the compiled CPU kernel takes this product, else None."""
    kernel = compiled.kernel() if w.form == "cpu" else None
    path = kernel.path_for(w.scales_zeros.dtype, rows, w.block_n, w.shape[1]) if kernel is not None else None
    return None if path is None else (kernel, path)


def int4_mm(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x (rows, K) @ w.T from an Int4Weight's packed codes: (rows, N or padded N) in x's dtype. The
    kernel is fed activations of the dtype of w's scales, which `kernels.int4_for_device` set to
    the feed the engine chose once (`probe.int4_choice`: the model's dtype unless --dtype auto let
    a float32 model's kernel be fed bf16): the compiled one on a CPU where it is built, else
    PyTorch's."""
    fed = w.scales_zeros.dtype
    chosen = compiled_path(w, x.shape[0])
    if chosen is not None:
        kernel, path = chosen
        x_in = x.to(fed).to(compiled.input_dtype(path)).contiguous()
        return compiled.int4_mm(kernel, x_in, w, path).to(x.dtype)
    return _int4_op(w.form, 1)(x.to(fed), w.data, w.group_size, w.scales_zeros).to(x.dtype)


def uses_compiled(fed: torch.dtype, block: int) -> bool:
    """Whether CPU products of 4-bit weights in `block`-row blocks fed `fed` take the compiled kernel."""
    kernel = compiled.kernel()
    return kernel is not None and kernel.path_for(fed, 1, block) is not None


def kernel_name(fed: torch.dtype, block: int) -> str:
    """Which CPU kernel multiplies 4-bit weights fed `fed` activations, for reports."""
    if uses_compiled(fed, block):
        return f"compiled kernel: {compiled.kernel().describe(fed, block)}"
    return "PyTorch's int4 kernel"


def int4_to_cuda_form(w: Int4Weight) -> Int4Weight:
    """A CPU-form Int4Weight on a GPU -> tinygemm's form (codes two per byte, even k in the high nibble)."""
    codes = _from_layout(w.data, w.shape[1], w.block_n)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    k = w.shape[1]
    tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    return dataclasses.replace(w, data=_int4_op("cuda", 0)(packed.contiguous(), tiles), form="cuda")


@functools.lru_cache(maxsize=None)
def int4_cpu_block() -> int | None:
    """The rows per block of the layout this CPU's int4 kernel reads (it follows the instruction
    set: 64 with AVX-512, 32 with AVX2), from what its conversion op writes; None if neither."""
    codes = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    written = _int4_op("cpu", 0)(codes.int(), 2)
    return next((block for block in BLOCKS if torch.equal(written, _to_layout(codes, block))), None)


def int4_store_block() -> int:
    """The CPU layout to store 4-bit weights in: the one this CPU's kernel reads, so that loading
    them needs no shuffle; the default one where there is no kernel (they are dequantized)."""
    try:
        return int4_cpu_block() or BLOCK_N
    except (RuntimeError, AttributeError, NotImplementedError):
        return BLOCK_N


def cpu_kernel_reads_store() -> bool:
    """Whether some CPU int4 kernel reads the layout the store writes: the compiled one (any of
    them), or PyTorch's where its layout is one of ours."""
    if compiled.kernel() is not None:
        return True
    try:
        return int4_cpu_block() is not None
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def int4_to_cpu_form(w: Int4Weight) -> Int4Weight:
    """A CPU-form Int4Weight in the layout this CPU's kernels read (the store's)."""
    return to_block(w, int4_store_block())


def int4_layout_block(compression: CompressionConfig | None) -> int | None:
    """Rows per block of the CPU layout a store with `compression` writes its int4 weights in (the
    one this CPU's kernel reads), or None if it writes none."""
    if compression is None or compression.num_bits != 4 or compression.group_size not in GROUP_SIZES:
        return None
    return int4_store_block()
