"""The Llama family (Llama with and without llama3 rope scaling, tied and untied; Mistral; Qwen2
with q/k/v biases; Qwen3 with q/k norm): greedy tokens identical to transformers' float32 generate
and logits within atol = rtol = 1e-4, on the OPT placement matrix, with lossless-grid compression,
and on 1-4 pipeline ranks; the GQA KV cache holds kv_heads/heads of MHA's bytes on every tier."""
import json
import math
import re

import pytest
import torch
from conftest import PROMPTS, run_cli
from flexgen_dist import Engine, Policy
from flexgen_dist.core.errors import FlexGenError
from flexgen_dist.core.types import Tier
from flexgen_dist.kernels.int4 import fake_quantize_weight
from flexgen_dist.models import (
    builtin_spec,
    family_of,
    flops_per_token,
    spec_from_dir,
    weight_bytes,
)
from flexgen_dist.models.base import stage_costs
from flexgen_dist.models.checkpoint import DummySource
from flexgen_dist.runtime.stages import partition_stages
from llama_checkpoints import EOS, VARIANTS, make_llama_checkpoint, reference_generate
from test_equivalence import PLACEMENTS
from test_pipeline import MPIRUN, run_pipeline_job

NEW_TOKENS = 8
# every placement for Llama; a cross-section of tiers, overlap and merged layers for the others
SUBSET = ["all-compute", "weights-3-tiers", "cache-disk", "act-disk", "merged-layers"]
CASES = [("llama3-rope", p) for p in PLACEMENTS] + [(v, p) for v in VARIANTS if v != "llama3-rope" for p in SUBSET]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (dir, transformers model, reference sequences and logits)."""
    out = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        model = make_llama_checkpoint(path, variant, seed=len(out))
        out[variant] = (str(path), model, reference_generate(model, PROMPTS, NEW_TOKENS))
    return out


def run_engine(path, tmp_path, percent=(100, 0, 100, 0, 100, 0), prompts=PROMPTS, **policy):
    engine = Engine.from_pretrained(path, policy=Policy.from_percent(list(percent), **policy),
                                    offload_dir=tmp_path, dtype="float32")
    try:
        return engine.generate(prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    finally:
        engine.close()


def assert_matches(run, ref):
    ids, logits = run
    assert torch.equal(ids, ref[0])
    assert len(logits) == NEW_TOKENS
    for step, (mine, theirs) in enumerate(zip(logits, ref[1])):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("variant,placement", CASES)
def test_greedy_matches_transformers(checkpoints, variant, placement, tmp_path):
    path, _, ref = checkpoints[variant]
    options = dict(PLACEMENTS[placement])
    assert_matches(run_engine(path, tmp_path, options.pop("percent"), **options), ref)


@pytest.mark.parametrize("variant", ["llama3-tied", "qwen3"])
def test_bfloat16_runs_close_to_float32(checkpoints, variant, tmp_path):
    """bf16 (the CPU default, with weights prepacked for oneDNN where supported) is not bit-exact."""
    path, _, ref = checkpoints[variant]
    engine = Engine.from_pretrained(path, policy=Policy(gpu_batch_size=5), offload_dir=tmp_path, dtype="bfloat16")
    try:
        _, logits = engine.generate(PROMPTS, max_new_tokens=1, return_logits=True)
    finally:
        engine.close()
    torch.testing.assert_close(logits[0], ref[1][0], atol=0.1, rtol=0.05)


def test_specs_read_each_feature(checkpoints):
    specs = {v: spec_from_dir(checkpoints[v][0]) for v in VARIANTS}
    assert all(s.family == "llama" and s.kv_heads == 2 and s.num_heads == 4 and s.head_dim == 16 for s in specs.values())
    assert specs["llama"].rope_type == "default" and specs["llama3-rope"].rope_type == "llama3"
    assert specs["llama3-tied"].tie_word_embeddings and not specs["llama"].tie_word_embeddings
    assert specs["qwen2"].qkv_bias and not specs["qwen2"].o_bias and not specs["llama"].qkv_bias
    assert specs["qwen3"].qk_norm and not specs["qwen2"].qk_norm
    yarn = specs["qwen3-yarn"]
    assert yarn.rope_type == "yarn" and yarn.rope_factor == 4.0 and yarn.rope_original_max_positions == 16
    assert yarn.rope_attention_factor == pytest.approx(0.1 * math.log(4.0) + 1)
    assert specs["mistral"].sliding_window == 48 and specs["mistral"].max_positions == 48
    assert all(s.pad_token_id is None and s.pad_id == EOS for s in specs.values())


COMPRESSED = re.compile(r"(proj|embed_tokens|lm_head)\.weight$")


@pytest.mark.parametrize("variant", ["llama3-tied", "qwen2", "qwen3"])
@pytest.mark.parametrize("placement", ["all-compute", "weights-3-tiers", "cache-disk"])
def test_compressed_weights_match_the_fake_quantized_checkpoint(checkpoints, variant, placement, tmp_path,
                                                                 int4_mode):
    """Weights already on the 4-bit grid are stored losslessly: a compressed run of them gives the
    tokens and logits of an uncompressed run, multiplied packed or dequantized; and differs from
    the original model (the guard)."""
    _, model, ref = checkpoints[variant]
    config = Policy(compress_weight=True).weight_compression()
    state = {k: fake_quantize_weight(v, config) if COMPRESSED.search(k) else v
             for k, v in model.state_dict().items()}
    clone = type(model)(model.config).eval()
    clone.load_state_dict(state)
    clone.save_pretrained(tmp_path / "fakeq")
    plain = run_engine(str(tmp_path / "fakeq"), tmp_path / "a", gpu_batch_size=5)
    options = dict(PLACEMENTS[placement])
    packed = run_engine(str(tmp_path / "fakeq"), tmp_path / "b", options.pop("percent"), compress_weight=True, **options)
    assert_matches(packed, plain)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(plain[1], ref[1]))


def _cache_bytes(path, tmp_path, percent, compress_cache):
    """Bytes per tier that one block's KV caches take, measured from the tier accounting."""
    policy = Policy.from_percent(percent, gpu_batch_size=4, num_gpu_batches=2, compress_cache=compress_cache)
    engine = Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, dtype="float32")
    try:
        before = {t: engine.devices.usage[t].current for t in Tier}
        caches = engine.executor.allocate_caches([4, 4], 40)
        held = {t: engine.devices.usage[t].current - before[t] for t in Tier}
        engine.executor.free_caches(caches)
        assert all(engine.devices.usage[t].current == before[t] for t in Tier)
        return held
    finally:
        engine.close()


