"""Hidden states between schedule layers, homed on the tier the policy names."""
from __future__ import annotations

import os

import torch

from ..core.types import Tier
from ..system.io import read_file, write_file
from .devices import Devices, nbytes, to_device


class ActivationStore:
    """Hidden states between layers, homed on one tier as the policy says."""

    def __init__(self, devices: Devices, tier: Tier, directory: str):
        self.devices, self.tier, self.directory = devices, tier, directory
        self._held: dict[int, tuple] = {}

    def put(self, k: int, x: torch.Tensor) -> None:
        self.drop(k)
        self.devices.usage[self.tier].add(nbytes(x))
        if self.tier is Tier.DISK:
            path = os.path.join(self.directory, f"act.{os.getpid()}.{k}")
            write_file(path, x.cpu())
            self._held[k] = (path, x.shape, x.dtype, nbytes(x))
        else:
            self._held[k] = (to_device(x, self.devices.device_of(self.tier)),)

    def get(self, k: int) -> torch.Tensor:
        held = self._held[k]
        if len(held) == 1:
            return to_device(held[0], self.devices.compute)
        path, shape, dtype, n = held
        return read_file(path, n).view(dtype).view(shape).to(self.devices.compute)

    def drop(self, k: int) -> None:
        held = self._held.pop(k, None)
        if held is None:
            return
        if len(held) == 1:
            self.devices.usage[self.tier].sub(nbytes(held[0]))
        else:
            path, _, _, n = held
            self.devices.usage[self.tier].sub(n)
            os.remove(path)
