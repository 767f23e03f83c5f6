"""The KV cache of one (layer, batch): whole sequences split over tiers by the policy.

The math appends to a compute-side buffer shaped (b, heads, capacity, head_dim). When the whole
cache lives uncompressed in memory the math can use directly, that buffer *is* the home and nothing
moves. Otherwise `load` stages the rows so far into a fresh buffer and `store` writes the new
tokens back to each segment's home:

- a *direct* home (uncompressed, in memory) has the buffer's own layout;
- a *record* home (on disk, or compressed anywhere) holds one record per token: the keys (or
  values) of all the segment's sequences at that position, raw or 4-bit packed. A decode step
  appends one record and a load reads one contiguous prefix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core.compression import CompressionConfig
from ..core.types import Tier
from ..kernels.quantize import CompressedTensor, dequantize, quantize
from ..system.io import pread_all
from .devices import Devices, nbytes


def record_config(compression: CompressionConfig | None, head_dim: int) -> CompressionConfig | None:
    """The cache's grouping: along head_dim, never wider than one head."""
    if compression is None:
        return None
    return CompressionConfig(compression.num_bits, min(compression.group_size, head_dim), dim=-1)


def record_parts(rows: int, heads: int, head_dim: int, dtype: torch.dtype,
                 compression: CompressionConfig | None) -> list[int]:
    """Bytes of one token's keys (or values) of `rows` sequences as the cache keeps them: raw, or
    codes then a min and a step per group. Every count of cache bytes (the budget, the cost model,
    the cache itself) is this one."""
    config = record_config(compression, head_dim)
    if config is None:
        return [rows * heads * head_dim * dtype.itemsize]
    groups = -(-head_dim // config.group_size)
    return [rows * heads * groups * config.group_size // config.codes_per_byte,
            rows * heads * groups * dtype.itemsize, rows * heads * groups * dtype.itemsize]


def kv_token_bytes(rows: int, heads: int, head_dim: int, dtype: torch.dtype,
                   compression: CompressionConfig | None) -> int:
    """Bytes of one token's keys and values of `rows` sequences in the cache."""
    return 2 * sum(record_parts(rows, heads, head_dim, dtype, compression))


class RecordCodec:
    """Token records for `rows` sequences: (t, rows, heads, head_dim) <-> (t, record_bytes) uint8."""

    def __init__(self, rows: int, heads: int, head_dim: int, dtype: torch.dtype,
                 compression: CompressionConfig | None):
        self.shape, self.dtype = (rows, heads, head_dim), dtype
        self.config = record_config(compression, head_dim)
        self.parts = record_parts(rows, heads, head_dim, dtype, compression)
        self.record_bytes = sum(self.parts)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        if self.config is None:
            return x.contiguous().view(torch.uint8).reshape(t, -1)
        c = quantize(x, self.config)
        return torch.cat([c.data.reshape(t, -1), c.mins.reshape(t, -1).view(torch.uint8),
                          c.steps.reshape(t, -1).view(torch.uint8)], dim=1)

    def decode(self, records: torch.Tensor) -> torch.Tensor:
        t = records.shape[0]
        if self.config is None:
            return records.view(self.dtype).view(t, *self.shape)
        data, mins, steps = records.split(self.parts, dim=1)
        rows, heads, _ = self.shape
        as_groups = lambda b: b.contiguous().view(self.dtype).view(t, rows, heads, -1)  # noqa: E731
        data = data.reshape(t, rows, heads, -1, self.config.group_size // self.config.codes_per_byte)
        return dequantize(CompressedTensor(data, as_groups(mins), as_groups(steps), (t, *self.shape), self.config))


@dataclass
class Segment:
    tier: Tier
    rows: slice
    k: torch.Tensor | None = None  # direct: (rows, heads, cap, head_dim); records: (cap, record_bytes)
    v: torch.Tensor | None = None
    paths: tuple[str, str] | None = None  # records on disk
    codec: RecordCodec | None = None  # set for record homes

    @property
    def direct(self) -> bool:
        return self.codec is None


class KVCache:
    def __init__(self, devices: Devices, segments: list[tuple[Tier, int, int]], heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, disk_prefix: str, compression: CompressionConfig | None = None):
        self.devices, self.heads, self.head_dim, self.capacity, self.dtype = devices, heads, head_dim, capacity, dtype
        self.compression = compression
        self.rows = segments[-1][2]
        self.segments = [self._allocate(t, a, b, f"{disk_prefix}.{i}") for i, (t, a, b) in enumerate(segments)]
        self._staged = 0

    def _allocate(self, tier: Tier, a: int, b: int, prefix: str) -> Segment:
        rows = slice(a, b)
        if tier is not Tier.DISK and self.compression is None:
            shape = (b - a, self.heads, self.capacity, self.head_dim)
            device = self.devices.device_of(tier)
            # never zeroed: only rows already written are ever read
            k, v = (torch.empty(shape, dtype=self.dtype, device=device) for _ in range(2))
            self.devices.usage[tier].add(2 * nbytes(k))
            return Segment(tier, rows, k, v)
        codec = RecordCodec(b - a, self.heads, self.head_dim, self.dtype, self.compression)
        size = self.capacity * codec.record_bytes
        self.devices.usage[tier].add(2 * size)
        if tier is Tier.DISK:
            paths = (f"{prefix}.k", f"{prefix}.v")
            for p in paths:
                with open(p, "wb") as f:
                    f.truncate(size)
            return Segment(tier, rows, paths=paths, codec=codec)
        device = self.devices.device_of(tier)
        k, v = (torch.empty((self.capacity, codec.record_bytes), dtype=torch.uint8, device=device) for _ in range(2))
        return Segment(tier, rows, k, v, codec=codec)

    @property
    def in_place(self) -> bool:
        only = self.segments[0]
        return len(self.segments) == 1 and only.direct and only.k.device == self.devices.compute

    def load(self, start: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute-side (k, v) buffers holding tokens [0, start) and room for `new` more."""
        if self.in_place:
            return self.segments[0].k, self.segments[0].v
        shape = (self.rows, self.heads, start + new, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.devices.compute)
        v = torch.empty_like(k)
        self._staged = 2 * nbytes(k)
        self.devices.usage[Tier.COMPUTE].add(self._staged)
        if start:
            for seg in self.segments:
                for i, buf in enumerate((k, v)):
                    buf[seg.rows, :, :start] = self._read(seg, i, start)
        return k, v

    def _read(self, seg: Segment, i: int, tokens: int) -> torch.Tensor:
        """Tokens [0, tokens) of segment `seg`'s keys (i=0) or values (i=1), laid out like the buffer."""
        compute = self.devices.compute
        if seg.direct:
            return (seg.k, seg.v)[i][:, :, :tokens]
        if seg.paths is not None:
            records = torch.empty((tokens, seg.codec.record_bytes), dtype=torch.uint8)
            fd = os.open(seg.paths[i], os.O_RDONLY)
            try:
                pread_all(fd, records.view(-1), 0, seg.paths[i])
            finally:
                os.close(fd)
        else:
            records = (seg.k, seg.v)[i][:tokens]
        return seg.codec.decode(records.to(compute)).permute(1, 2, 0, 3)

    def store(self, kv: tuple[torch.Tensor, torch.Tensor], start: int, end: int) -> None:
        """Write tokens [start, end) of the compute-side buffers back to their homes."""
        if self.in_place:
            return
        for seg in self.segments:
            for i, buf in enumerate(kv):
                new = buf[seg.rows, :, start:end]
                if seg.direct:
                    (seg.k, seg.v)[i][:, :, start:end].copy_(new)
                    continue
                records = seg.codec.encode(new.permute(2, 0, 1, 3))
                if seg.paths is None:
                    (seg.k, seg.v)[i][start:end].copy_(records)
                else:
                    self._write(seg.paths[i], start * seg.codec.record_bytes, records)
        self.devices.usage[Tier.COMPUTE].sub(self._staged)
        self._staged = 0

    @staticmethod
    def _write(path: str, offset: int, records: torch.Tensor) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, memoryview(records.cpu().reshape(-1).numpy()), offset)
        finally:
            os.close(fd)

    def free(self) -> None:
        for seg in self.segments:
            held = 2 * nbytes(seg.k) if seg.k is not None else 2 * self.capacity * seg.codec.record_bytes
            self.devices.usage[seg.tier].sub(held)
            for p in seg.paths or ():
                os.remove(p)
        self.segments = []
