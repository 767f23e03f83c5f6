"""An explicit --dtype is honoured by every kernel: with 4-bit weights that lie on the 4-bit grid
(so compression loses nothing), --dtype float32 gives transformers' float32 tokens and logits
whatever the int4 probe measured, because the packed int4 kernel is fed float32 activations or not
used at all; only --dtype auto may feed it bf16, and the run says so.

The probe's measurement is forced to what each CPU kind finds (the kernel itself is this CPU's), so
every machine runs every outcome: the float32 feed pays but bf16 pays more (AVX-512), or only the
bf16 feed pays (AVX2 only: its float32 int4 product is 20-40x slower)."""
import json
import re

import pytest
import torch
from conftest import PROMPTS, make_checkpoint, reference_generate
from llama_checkpoints import make_llama_checkpoint
from llama_checkpoints import reference_generate as llama_reference
from test_equivalence import PLACEMENTS

from flexgen_dist import Engine, Policy
from flexgen_dist.kernels import int4, probe
from flexgen_dist.kernels.int4 import fake_quantize_weight
from flexgen_dist.run import main

NEW_TOKENS = 8
# dequantize + dense time / int4 kernel time for a decode step, per feed of a float32 model
MEASURED = {"avx512": {torch.float32: 2.0, torch.bfloat16: 6.5},
            "avx2": {torch.float32: 0.05, torch.bfloat16: 6.0}}
GRID = re.compile(r"(proj|fc1|fc2|project_in|project_out|embed_tokens|lm_head)\.weight$")
MODELS = {  # name -> (build the checkpoint, its transformers reference, extra policy)
    "opt-pre-ln": (lambda p: make_checkpoint(p, post_ln=False, seed=1), reference_generate, {}),
    "opt-350m-layout": (lambda p: make_checkpoint(p, post_ln=True, seed=2), reference_generate, {}),
    "llama-tied": (lambda p: make_llama_checkpoint(p, "llama3-tied", seed=3), llama_reference,
                   {"compress_embeddings": True}),
}


def has_cpu_kernel() -> bool:
    try:
        return int4.int4_cpu_block() is not None
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@pytest.fixture(scope="module")
def grid_models(tmp_path_factory):
    """name -> (directory of the model with its matmul and vocabulary weights on the 4-bit grid,
    transformers' float32 greedy sequences and logits on those very weights)."""
    config = Policy(compress_weight=True).weight_compression()
    out = {}
    for name, (build, reference, _) in MODELS.items():
        model = build(tmp_path_factory.mktemp(name))
        state = {k: fake_quantize_weight(v, config) if GRID.search(k) else v for k, v in model.state_dict().items()}
        clone = type(model)(model.config).eval()
        clone.load_state_dict(state)
        clone.generation_config.eos_token_id = None  # the reference runs to max_new_tokens
        path = tmp_path_factory.mktemp(name + "-grid")
        clone.save_pretrained(path)
        out[name] = (str(path), reference(clone, PROMPTS, NEW_TOKENS))
    return out


@pytest.fixture(params=list(MEASURED))
def measured(request, monkeypatch):
    """The int4 probe's timing forced to one CPU kind's; no FLEXGEN_INT4 forcing."""
    monkeypatch.delenv(probe.INT4_ENV, raising=False)
    monkeypatch.delenv(probe.BF16_ENV, raising=False)
    monkeypatch.setattr(probe, "int4_speedups", lambda dtype, feeds: [MEASURED[request.param][f] for f in feeds])
    probe.int4_choice.cache_clear()
    yield request.param
    probe.int4_choice.cache_clear()


def fed_dtypes(monkeypatch) -> list:
    """A list that gets the activation dtype of every product the packed int4 kernel computes."""
    fed, original = [], int4.int4_mm
    monkeypatch.setattr(int4, "int4_mm", lambda x, w: fed.append(w.scales_zeros.dtype) or original(x, w))
    return fed


def run(path, tmp_path, dtype: str, percent=(100, 0, 100, 0, 100, 0), **policy):
    engine = Engine.from_pretrained(path, policy=Policy.from_percent(list(percent), compress_weight=True, **policy),
                                    offload_dir=tmp_path, dtype=dtype)
    try:
        ids, logits = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
        return ids, logits, engine.kernels["compressed_linear"]
    finally:
        engine.close()


@pytest.mark.parametrize("placement", ["weights-3-tiers", "cache-disk"])
@pytest.mark.parametrize("model", list(MODELS))
def test_explicit_float32_with_grid_4bit_weights_equals_transformers(grid_models, model, placement, measured,
                                                                     tmp_path, monkeypatch):
    path, (ref_ids, ref_logits) = grid_models[model]
    fed = fed_dtypes(monkeypatch)
    options = {**PLACEMENTS[placement], **MODELS[model][2]}
    ids, logits, described = run(path, tmp_path, "float32", **options)
    for step, (mine, theirs) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(mine, theirs.float(), atol=1e-4, rtol=1e-4, msg=f"step {step}")
    assert torch.equal(ids, ref_ids)
    assert set(fed) <= {torch.float32}
    if measured == "avx512" and has_cpu_kernel():  # the float32 feed pays: packed, fed float32
        assert fed and described.startswith("packed int4 matmul") and "fed float32" in described
    else:  # only a bf16 feed would pay, which --dtype float32 does not allow
        assert not fed and described.startswith("dequantize + dense"), described


@pytest.mark.skipif(not has_cpu_kernel(), reason="no CPU int4 kernel in this PyTorch")
def test_auto_may_feed_bf16_and_says_so(grid_models, tmp_path, monkeypatch, capsys):
    """--dtype auto computing in float32 (bf16 forced slow) takes the faster bf16 feed, and the
    run's summary line and log say so; the same run asking for float32 feeds float32."""
    monkeypatch.delenv(probe.INT4_ENV, raising=False)
    monkeypatch.setenv(probe.BF16_ENV, "0")
    monkeypatch.setattr(probe, "int4_speedups", lambda dtype, feeds: [MEASURED["avx512"][f] for f in feeds])
    probe.int4_choice.cache_clear()
    fed = fed_dtypes(monkeypatch)
    path = tmp_path / "m"
    make_checkpoint(path, post_ln=True)
    log = tmp_path / "log.jsonl"
    common = ["--model", str(path), "--prompt-len", "4", "--gen-len", "2", "--gpu-batch-size", "2",
              "--percent", "100", "0", "100", "0", "100", "0", "--compress-weight", "--log-file", str(log)]
    try:
        assert main([*common, "--offload-dir", str(tmp_path / "auto")]) == 0
        auto_fed, fed[:] = set(fed), []
        assert main([*common, "--offload-dir", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    finally:
        probe.int4_choice.cache_clear()
    assert auto_fed == {torch.bfloat16} and set(fed) == {torch.float32}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compute:")]
    assert len(lines) == 2 and "dtype float32 (forced by FLEXGEN_CPU_BF16=0)" in lines[0], lines
    assert "4-bit linear layers: packed int4 matmul (6.5x faster than dequantize + dense for a decode step, " \
           "fed bfloat16 activations, which --dtype auto allows)" in lines[0]
    assert "dtype float32 (requested)" in lines[1] and "fed float32 activations as --dtype float32 asks" in lines[1]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert ["which --dtype auto allows" in r["compressed_linear"] for r in records] == [True, False]
