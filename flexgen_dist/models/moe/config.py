"""Mixture-of-experts specs: Hugging Face configs of model_type mixtral / qwen2_moe / qwen3_moe /
olmoe, and the built-in shapes of the models people offload (for `--dummy-weights`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import ModelError, eos_ids
from ..llama.config import LlamaSpec, refuse_unsupported, rope_fields, sliding_window_of

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ROUTER_SCORING = ("softmax",)


@dataclass(frozen=True, kw_only=True)
class MoeSpec(LlamaSpec):
    """Llama's attention with a routed-experts MLP. `ffn_dim` is the width of the dense MLP layers
    (Qwen2/3-MoE's `mlp_only_layers` and layers off `decoder_sparse_step`), `moe_ffn_dim` each
    expert's; `shared_ffn_dim` Qwen2-MoE's shared expert (0: none)."""

    family: str = "moe"
    model_type: str = "mixtral"
    num_experts: int = 8
    experts_per_tok: int = 2
    moe_ffn_dim: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k probabilities to sum to one
    shared_ffn_dim: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse(self, block: int) -> bool:
        """Whether block `block`'s MLP is routed experts (else a dense MLP of `ffn_dim`)."""
        return block not in self.mlp_only_layers and (block + 1) % self.decoder_sparse_step == 0

    @property
    def sparse_blocks(self) -> int:
        return sum(self.is_sparse(i) for i in range(self.num_layers))

    @property
    def expert_names(self) -> tuple[str, str, str, str]:
        """(MLP prefix, gate, up, down) names of expert weights in the checkpoint."""
        if self.model_type == "mixtral":
            return "block_sparse_moe", "w1", "w3", "w2"
        return "mlp", "gate_proj", "up_proj", "down_proj"


def _refuse_moe_variants(config: dict, name: str) -> None:
    scoring = config.get("scoring_func", "softmax")
    if scoring not in ROUTER_SCORING:
        raise ModelError(f"{name}: router scoring function {scoring!r} is not supported (supported: softmax)")
    for field in ("topk_method", "router_type"):
        if config.get(field) not in (None, "greedy", "softmax"):
            raise ModelError(f"{name}: router {field} {config[field]!r} is not supported (supported: softmax top-k)")
    if config.get("clip_qkv") is not None:
        raise ModelError(f"{name}: clipped q/k/v (clip_qkv) is not supported")
    refuse_bad_top_k(config.get("num_local_experts", config.get("num_experts")), config.get("num_experts_per_tok"), name)


def refuse_bad_top_k(experts: int | None, k: int | None, name: str) -> None:
    """ModelError unless each token takes between 1 and all of the experts."""
    if not experts or not 1 <= (k or 0) <= experts:
        raise ModelError(f"{name}: {k} experts per token of {experts} is not a mixture of experts this engine runs")


def _family_fields(config: dict) -> dict:
    """The fields in which mixtral, qwen2_moe, qwen3_moe and olmoe differ."""
    kind, bias = config["model_type"], bool(config.get("attention_bias", False))
    experts = config.get("num_local_experts") or config["num_experts"]  # transformers 5 may write either
    if kind == "mixtral":
        return dict(num_experts=experts, moe_ffn_dim=config["intermediate_size"])
    if kind == "olmoe":
        return dict(num_experts=experts, moe_ffn_dim=config["intermediate_size"], qkv_bias=bias,
                    o_bias=bias, qk_norm_whole=True, norm_topk_prob=bool(config.get("norm_topk_prob", False)))
    qwen = dict(num_experts=experts, moe_ffn_dim=config["moe_intermediate_size"],
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                decoder_sparse_step=config.get("decoder_sparse_step", 1),
                mlp_only_layers=tuple(config.get("mlp_only_layers") or ()))
    if kind == "qwen2_moe":
        return dict(qwen, qkv_bias=config.get("qkv_bias", True), shared_ffn_dim=config["shared_expert_intermediate_size"])
    return dict(qwen, qkv_bias=bias, o_bias=bias, qk_norm=True)


def spec_from_config(config: dict, name: str) -> MoeSpec:
    """A Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE `config.json` -> MoeSpec (ModelError on what it cannot run)."""
    refuse_unsupported(config, name)
    _refuse_moe_variants(config, name)
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    window, positions = sliding_window_of(config), config["max_position_embeddings"]
    eos = eos_ids(config.get("eos_token_id"))
    return MoeSpec(
        name=name, model_type=config["model_type"], vocab_size=config["vocab_size"], hidden_size=hidden,
        ffn_dim=config["intermediate_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads, head_size=config.get("head_dim") or hidden // heads,
        max_positions=min(positions, window or positions), pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"), eos_token_id=eos[0] if eos else None, eos_token_ids=eos,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        sliding_window=window, config_max_positions=positions if window else 0,
        experts_per_tok=config["num_experts_per_tok"], **_family_fields(config), **rope_fields(config, name))


def to_hf_config(spec: MoeSpec) -> dict:
    """A Hugging Face `config.json` dict for `spec` (what `spec_from_config` reads back)."""
    config = {"model_type": spec.model_type, "architectures": [ARCHITECTURES[spec.model_type]],
              "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "intermediate_size": spec.ffn_dim,
              "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
              "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim, "hidden_act": "silu",
              "max_position_embeddings": spec.config_max_positions or spec.max_positions,
              "rms_norm_eps": spec.rms_norm_eps, "rope_theta": spec.rope_theta,
              "tie_word_embeddings": spec.tie_word_embeddings, "num_experts_per_tok": spec.experts_per_tok,
              "norm_topk_prob": spec.norm_topk_prob, "attention_bias": spec.o_bias, "qkv_bias": spec.qkv_bias,
              "bos_token_id": spec.bos_token_id, "pad_token_id": spec.pad_token_id,
              "eos_token_id": list(spec.eos_token_ids) if len(spec.eos_token_ids) > 1 else spec.eos_token_id}
    if spec.model_type == "mixtral":
        return {**config, "num_local_experts": spec.num_experts, "sliding_window": spec.sliding_window}
    config["num_experts"] = spec.num_experts
    if spec.model_type.startswith("qwen"):
        config.update(moe_intermediate_size=spec.moe_ffn_dim, decoder_sparse_step=spec.decoder_sparse_step,
                      mlp_only_layers=list(spec.mlp_only_layers), use_sliding_window=False)
    if spec.model_type == "qwen2_moe":
        config["shared_expert_intermediate_size"] = spec.shared_ffn_dim
    return config


ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
QWEN = dict(vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151643,
            eos_token_ids=(151643,))
QWEN3 = dict(QWEN, model_type="qwen3_moe", max_positions=40960, qk_norm=True, num_experts=128, experts_per_tok=8,
             eos_token_id=151645, eos_token_ids=(151645,))


def _moe(name: str, hidden: int, ffn: int, layers: int, heads: int, kv: int, head_dim: int = 0, **extra) -> MoeSpec:
    return MoeSpec(name=name, hidden_size=hidden, ffn_dim=ffn, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                   head_size=head_dim or hidden // heads, **{"moe_ffn_dim": ffn, **extra})


BUILTIN = [
    _moe("mixtral-8x7b", 4096, 14336, 32, 32, 8, vocab_size=32000, max_positions=32768, rope_theta=1e6,
         bos_token_id=1, eos_token_id=2, eos_token_ids=(2,)),
    _moe("mixtral-8x22b", 6144, 16384, 56, 48, 8, vocab_size=32768, max_positions=65536, rope_theta=1e6,
         bos_token_id=1, eos_token_id=2, eos_token_ids=(2,)),
    _moe("qwen1.5-moe-a2.7b", 2048, 5632, 24, 16, 16, model_type="qwen2_moe", max_positions=8192, qkv_bias=True,
         num_experts=60, experts_per_tok=4, moe_ffn_dim=1408, shared_ffn_dim=5632, norm_topk_prob=False, **QWEN),
    _moe("qwen3-30b-a3b", 2048, 6144, 48, 32, 4, 128, moe_ffn_dim=768, **QWEN3),
    _moe("qwen3-235b-a22b", 4096, 12288, 94, 64, 4, 128, moe_ffn_dim=1536, **QWEN3),
    _moe("olmoe-1b-7b", 2048, 1024, 16, 16, 16, model_type="olmoe", vocab_size=50304, max_positions=4096,
         num_experts=64, experts_per_tok=8, norm_topk_prob=False, qk_norm_whole=True, rms_norm_eps=1e-5,
         pad_token_id=1, eos_token_id=50279, eos_token_ids=(50279,)),
]
