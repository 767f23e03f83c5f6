"""Group-wise asymmetric min/max quantization (4 or 8 bits), packed two 4-bit codes per byte.

A tensor is cut into groups of `group_size` consecutive values along `dim` (zero-padded at the
end); each group keeps its minimum and its step in the model dtype. Codes are
round((x - min) / step), so every value comes back within half a step of where it was. The min is
rounded down and the step up when cast to the model dtype, so that bound holds for the stored
values too; a group whose values are all equal has step 0 and comes back exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.compression import CompressionConfig


@dataclass
class CompressedTensor:
    """Packed codes (..., groups, group_size / codes_per_byte) uint8 and per-group min and step
    (..., groups) in the model dtype, with `dim` moved last. `shape` is the original shape."""

    data: torch.Tensor
    mins: torch.Tensor
    steps: torch.Tensor
    shape: tuple[int, ...]
    config: CompressionConfig

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.mins, self.steps))

    @property
    def dtype(self) -> torch.dtype:
        return self.mins.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device, non_blocking: bool = False) -> "CompressedTensor":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return CompressedTensor(move(self.data), move(self.mins), move(self.steps), self.shape, self.config)


def compressed_parts(shape, dtype: torch.dtype, config: CompressionConfig) -> tuple[int, int]:
    """Bytes of the packed codes and of the (min, step) pairs of a tensor of `shape`."""
    dim = config.dim % len(shape)
    groups = -(-shape[dim] // config.group_size)
    rest = torch.Size(shape).numel() // shape[dim]
    elem = torch.empty((), dtype=dtype).element_size()
    return rest * groups * config.group_size // config.codes_per_byte, rest * groups * 2 * elem


def compressed_nbytes(shape, dtype: torch.dtype, config: CompressionConfig) -> int:
    """Bytes a tensor of `shape` takes once compressed (packed codes + min and step per group)."""
    return sum(compressed_parts(shape, dtype, config))


def _round_toward(x32: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """Cast to `dtype`, stepping one ulp toward `direction` where plain rounding went the other way."""
    r = x32.to(dtype)
    wrong = (r.float() > x32) if direction < 0 else (r.float() < x32)
    return torch.where(wrong, torch.nextafter(r, torch.full_like(r, direction)), r)


def _grouped(x: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """x with `dim` moved last, zero-padded to whole groups, viewed (..., groups, group_size) in fp32."""
    moved = x.movedim(config.dim, -1).float()
    pad = (-moved.shape[-1]) % config.group_size
    if pad:
        # pad with the row's own last value so padding never widens a group's range
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    return moved.reshape(*moved.shape[:-1], -1, config.group_size)


def quantize(x: torch.Tensor, config: CompressionConfig) -> CompressedTensor:
    groups = _grouped(x, config)
    mins = _round_toward(groups.amin(dim=-1), x.dtype, float("-inf"))
    span = groups.amax(dim=-1) - mins.float()
    steps = _round_toward(span / config.levels, x.dtype, float("inf"))
    safe = torch.where(steps > 0, steps.float(), torch.ones_like(span))
    codes = ((groups - mins.float()[..., None]) / safe[..., None]).round_().clamp_(0, config.levels).to(torch.uint8)
    if config.num_bits == 4:  # even element -> high nibble, odd -> low nibble
        codes = (codes[..., 0::2] << 4) | codes[..., 1::2]
    return CompressedTensor(codes.contiguous(), mins, steps, tuple(x.shape), config)


def dequantize(c: CompressedTensor) -> torch.Tensor:
    """codes * step + min, computed in the model dtype: on the hot path of every disk-homed weight,
    one unpacking pass and two in-place passes are several times faster than a float32 round trip."""
    codes = c.data
    if c.config.num_bits == 4:
        values = torch.empty((*codes.shape[:-1], codes.shape[-1] * 2), dtype=c.dtype, device=codes.device)
        values[..., 0::2] = codes >> 4
        values[..., 1::2] = codes & 0xF
    else:
        values = codes.to(c.dtype)
    values.mul_(c.steps[..., None]).add_(c.mins[..., None])
    dim = c.config.dim % len(c.shape)
    return values.flatten(-2)[..., :c.shape[dim]].movedim(-1, dim)


def fake_quantize(x: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """quantize then dequantize: what a compressed run sees in place of x."""
    return dequantize(quantize(x, config))
