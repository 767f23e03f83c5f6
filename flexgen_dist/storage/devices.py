"""Tiers and their devices: the compute device, host memory and disk, what each holds now and at
peak, and the one copy path between them."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ..core.types import Tier


@dataclass
class Usage:
    """Bytes held on one tier now, and the most ever held."""

    current: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def sub(self, nbytes: int) -> None:
        with self.lock:
            self.current -= nbytes


@dataclass
class Devices:
    """The torch devices behind the tiers, and what each tier holds."""

    compute: torch.device
    host: torch.device = torch.device("cpu")
    pin_host: bool = False
    usage: dict[Tier, Usage] = field(default_factory=lambda: {t: Usage() for t in Tier})

    @classmethod
    def detect(cls, pin_weight: bool = True) -> "Devices":
        if torch.cuda.is_available():
            return cls(torch.device("cuda", torch.cuda.current_device()), pin_host=pin_weight)
        return cls(torch.device("cpu"))

    @property
    def host_is_compute(self) -> bool:
        """True on a CPU-only machine: host tensors are usable by the math without a copy."""
        return self.compute == self.host

    def device_of(self, tier: Tier) -> torch.device:
        return self.compute if tier is Tier.COMPUTE else self.host


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def to_device(t: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """The one copy path between tiers (non-blocking from pinned memory on a GPU)."""
    if t.device == device:
        return t
    if device.type == "cpu" and pin:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t)
        return out
    return t.to(device, non_blocking=t.is_pinned())
