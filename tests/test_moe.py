"""Mixture-of-experts families (Mixtral, Qwen2-MoE with a shared expert and a dense layer,
Qwen3-MoE, OLMoE): greedy tokens identical to transformers' float32 generate and logits within
atol = rtol = 1e-4 on the placement matrix, on 1 and 2 pipeline ranks, and with 4-bit weights on
the grid; bad MoE checkpoints refused in one line."""
import json
import shutil

import pytest
import torch
from conftest import PROMPTS, run_cli
from flexgen_dist import Engine, Policy
from flexgen_dist.core.errors import FlexGenError
from flexgen_dist.kernels.int4 import fake_quantize_weight
from flexgen_dist.models import builtin_spec, family_of, flops_per_token, spec_from_dir, weight_bytes
from llama_checkpoints import reference_generate
from moe_checkpoints import VARIANTS, make_moe_checkpoint
from test_equivalence import PLACEMENTS
from test_pipeline import MPIRUN, run_pipeline_job

NEW_TOKENS = 8
SUBSET = ["all-compute", "weights-3-tiers", "cache-disk", "act-disk", "merged-layers", "all-disk-no-overlap"]
# every placement for Qwen2-MoE (shared expert, a dense layer among sparse ones); a cross-section for the others
CASES = [("qwen2_moe", p) for p in PLACEMENTS] + [(v, p) for v in VARIANTS if v != "qwen2_moe" for p in SUBSET]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (dir, transformers model, reference sequences and logits)."""
    out = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        model = make_moe_checkpoint(path, variant, seed=len(out))
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


def test_prompts_spread_over_experts(checkpoints):
    """The fixtures exercise routing: in every sparse layer the prompts use several experts, in
    unequal numbers of tokens (so grouping by expert is tested, not a single shared path)."""
    from conftest import left_padded
    for variant, (_, model, _) in checkpoints.items():
        ids, mask = left_padded(PROMPTS, pad=2)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_router_logits=True)
        for logits in out.router_logits:
            counts = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=logits.shape[-1])
            assert (counts > 0).sum() >= 3 and len(set(counts.tolist())) > 1, (variant, counts)


def test_specs_read_each_feature(checkpoints):
    specs = {v: spec_from_dir(checkpoints[v][0]) for v in VARIANTS}
    assert all(s.family == "moe" and s.experts_per_tok == 2 and s.num_experts >= 4 for s in specs.values())
    assert specs["mixtral"].num_experts == 6 and specs["olmoe"].num_experts == 8
    assert specs["qwen2_moe"].shared_ffn_dim == 40 and specs["qwen2_moe"].qkv_bias
    assert [specs["qwen2_moe"].is_sparse(i) for i in range(3)] == [True, False, True]
    assert specs["qwen3_moe"].qk_norm and specs["qwen3_moe"].norm_topk_prob and not specs["qwen2_moe"].norm_topk_prob
    assert specs["olmoe"].qk_norm_whole and not specs["olmoe"].qk_norm
    layers = family_of(specs["qwen2_moe"]).build_layers(specs["qwen2_moe"])
    assert [la.name for la in layers if la.name.startswith(("moe", "mlp"))] == ["moe.0", "mlp.1", "moe.2"]
    experts = {w.expert for la in layers for w in la.weights if w.expert is not None}
    assert experts == set(range(5))


GRID = Policy(compress_weight=True).weight_compression()


def _grid_checkpoint(path: str, out) -> str:
    """The checkpoint with every weight the engine compresses replaced by its 4-bit grid image."""
    from safetensors.torch import load_file, save_file
    spec = spec_from_dir(path)
    family = family_of(spec)
    compressed = {f"model.{w.name}" for la in family.build_layers(spec) for w in la.weights if w.compressible is True}
    shutil.copytree(path, out)
    state = load_file(f"{path}/model.safetensors")
    assert compressed <= set(state) and any(".experts." in k for k in compressed)
    save_file({k: fake_quantize_weight(v, GRID).contiguous() if k in compressed else v for k, v in state.items()},
              f"{out}/model.safetensors", metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("placement", ["all-compute", "weights-3-tiers"])
def test_compressed_weights_match_the_grid_checkpoint(checkpoints, variant, placement, tmp_path, int4_mode):
    """Weights already on the 4-bit grid are stored losslessly: a compressed run gives the tokens
    and logits of an uncompressed run of them (experts multiplied packed or dequantized); and
    differs from the original model (the guard)."""
    path, _, ref = checkpoints[variant]
    grid = _grid_checkpoint(path, tmp_path / "grid")
    plain = run_engine(grid, tmp_path / "a", gpu_batch_size=5)
    options = dict(PLACEMENTS[placement])
    packed = run_engine(grid, tmp_path / "b", options.pop("percent"), compress_weight=True, **options)
    assert_matches(packed, plain)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(plain[1], ref[1]))


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("ranks", [1, 2])
def test_pipeline_ranks_match_transformers(checkpoints, ranks, tmp_path):
    runs = [{"percent": [100, 0, 100, 0, 100, 0], "policy": {"gpu_batch_size": 2}},
            {"percent": [0, 50, 0, 50, 0, 100], "policy": {"gpu_batch_size": 1, "num_gpu_batches": 2}}]
    for variant in ("qwen2_moe", "mixtral"):
        path, _, ref = checkpoints[variant]
        (tmp_path / variant).mkdir()
        for got in run_pipeline_job(path, runs, ranks, tmp_path / variant, NEW_TOKENS):
            assert torch.equal(torch.tensor(got), ref[0]), variant


def _one_line_error(path, tmp_path, *needles):
    code, _, stderr = run_cli("--model", path, "--prompt-len", 4, "--num-prompts", 1, "--gen-len", 2,
                              "--offload-dir", tmp_path / "off")
    assert code == 2, stderr
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error: "), stderr
    for needle in needles:
        assert needle in stderr, stderr


def test_missing_expert_tensor_is_one_line_error(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    path = shutil.copytree(checkpoints["mixtral"][0], tmp_path / "m")
    state = load_file(f"{path}/model.safetensors")
    missing = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    del state[missing]
    save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    _one_line_error(path, tmp_path, missing)


@pytest.mark.parametrize("field,value,needle", [("scoring_func", "sigmoid", "router scoring function 'sigmoid'"),
                                                ("topk_method", "noaux_tc", "router topk_method 'noaux_tc'"),
                                                ("clip_qkv", 8.0, "clip_qkv")])
def test_unsupported_router_or_variant_is_one_line_error(checkpoints, tmp_path, field, value, needle):
    path = shutil.copytree(checkpoints["olmoe"][0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, field: value}))
    _one_line_error(path, tmp_path, needle)
    with pytest.raises(FlexGenError, match=needle.split("'")[0]):
        spec_from_dir(str(path))


def test_builtin_moe_shapes():
    """Parameter counts of the built-in shapes, and FLOPs of the active weights only."""
    expected = {"mixtral-8x7b": 46.7e9, "mixtral-8x22b": 140.6e9, "qwen1.5-moe-a2.7b": 14.3e9,
                "qwen3-30b-a3b": 30.5e9, "qwen3-235b-a22b": 235.1e9, "olmoe-1b-7b": 6.92e9}
    for name, params in expected.items():
        spec = builtin_spec(name)
        assert weight_bytes(spec, 1) == pytest.approx(params, rel=0.01), name
    spec = builtin_spec("qwen3-30b-a3b")
    blocks, head = flops_per_token(spec, 0)
    embedding = spec.vocab_size * spec.hidden_size  # looked up, not multiplied; counted in the 3.3 B
    assert (blocks + head) / 2 + embedding == pytest.approx(3.3e9, rel=0.03)  # "A3B": 3.3 B active parameters
