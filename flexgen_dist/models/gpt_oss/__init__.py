"""The gpt-oss family: OpenAI's gpt-oss-20b and gpt-oss-120b."""
from ..base import Family
from .config import BUILTIN, MODEL_TYPES, GptOssSpec, spec_from_config
from .model import build_layers, checkpoint_keys, flops_per_token

FAMILY = Family(name="gpt_oss", spec_type=GptOssSpec, model_types=MODEL_TYPES, builtin=BUILTIN,
                spec_from_config=spec_from_config, build_layers=build_layers, checkpoint_keys=checkpoint_keys,
                flops_per_token=flops_per_token)
