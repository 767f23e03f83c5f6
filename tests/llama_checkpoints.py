"""Tiny random Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3), built in-process and saved
with transformers' own `save_pretrained`, plus transformers' float32 greedy generate as reference.

Norm scales and biases are randomised too: transformers initialises them to one and zero, which
would let a missing bias or a norm applied to the wrong tensor pass unnoticed."""
from __future__ import annotations

import torch
from conftest import VOCAB, left_padded, make_tokenizer

EOS = 2  # the fixtures' EOS, which is also the pad id the engine falls back to (no pad token)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

VARIANTS = {  # name -> (transformers class names, config overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama3-tied": ("LlamaConfig", "LlamaForCausalLM",
                    {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 48}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    # Qwen3 with YaRN long-context scaling (as Qwen's model cards configure it); a short original context
    # so the blend between interpolated and kept frequencies falls inside the tiny head
    "qwen3-yarn": ("Qwen3Config", "Qwen3ForCausalLM",
                   {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
                    "rope_theta": 10000.0}),
}


def make_config(variant: str, layers: int = 2, kv_heads: int = 2, **extra):
    import transformers
    config_cls, _, overrides = VARIANTS[variant]
    return getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
        bos_token_id=EOS, eos_token_id=EOS, **{**overrides, **extra})


def randomise_norms_and_biases(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "norm" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)


def make_llama_checkpoint(path, variant: str, seed: int = 0, layers: int = 2, kv_heads: int = 2,
                          tokenizer: bool = False, **extra):
    """Save a tiny random model of `variant` under `path`; returns the transformers model (float32)."""
    import transformers
    torch.manual_seed(seed)
    model_cls = getattr(transformers, VARIANTS[variant][1])
    model = model_cls(make_config(variant, layers, kv_heads, **extra)).eval()
    randomise_norms_and_biases(model, seed)
    model.generation_config.eos_token_id = None  # both sides run to max_new_tokens
    model.save_pretrained(path)
    if tokenizer:
        make_tokenizer().save_pretrained(path)
    return model


def reference_generate(model, prompts, max_new_tokens: int):
    """transformers' greedy generate in float32, padding with EOS as it does for a model with no
    pad token: (sequences, per-step logits)."""
    ids, mask = left_padded(prompts, pad=EOS)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=EOS, output_logits=True, return_dict_in_generate=True)
    return out.sequences, [lg.float() for lg in out.logits]
