"""flexgen-dist: high-throughput offloaded generation, single rank or pipeline-parallel."""
from .config import EngineConfig, GenerationConfig
from .errors import FlexGenError
from .generation import Engine, GenerationStats
from .policy import Policy, Tier

__all__ = ["Engine", "EngineConfig", "FlexGenError", "GenerationConfig", "GenerationStats", "Policy", "Tier"]
__version__ = "0.1.0"
