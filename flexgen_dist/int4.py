"""4-bit matmul weights in the layout PyTorch's CPU int4 kernel reads, kept as such on every tier.

`_weight_int4pack_mm_for_cpu` multiplies by a weight (N out, K in) quantized in groups of G
consecutive *input* values, each value `(code - 8) * scale + zero`, with the codes laid out by
`_convert_weight_to_int4pack_for_cpu`: rows in blocks of 64; in a block, for each k, 32 bytes
whose low nibble is row j's code and high nibble row j + 32's. The weight store writes exactly
that (`Int4Weight`), so a CPU loads it with no repack at all; a GPU converts it once per load into
tinygemm's form (`kernels.int4_for_device`); and `dequantize_int4` gives the dense weight where
the kernel is missing or slower (prefill).

Invariants of an `Int4Weight`: `data` is uint8 (ceil(N / 64) * 64, K / 2) in the CPU layout;
`scales_zeros` is (K / G, rows of data, 2) in the model dtype; padding rows have code 8, scale 0
and zero 0 (their value is 0); `shape` is (N, K). `form` says which kernel the data is laid out
for: "cpu", or "cuda" (then `data` is tinygemm's int32 tensor and only that kernel can read it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

BLOCK_N = 64  # rows per block of the CPU layout
GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the kernels accept
ZERO_CODE = 8  # codes are offsets from zero: value = (code - 8) * scale + zero
QUANTIZE_ROWS = 64 * BLOCK_N  # rows quantized at a time (a multiple of BLOCK_N: only the last part is padded)


@dataclass
class Int4Weight:
    data: torch.Tensor
    scales_zeros: torch.Tensor
    shape: tuple[int, int]
    group_size: int
    form: str = "cpu"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales_zeros))

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_zeros.dtype

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
    return -(-n // BLOCK_N) * BLOCK_N


def parts(shape, dtype: torch.dtype, group_size: int) -> tuple[int, int]:
    """Bytes of the packed codes and of the scales and zeros of a weight of `shape`."""
    rows, k = padded_rows(shape[0]), shape[1]
    elem = torch.empty((), dtype=dtype).element_size()
    return rows * k // 2, (k // group_size) * rows * 2 * elem


def _round_up(x32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r = x32.to(dtype)
    return torch.where(r.float() < x32, torch.nextafter(r, torch.full_like(r, float("inf"))), r)


def _scales_zeros(groups: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: zero (in `dtype`) near where code 8 falls, then the smallest scale (rounded up
    in `dtype`) with which codes 0..15 reach both the group's minimum and its maximum. Choosing
    zero first keeps every value within half a step of its code even after zero is rounded."""
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    zero = (lo + (hi - lo) * (ZERO_CODE / 15)).to(dtype)
    z = zero.float()
    need = torch.maximum((z - lo) / ZERO_CODE, (hi - z) / (15 - ZERO_CODE))
    return _round_up(need, dtype), zero


