"""What compression a policy asks for, and which weights it applies to."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import FlexGenError


@dataclass(frozen=True)
class CompressionConfig:
    num_bits: int = 4
    group_size: int = 64
    dim: int = 0  # the dimension cut into groups: weights use 0 (FlexGen), the KV cache its head_dim
    tables: bool = True  # weights: the vocabulary tables (embeddings, output head) are compressed too

    def __post_init__(self):
        if self.num_bits not in (4, 8):
            raise FlexGenError(f"compression bits must be 4 or 8, got {self.num_bits}")
        if self.group_size < 2 or self.group_size % 2:
            raise FlexGenError(f"compression group size must be an even number >= 2, got {self.group_size}")

    @property
    def levels(self) -> int:
        return (1 << self.num_bits) - 1

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.num_bits


def compresses(config: CompressionConfig | None, compressible) -> bool:
    """Whether a weight whose spec says `compressible` (False, True, or TABLE: an embedding or
    output head over the vocabulary) is stored compressed under `config`."""
    return config is not None and bool(compressible) and (compressible != TABLE or config.tables)


TABLE = "table"  # `WeightSpec.compressible` of a vocabulary table (embedding, output head): compressed only on request