@pytest.mark.parametrize("compress_cache", [False, True])
def test_gqa_cache_takes_kv_heads_over_heads_of_mha_bytes_on_every_tier(tmp_path, compress_cache):
    make_llama_checkpoint(tmp_path / "gqa", "llama", kv_heads=1)
    make_llama_checkpoint(tmp_path / "mha", "llama", kv_heads=4)
    percent = [0, 0, 50, 25, 100, 0]  # cache split over compute, host and disk
    gqa = _cache_bytes(str(tmp_path / "gqa"), tmp_path / "o1", percent, compress_cache)
    mha = _cache_bytes(str(tmp_path / "mha"), tmp_path / "o2", percent, compress_cache)
    for tier in Tier:
        assert gqa[tier] > 0 and gqa[tier] * 4 == mha[tier], (tier, gqa, mha)


def test_decode_attention_does_not_repeat_keys_or_values(monkeypatch):
    """Grouped decode attention equals attention over repeated K/V, without ever building them."""
    from flexgen_dist.kernels import attention
    b, kv, group, t, d = 3, 2, 4, 9, 16
    q, k, v = torch.randn(b, kv * group, 1, d), torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    bias = torch.zeros(b, 1, 1, t)
    bias[0, ..., :3] = torch.finfo(torch.float32).min
    expected = torch.softmax(q @ k.repeat_interleave(group, 1).transpose(-1, -2) + bias, -1) @ v.repeat_interleave(group, 1)
    for name in ("repeat_interleave", "repeat", "expand", "tile"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **kw: pytest.fail("K/V repeated"))
    torch.testing.assert_close(attention.attend(q, k, v, bias), expected)


def test_sliding_window_refuses_longer_sequences(checkpoints, tmp_path):
    path, _, _ = checkpoints["mistral"]
    with pytest.raises(FlexGenError, match="48"):
        run_engine(path, tmp_path, prompts=[list(range(3, 45))])


def test_unknown_rope_type_is_one_line_error(tmp_path):
    make_llama_checkpoint(tmp_path / "m", "llama", tokenizer=True)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    code, _, stderr = run_cli("--model", tmp_path / "m", "--prompt-len", 4, "--num-prompts", 1, "--gen-len", 2,
                                   "--offload-dir", tmp_path / "off")
    assert code == 2, stderr
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error: ") and "rope type 'longrope'" in stderr, stderr


