"""The OPT family (OPT-125m ... OPT-175b, OPT-IML)."""
from ..base import Family
from .config import BUILTIN, MODEL_TYPES, OPTSpec, spec_from_config
from .model import build_layers, checkpoint_keys, flops_per_token

FAMILY = Family(name="opt", spec_type=OPTSpec, model_types=MODEL_TYPES, builtin=BUILTIN,
                spec_from_config=spec_from_config, build_layers=build_layers, checkpoint_keys=checkpoint_keys,
                flops_per_token=flops_per_token)