def _to_layout(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (rows, K), rows a multiple of 64 -> the CPU kernel's packed bytes (rows, K / 2)."""
    rows, k = codes.shape
    blocks = codes.view(rows // BLOCK_N, 2, BLOCK_N // 2, k).transpose(2, 3)  # (blocks, 2, K, 32)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).contiguous().view(rows, k // 2)


def _from_layout(data: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The CPU layout's bytes -> codes (rows, K) as `dtype` values."""
    rows = data.shape[0]
    packed = data.view(rows // BLOCK_N, k, BLOCK_N // 2).transpose(1, 2)  # (blocks, 32, K)
    codes = torch.empty(rows // BLOCK_N, 2, BLOCK_N // 2, k, dtype=dtype, device=data.device)
    codes[:, 0] = packed & 0xF
    codes[:, 1] = packed >> 4
    return codes.view(rows, k)


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Weight:
    """`w` (N, K) in the CPU layout, grouped along K; every value within half a step of the original.
    Large weights are quantized QUANTIZE_ROWS rows at a time (whole blocks of the layout), so the
    float32 temporaries stay small: a vocabulary table's would otherwise be several times its size."""
    n, k = w.shape
    if n > QUANTIZE_ROWS:
        parts = [quantize_int4(w[i:i + QUANTIZE_ROWS], group_size) for i in range(0, n, QUANTIZE_ROWS)]
        return Int4Weight(torch.cat([p.data for p in parts]), torch.cat([p.scales_zeros for p in parts], dim=1),
                          (n, k), group_size)
    groups = w.float().reshape(n, k // group_size, group_size)
    scale, zero = _scales_zeros(groups, w.dtype)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(groups[..., 0]))
    offsets = ((groups - zero.float()[..., None]) / safe[..., None]).round_()
    codes = (offsets + ZERO_CODE).clamp_(0, 15).to(torch.uint8).view(n, k)
    rows = padded_rows(n)
    codes = torch.cat([codes, codes.new_full((rows - n, k), ZERO_CODE)])
    pad = lambda t: torch.cat([t, t.new_zeros(rows - n, t.shape[1])])  # noqa: E731
    scales_zeros = torch.stack([pad(scale).T, pad(zero).T], dim=-1).contiguous()
    return Int4Weight(_to_layout(codes), scales_zeros, (n, k), group_size)


def dequantize_int4(w: Int4Weight) -> torch.Tensor:
    """The dense (N, K) weight in the model dtype: (code - 8) * scale + zero, as the kernel computes it."""
    if w.form != "cpu":
        raise ValueError(f"an int4 weight in {w.form} form cannot be dequantized")  # a dispatch bug
    n, k = w.shape
    values = _from_layout(w.data, k, w.dtype)
    grouped = values.view(values.shape[0], k // w.group_size, w.group_size)
    scale, zero = (w.scales_zeros[..., i].T[..., None] for i in (0, 1))
    grouped.sub_(ZERO_CODE).mul_(scale).add_(zero)
    return values[:n]


def take_rows(w: Int4Weight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of the dense weight, dequantized from the CPU layout alone, with
    `dequantize_int4`'s arithmetic (so bit for bit its rows): an embedding looked up in the
    4-bit weight its tied output head multiplies with. Result: ids.shape + (K,)."""
    if w.form != "cpu":
        raise ValueError(f"rows cannot be taken from an int4 weight in {w.form} form")  # a dispatch bug
    flat = ids.reshape(-1)
    k = w.shape[1]
    within = flat % BLOCK_N  # row b*64 + h*32 + j: byte j of block b at every k, nibble h
    packed = w.data.view(-1, k, BLOCK_N // 2)[flat // BLOCK_N, :, within % (BLOCK_N // 2)]  # (n, K)
    codes = torch.where((within >= BLOCK_N // 2)[:, None], packed >> 4, packed & 0xF).to(w.dtype)
    grouped = codes.view(len(flat), k // w.group_size, w.group_size)
    scale, zero = (w.scales_zeros[:, flat, i].T[..., None] for i in (0, 1))
    grouped.sub_(ZERO_CODE).mul_(scale).add_(zero)
    return codes.view(*ids.shape, k)


def fake_quantize_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """What a packed-int4 run sees in place of `w`."""
    return dequantize_int4(quantize_int4(w, group_size))


def weight_parts(shape, dtype: torch.dtype, config) -> tuple[int, int]:
    """Bytes of a compressed matmul weight's two store files (codes, then scales): this layout
    where the weight fits it, else `compression`'s generic one."""
    from .compression import compressed_parts
    if fits(shape, config.num_bits, config.group_size):
        return parts(shape, dtype, config.group_size)
    return compressed_parts(shape, dtype, config)


def fake_quantize_weight(w: torch.Tensor, config) -> torch.Tensor:
    """What a run with weight compression `config` sees in place of the matmul weight `w`, in
    whichever layout the store keeps it."""
    from .compression import fake_quantize
    if fits(w.shape, config.num_bits, config.group_size):
        return fake_quantize_int4(w, config.group_size)
    return fake_quantize(w, config)