def test_builtin_llama_shapes_and_dummy_init():
    spec = builtin_spec("meta-llama/Llama-3.1-8B")
    assert (spec.num_layers, spec.kv_heads, spec.head_dim, spec.rope_type) == (32, 8, 128, "llama3")
    assert 8.0e9 < weight_bytes(spec, 1) < 8.1e9  # 8.03 B parameters
    source = DummySource(builtin_spec("smollm2-135m"))
    assert 134e6 < weight_bytes(source.spec, 1) < 135e6  # tied: the embedding counted once
    assert torch.equal(source.get("layers.0.input_layernorm.weight", (576,), torch.float32), torch.ones(576))
    assert torch.equal(source.get("norm.weight", (576,), torch.float32), torch.ones(576))
    assert source.get("layers.0.mlp.up_proj.weight", (1536, 576), torch.float32).std().item() == pytest.approx(0.02, rel=0.05)
    blocks, _ = flops_per_token(spec, 0)
    assert blocks == pytest.approx(2 * (weight_bytes(spec, 1) - 2 * 128256 * 4096 - 4096 * 65), rel=1e-3)


def test_builtin_specs_round_trip_through_hf_configs():
    """Every built-in Llama-family shape, written as a config.json, reads back as the same spec
    (what lets benchmarks hand transformers the very model the engine runs)."""
    from flexgen_dist.models import BUILTIN
    from flexgen_dist.models.llama.config import spec_from_config, to_hf_config
    llamas = [s for s in BUILTIN.values() if s.family == "llama"]
    assert {"llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "qwen2.5-7b", "qwen2.5-72b", "mistral-7b",
            "smollm2-135m"} <= {s.name for s in llamas}
    for spec in llamas:
        assert spec_from_config(json.loads(json.dumps(to_hf_config(spec))), spec.name) == spec


def _stage_max(sizes, blocks, embed, head):
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    costs = [sum(blocks[a:b]) for a, b in zip(bounds, bounds[1:])]
    costs[0] += embed
    costs[-1] += head
    return max(costs)


def test_stage_partition_counts_each_family_s_own_layers():
    """Stages balance bytes with the family's embedding and head on the end ranks: SmolLM2's tied
    49152 x 576 table outweighs three blocks, so its end stages take fewer blocks."""
    for name in ("llama-3.1-8b", "smollm2-135m", "qwen2.5-7b", "opt-1.3b"):
        spec = builtin_spec(name)
        blocks, embed, head = stage_costs(family_of(spec).build_layers(spec, sep_layer=False), spec.num_layers)
        assert len(blocks) == spec.num_layers and len(set(blocks)) == 1 and embed > 0 and head > 0
        sizes = partition_stages(blocks, embed, head, 4)
        even = [spec.num_layers // 4 + (i < spec.num_layers % 4) for i in range(4)]
        assert sum(sizes) == spec.num_layers
        assert _stage_max(sizes, blocks, embed, head) <= _stage_max(even, blocks, embed, head)
        if name == "smollm2-135m":
            assert embed > 3 * blocks[0] and sizes[0] < sizes[1] and sizes[3] < sizes[2], sizes


PIPELINE_RUNS = [
    {"percent": [100, 0, 100, 0, 100, 0], "policy": {"gpu_batch_size": 2}},
    {"percent": [0, 50, 0, 50, 0, 100], "policy": {"gpu_batch_size": 1, "num_gpu_batches": 2}, "uneven": True},
    {"percent": [30, 30, 50, 0, 100, 0], "policy": {"gpu_batch_size": 2, "compress_weight": True,
                                                   "compress_cache": True}},
]
UNEVEN = {1: None, 2: [1, 3], 3: [2, 1, 1], 4: [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """Tied (both end stages hold the embedding), GQA, llama3 rope: four blocks for four ranks."""
    path = tmp_path_factory.mktemp("llama-4")
    model = make_llama_checkpoint(path, "llama3-tied", seed=7, layers=4)
    return str(path), model


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_pipeline_ranks_match_single_rank_and_transformers(four_layers, ranks, tmp_path):
    path, model = four_layers
    expected, _ = reference_generate(model, PROMPTS, NEW_TOKENS)
    runs = [{**{k: v for k, v in run.items() if k != "uneven"},
             **({"stage_layers": UNEVEN[ranks]} if run.get("uneven") and ranks > 1 else {})} for run in PIPELINE_RUNS]
    results = run_pipeline_job(path, runs, ranks, tmp_path, NEW_TOKENS)
    for run, got in zip(runs, results):
        if run["policy"].get("compress_weight"):
            single = run_engine(path, tmp_path / "single", run["percent"], **run["policy"])[0]
            assert torch.equal(torch.tensor(got), single), run
        else:
            assert torch.equal(torch.tensor(got), expected), run
