"""flexgen-dist: high-throughput offloaded generation, single rank or pipeline-parallel."""
from .errors import FlexGenError
from .generation import Engine, GenerationConfig, GenerationStats
from .policy import Policy, Tier

__all__ = ["Engine", "FlexGenError", "GenerationConfig", "GenerationStats", "Policy", "Tier"]
__version__ = "0.1.0"
