"""The mixture-of-experts family: Mixtral, Qwen2-MoE (Qwen1.5-MoE), Qwen3-MoE, OLMoE."""
from ..base import Family
from .config import BUILTIN, MODEL_TYPES, MoeSpec, spec_from_config
from .model import build_layers, checkpoint_keys, flops_per_token

FAMILY = Family(name="moe", spec_type=MoeSpec, model_types=MODEL_TYPES, builtin=BUILTIN,
                spec_from_config=spec_from_config, build_layers=build_layers, checkpoint_keys=checkpoint_keys,
                flops_per_token=flops_per_token)
