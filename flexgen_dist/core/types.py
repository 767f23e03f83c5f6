"""Shared small types: where a tensor lives, byte units, compute dtypes by name."""
from __future__ import annotations

import functools
from enum import Enum

import torch


class Tier(str, Enum):
    """Where a tensor lives. Without a GPU, COMPUTE and HOST are both RAM but are accounted apart."""

    COMPUTE = "compute"
    HOST = "host"
    DISK = "disk"


GiB = 1 << 30


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@functools.lru_cache(maxsize=None)
def dtype_name(dtype: torch.dtype) -> str:
    """`float32` for torch.float32: the name flags, stores and reports use."""
    return str(dtype).split(".")[-1]
