"""Tiny random mixture-of-experts checkpoints (Mixtral, Qwen2-MoE with a shared expert and a dense
layer, Qwen3-MoE, OLMoE), saved with transformers' own `save_pretrained` (one tensor per expert, as
on the hub). Norm scales and biases are randomised as in `llama_checkpoints`; router weights are
scaled up so tokens spread over the experts instead of all picking the same two."""
from __future__ import annotations

import torch
from conftest import VOCAB
from llama_checkpoints import EOS, randomise_norms_and_biases

COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=EOS, eos_token_id=EOS,
              num_experts_per_tok=2, pad_token_id=None)
VARIANTS = {  # name -> (transformers class names, config fields)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=6, head_dim=16)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                       num_experts=5, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=80, moe_intermediate_size=32, num_experts=4, norm_topk_prob=True,
                       head_dim=16)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=32, num_experts=8, norm_topk_prob=False)),
}


def make_moe_model(variant: str, seed: int = 0, layers: int = 3, **extra):
    import transformers
    config_cls, model_cls, fields = VARIANTS[variant]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(num_hidden_layers=layers, **{**COMMON, **fields, **extra})
    model = getattr(transformers, model_cls)(config).eval()
    randomise_norms_and_biases(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.mul_(20)
    model.generation_config.eos_token_id = None  # both sides run to max_new_tokens
    return model


def make_moe_checkpoint(path, variant: str, seed: int = 0, layers: int = 3, **extra):
    """Save a tiny random model of `variant` under `path`; returns the transformers model (float32)."""
    model = make_moe_model(variant, seed, layers, **extra)
    model.save_pretrained(path)
    return model
