"""gpt-oss (attention sinks, a sliding window on alternate blocks, YaRN positions, a biased router
softmaxed over its top-k, clamped SwiGLU experts with biases, all of a layer's experts in fused
checkpoint tensors, float or MXFP4): greedy tokens identical to transformers' float32 generate and
logits within atol = rtol = 1e-4 on the placement matrix, on 1 and 2 pipeline ranks, with 4-bit
weights on the grid, and scoring through packed rows; bad gpt-oss checkpoints refused in one line."""
import json
import shutil

import pytest
import torch
from conftest import PROMPTS
from gpt_oss_checkpoints import make_gpt_oss_checkpoint, make_mxfp4_checkpoint
from llama_checkpoints import reference_generate
from test_moe import (
    GRID,
    NEW_TOKENS,
    PLACEMENTS,
    SUBSET,
    _one_line_error,
    assert_matches,
    assert_only_tokens_routed,
    run_engine,
)
from test_pipeline import MPIRUN, run_pipeline_job
from test_score_shared import QUESTION_A, assert_close, greedy_continuation, requests, transformers_scores

from flexgen_dist import Engine, Policy
from flexgen_dist.kernels.int4 import fake_quantize_weight
from flexgen_dist.models import builtin_spec, family_of, flops_per_token, spec_from_dir, weight_bytes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(dir, transformers model, reference sequences and logits)."""
    path = tmp_path_factory.mktemp("gpt_oss")
    model = make_gpt_oss_checkpoint(path)
    return str(path), model, reference_generate(model, PROMPTS, NEW_TOKENS)


def test_fixture_exercises_window_sinks_and_routing(checkpoint):
    """The prompts are longer than the window, and every layer's routing spreads the prompts over
    several experts in unequal numbers (so grouping by expert is tested)."""
    from conftest import left_padded
    path, model, _ = checkpoint
    spec = spec_from_dir(path)
    assert spec.sliding_blocks == (0, 2) and spec.attention_window == 4 < max(map(len, PROMPTS))
    ids, mask = left_padded(PROMPTS, pad=2)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_logits=True)
    for logits in out.router_logits:
        counts = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=logits.shape[-1])
        assert (counts > 0).sum() >= 3 and len(set(counts.tolist())) > 1, counts


@pytest.mark.parametrize("placement", SUBSET)
def test_greedy_matches_transformers(checkpoint, placement, tmp_path):
    path, _, ref = checkpoint
    options = dict(PLACEMENTS[placement])
    assert_matches(run_engine(path, tmp_path, options.pop("percent"), **options), ref)


def test_padding_is_not_routed_to_experts(checkpoint, tmp_path, monkeypatch):
    from flexgen_dist.models.gpt_oss import model as gpt_oss_model
    path, _, ref = checkpoint
    assert_only_tokens_routed(gpt_oss_model, path, ref, tmp_path, monkeypatch)


def test_mxfp4_experts_match_transformers_dequantized(checkpoint, tmp_path):
    """A checkpoint with its experts as OpenAI released them (MXFP4 codes and scales) gives the
    tokens and logits of transformers' model with those experts dequantized by its own converter."""
    model = make_mxfp4_checkpoint(tmp_path / "mx", checkpoint[0])
    ref = reference_generate(model, PROMPTS, NEW_TOKENS)
    assert_matches(run_engine(str(tmp_path / "mx"), tmp_path / "off", gpu_batch_size=5), ref)
    assert not torch.equal(ref[0], checkpoint[2][0])  # the experts really changed


def _grid_checkpoint(path: str, out) -> str:
    """The checkpoint with every weight the engine compresses replaced by its 4-bit grid image, in
    the layout the engine stores (each expert's gate, up and down as (out, in) matrices)."""
    from safetensors.torch import load_file, save_file
    spec = spec_from_dir(path)
    shutil.copytree(path, out)
    state = load_file(f"{path}/model.safetensors")
    for w in (w for la in family_of(spec).build_layers(spec) for w in la.weights if w.compressible is True):
        if w.expert is None:
            state[f"model.{w.name}"] = fake_quantize_weight(state[f"model.{w.name}"], GRID)
            continue
        prefix, part = f"model.{w.name.split('experts.')[0]}experts.", w.key.rsplit(".", 1)[1]
        fused = state[prefix + ("down_proj" if part == "down" else "gate_up_proj")][w.expert]
        view = fused if part == "down" else fused[:, 0::2] if part == "gate" else fused[:, 1::2]
        view.copy_(fake_quantize_weight(view.t().contiguous(), GRID).t())
    save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/model.safetensors", metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize("placement", ["all-compute", "weights-3-tiers", "experts-disk"])
