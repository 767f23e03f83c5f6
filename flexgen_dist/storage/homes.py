"""A weight at its home tier, and the one way it reaches the compute device for a use."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..core.types import Tier
from ..kernels.int4 import Int4Weight, dequantize_int4
from ..kernels.linear import int4_for_device, int4_ready
from ..kernels.quantize import CompressedTensor, dequantize
from .devices import Devices, to_device


class WeightSource(Protocol):
    """Where the executor's weights come from, by store name: the converted store on disk
    (`store.TensorStore`), or tensors already in memory (the planner's measurements)."""

    def nbytes(self, name: str) -> int:
        """Bytes the weight occupies as stored (packed size when compressed)."""

    def file_bytes(self, name: str) -> int:
        """Bytes a read of the weight needs in buffers."""

    def read(self, name: str, alloc=None):
        """The weight as stored: a tensor, a CompressedTensor or an Int4Weight; read into buffers
        from `alloc(size)` when given."""


@dataclass
class WeightHome:
    """One weight tensor at its home tier: resident (plain or compressed), or read from the store
    on every use. `nbytes` is what it really occupies there (packed size when compressed)."""

    name: str
    tier: Tier
    nbytes: int
    store: WeightSource
    value: object = None  # resident tensor, CompressedTensor or Int4Weight
    int4_feed: torch.dtype | None = None  # an Int4Weight reaches the math packed, its kernel fed
    # activations of this dtype (the engine's one decision; only for linear-only weights); None: dense

    def load(self, devices: Devices, alloc=None):
        """This weight on the compute device: decompressed there if it is stored compressed, except
        an Int4Weight with an `int4_feed`, which stays packed; disk reads land in buffers from
        `alloc` when given (see ReadSlab)."""
        value = self.store.read(self.name, alloc) if self.tier is Tier.DISK else self.value
        return materialize(value, devices.compute, self.int4_feed)

    def used_as_is(self, devices: Devices) -> bool:
        """Whether `load` returns the resident value unchanged: no read, copy or decoding."""
        value, compute = self.value, devices.compute
        if self.tier is Tier.DISK or isinstance(value, CompressedTensor):
            return False
        if isinstance(value, Int4Weight):
            return self.int4_feed is not None and int4_ready(value, compute, self.int4_feed)
        return isinstance(value, torch.Tensor) and value.device == compute


def reaches_math_packed(only_linear: bool, compute_is_cpu: bool, int4_kernel: bool) -> bool:
    """Whether a weight stored in the int4 layout is handed to the math packed, where the engine
    uses an int4 kernel: one also looked up by rows (a tied embedding) only on a CPU, whose layout
    gives rows; tinygemm's GPU form does not, so there it is dequantized."""
    return int4_kernel and (only_linear or compute_is_cpu)


def materialize(value, device: torch.device, int4_feed: torch.dtype | None = None):
    """A plain tensor on `device` from a tensor, a CompressedTensor or an Int4Weight (decompressed
    on `device`); with an `int4_feed`, an Int4Weight in the form `device`'s int4 kernel reads when
    fed activations of that dtype."""
    if isinstance(value, Int4Weight):
        if int4_feed is not None:
            return int4_for_device(value, device, int4_feed)
        return dequantize_int4(value.to(device, non_blocking=value.data.is_pinned()))
    if isinstance(value, CompressedTensor):
        return dequantize(value.to(device, non_blocking=value.data.is_pinned()))
    return to_device(value, device)
