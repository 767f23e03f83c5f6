"""Tiny random gpt-oss checkpoints, saved with transformers' own `save_pretrained` (all of a layer's
experts in fused tensors, as on the hub), and their MXFP4 form (the experts as OpenAI released
them: 4-bit codes and power-of-two scales per 32 values). The window is shorter than the test
prompts so the sliding blocks really drop keys, the SwiGLU limit low enough that its clamps act; norms, biases and sinks are randomised; router
weights are scaled up so tokens spread over the experts."""
from __future__ import annotations

import json

import torch
from conftest import VOCAB
from llama_checkpoints import EOS, randomise_norms_and_biases

CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=6, num_experts_per_tok=2, sliding_window=4,
              max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=None,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              swiglu_limit=0.1,  # low enough that the experts' clamps act on these small activations
              rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                               "rope_theta": 10000.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False})


def make_gpt_oss_model(seed: int = 0, **extra):
    import transformers
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**{**CONFIG, **extra})).eval()
    randomise_norms_and_biases(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("router.weight"):
                p.mul_(20)
            elif name.endswith("embed_tokens.weight"):
                p.mul_(10)  # tokens differ by more than the randomised biases every token shares
    model.generation_config.eos_token_id = None  # both sides run to max_new_tokens
    return model


def make_gpt_oss_checkpoint(path, seed: int = 0, **extra):
    """Save a tiny random gpt-oss under `path`; returns the transformers model (float32)."""
    model = make_gpt_oss_model(seed, **extra)
    model.save_pretrained(path)
    return model


def make_mxfp4_checkpoint(path, model_path, seed: int = 0):
    """`model_path`'s checkpoint with every layer's experts replaced by random MXFP4 codes and
    scales (the hub's `_blocks`/`_scales` tensors and its quantization_config); returns the
    transformers model with those experts dequantized by transformers' own converter."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    shutil.copytree(model_path, path)
    state = load_file(f"{path}/model.safetensors")
    model = make_gpt_oss_model(seed)
    g = torch.Generator().manual_seed(seed + 7)
    params = dict(model.named_parameters())
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, rows, cols = state[key].shape  # (E, in, out): MXFP4 holds (E, out, in / 32, 16)
        blocks = torch.randint(0, 256, (experts, cols, rows // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(120, 127, (experts, cols, rows // 32), generator=g, dtype=torch.uint8)
        del state[key]
        state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
        with torch.no_grad():
            params[key].copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (path / "config.json").write_text(json.dumps(config))
    return model
