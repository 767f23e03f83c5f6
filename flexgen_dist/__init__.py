"""flexgen-dist: high-throughput offloaded generation, single rank or pipeline-parallel.

The package is built in floors, each importing only floors below it (README, "Architecture"):
cli > engine | planning > runtime > storage > models | dist | formats > kernels | system > core."""
import os

# oneDNN keeps up to 1024 matmul primitives by default, each holding about 0.5 MB: a mixture of
# experts multiplies each expert over its own number of tokens, so it fills the cache with 0.3-0.5
# GiB that no memory budget counts. A smaller cache costs nothing measurable there (each expert's
# product is one call per step; benchmark/RESULTS.md). Read when oneDNN makes its first primitive,
# so it applies where this package is imported before any bf16 matmul ran; a value set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")

from .core.config import EngineConfig, GenerationConfig
from .core.errors import FlexGenError
from .core.policy import Policy
from .core.types import Tier
from .engine.engine import Engine
from .planning.plan import auto_policy
from .runtime.stats import GenerationStats

__all__ = ["Engine", "EngineConfig", "FlexGenError", "GenerationConfig", "GenerationStats", "Policy", "Tier",
           "auto_policy"]
__version__ = "0.1.0"