def test_compressed_weights_match_the_grid_checkpoint(checkpoint, placement, tmp_path, int4_mode):
    """Weights already on the 4-bit grid are stored losslessly: a compressed run gives the tokens
    and logits of an uncompressed run of them; and differs from the original model (the guard)."""
    path, _, ref = checkpoint
    grid = _grid_checkpoint(path, tmp_path / "grid")
    plain = run_engine(grid, tmp_path / "a", gpu_batch_size=5)
    options = dict(PLACEMENTS[placement])
    options["compress_weight"] = True
    assert_matches(run_engine(grid, tmp_path / "b", options.pop("percent"), **options), plain)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(plain[1], ref[1]))


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")
@pytest.mark.timeout(600)
def test_two_ranks_match_transformers(checkpoint, tmp_path):
    path, _, ref = checkpoint
    runs = [{"percent": [100, 0, 100, 0, 100, 0], "policy": {"gpu_batch_size": 2}},
            {"percent": [0, 50, 0, 50, 0, 100], "policy": {"gpu_batch_size": 1, "num_gpu_batches": 2}}]
    for got in run_pipeline_job(path, runs, 2, tmp_path, NEW_TOKENS):
        assert torch.equal(torch.tensor(got), ref[0])


@pytest.mark.parametrize("share", [True, False])
def test_scores_match_transformers_through_the_window(checkpoint, tmp_path, share):
    """Log-likelihoods of requests far longer than the window, packed (a shared context, its
    continuations at their own positions) or one row each, equal transformers' log-softmax."""
    path, model, _ = checkpoint
    reqs = requests(greedy_continuation(model, QUESTION_A))
    with Engine.from_pretrained(path, Policy(gpu_batch_size=2, num_gpu_batches=2), offload_dir=str(tmp_path),
                                dtype="float32") as engine:
        got = engine.score(reqs, pack=share)
    assert_close(got, transformers_scores(model, reqs))


def _edited(checkpoint, tmp_path, config_edit=None, drop=None) -> str:
    path = shutil.copytree(checkpoint[0], tmp_path / "m")
    if config_edit:
        config = json.loads((path / "config.json").read_text())
        config_edit(config)
        (path / "config.json").write_text(json.dumps(config))
    if drop:
        from safetensors.torch import load_file, save_file
        state = load_file(f"{path}/model.safetensors")
        del state[drop]
        save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    return str(path)


def test_missing_fused_expert_tensor_is_one_line_error(checkpoint, tmp_path):
    missing = "model.layers.1.mlp.experts.down_proj_bias"
    _one_line_error(_edited(checkpoint, tmp_path, drop=missing), tmp_path, missing)


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     "layer_types 'chunked_attention'"),
    (lambda c: c.update(quantization_config={"quant_method": "bitsandbytes"}), "pre-quantized checkpoints (bitsandbytes)"),
    (lambda c: c.update(num_experts_per_tok=9), "9 experts per token of 6")])
def test_unsupported_variant_is_one_line_error(checkpoint, tmp_path, edit, needle):
    _one_line_error(_edited(checkpoint, tmp_path, config_edit=edit), tmp_path, needle)


def test_builtin_gpt_oss_shapes():
    """Parameter counts of gpt-oss-20b and -120b as OpenAI gives them (20.91 B and 116.83 B), and
    the active ones (3.61 B and 5.13 B: the output head counted, the embedding lookup not) from the
    FLOPs of one token."""
    for name, total, active in (("gpt-oss-20b", 20.91e9, 3.61e9), ("gpt-oss-120b", 116.83e9, 5.13e9)):
        spec = builtin_spec(name)
        assert weight_bytes(spec, 1) == pytest.approx(total, rel=0.01), name
        blocks, head = flops_per_token(spec, 0)
        assert (blocks + head) / 2 == pytest.approx(active, rel=0.01), name
    spec = builtin_spec("gpt-oss-20b")
    assert spec.window_of(0) == 128 and spec.window_of(1) is None and len(spec.sliding_blocks) == 12
