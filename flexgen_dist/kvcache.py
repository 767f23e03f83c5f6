"""The KV cache of one (layer, batch): whole sequences split over tiers by the policy.

The math appends to a compute-side buffer shaped (b, heads, capacity, head_dim). When the whole
cache lives in memory the math can use directly, that buffer *is* the home and nothing moves.
Otherwise `load` stages the rows so far into a fresh buffer and `store` writes the new rows back.
Disk segments are files laid out (capacity, rows, heads, head_dim), so a decode step appends one
contiguous record and a load reads one contiguous prefix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .memory import Devices, nbytes, pread_all
from .policy import Tier


@dataclass
class Segment:
    tier: Tier
    rows: slice
    k: torch.Tensor | None = None  # resident homes: (rows, heads, capacity, head_dim)
    v: torch.Tensor | None = None
    paths: tuple[str, str] | None = None  # disk homes


class KVCache:
    def __init__(self, devices: Devices, segments: list[tuple[Tier, int, int]], heads: int,
                 head_dim: int, capacity: int, dtype: torch.dtype, disk_prefix: str):
        self.devices, self.heads, self.head_dim, self.capacity, self.dtype = devices, heads, head_dim, capacity, dtype
        self.rows = segments[-1][2]
        self.row_bytes = heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.segments = [self._allocate(t, a, b, f"{disk_prefix}.{i}") for i, (t, a, b) in enumerate(segments)]
        self._staged = 0

    def _allocate(self, tier: Tier, a: int, b: int, prefix: str) -> Segment:
        size = (b - a) * self.capacity * self.row_bytes * 2
        self.devices.usage[tier].add(size)
        if tier is Tier.DISK:
            paths = (f"{prefix}.k", f"{prefix}.v")
            for p in paths:
                with open(p, "wb") as f:
                    f.truncate(size // 2)
            return Segment(tier, slice(a, b), paths=paths)
        shape = (b - a, self.heads, self.capacity, self.head_dim)
        device = self.devices.device_of(tier)
        # never zeroed: only rows already written are ever read
        return Segment(tier, slice(a, b), torch.empty(shape, dtype=self.dtype, device=device),
                       torch.empty(shape, dtype=self.dtype, device=device))

    @property
    def in_place(self) -> bool:
        only = self.segments[0]
        return len(self.segments) == 1 and only.k is not None and only.k.device == self.devices.compute

    def load(self, start: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute-side (k, v) buffers holding rows [0, start) and room for `new` more tokens."""
        if self.in_place:
            return self.segments[0].k, self.segments[0].v
        shape = (self.rows, self.heads, start + new, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.devices.compute)
        v = torch.empty_like(k)
        self._staged = 2 * nbytes(k)
        self.devices.usage[Tier.COMPUTE].add(self._staged)
        for seg in self.segments:
            for buf, home, path in zip((k, v), (seg.k, seg.v), seg.paths or (None, None)):
                if path is not None:
                    buf[seg.rows, :, :start] = self._read(path, start, seg).permute(1, 2, 0, 3)
                else:
                    buf[seg.rows, :, :start] = home[:, :, :start]
        return k, v

    def store(self, kv: tuple[torch.Tensor, torch.Tensor], start: int, end: int) -> None:
        """Write tokens [start, end) of the compute-side buffers back to their homes."""
        if self.in_place:
            return
        for seg in self.segments:
            for buf, home, path in zip(kv, (seg.k, seg.v), seg.paths or (None, None)):
                new = buf[seg.rows, :, start:end]
                if path is not None:
                    self._write(path, start, new.permute(2, 0, 1, 3).contiguous())
                else:
                    home[:, :, start:end].copy_(new)
        self.devices.usage[Tier.COMPUTE].sub(self._staged)
        self._staged = 0

    def _read(self, path: str, tokens: int, seg: Segment) -> torch.Tensor:
        n = seg.rows.stop - seg.rows.start
        out = torch.empty((tokens, n, self.heads, self.head_dim), dtype=self.dtype)
        fd = os.open(path, os.O_RDONLY)
        try:
            pread_all(fd, out.view(torch.uint8).reshape(-1), 0, path)
        finally:
            os.close(fd)
        return out.to(self.devices.compute)

    def _write(self, path: str, start: int, records: torch.Tensor) -> None:
        offset = start * records.shape[1] * self.row_bytes
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, memoryview(records.cpu().view(torch.uint8).reshape(-1).numpy()), offset)
        finally:
            os.close(fd)

    def free(self) -> None:
        for seg in self.segments:
            self.devices.usage[seg.tier].sub((seg.rows.stop - seg.rows.start) * self.capacity * self.row_bytes * 2)
            for p in seg.paths or ():
                os.remove(p)
        self.segments = []
