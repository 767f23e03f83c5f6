"""flexgen-dist: high-throughput offloaded generation, single rank or pipeline-parallel.

The package is built in floors, each importing only floors below it (README, "Architecture"):
cli > engine | planning > runtime > storage > models | dist | formats > kernels | system > core."""
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
