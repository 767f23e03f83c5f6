"""The Llama family: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM, TinyLlama."""
from ..base import Family
from .config import BUILTIN, MODEL_TYPES, LlamaSpec, spec_from_config
from .model import build_layers, checkpoint_keys, flops_per_token

FAMILY = Family(name="llama", spec_type=LlamaSpec, model_types=MODEL_TYPES, builtin=BUILTIN,
                spec_from_config=spec_from_config, build_layers=build_layers, checkpoint_keys=checkpoint_keys,
                flops_per_token=flops_per_token)
