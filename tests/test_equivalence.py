"""Greedy output equals transformers' float32 generate, token for token, for every placement."""
import pytest
import torch
from conftest import PROMPTS, reference_generate
from flexgen_dist import Engine, Policy

NEW_TOKENS = 12

PLACEMENTS = {
    "all-compute": dict(percent=[100, 0, 100, 0, 100, 0], gpu_batch_size=5),
    "weights-disk": dict(percent=[0, 0, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2),
    "weights-3-tiers": dict(percent=[30, 30, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=3),
    "cache-host": dict(percent=[100, 0, 0, 100, 100, 0], gpu_batch_size=3, num_gpu_batches=2),
    "cache-disk": dict(percent=[100, 0, 0, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2),
    "cache-3-tiers": dict(percent=[100, 0, 40, 30, 100, 0], gpu_batch_size=4, num_gpu_batches=2),
    "act-host": dict(percent=[50, 50, 100, 0, 0, 100], gpu_batch_size=2, num_gpu_batches=2),
    "act-disk": dict(percent=[100, 0, 100, 0, 0, 0], gpu_batch_size=1, num_gpu_batches=4),
    "all-disk-no-overlap": dict(percent=[0, 0, 0, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2, overlap=False),
    "mixed-no-overlap": dict(percent=[20, 50, 50, 25, 100, 0], gpu_batch_size=3, num_gpu_batches=1, overlap=False),
    "merged-layers": dict(percent=[0, 50, 0, 50, 100, 0], gpu_batch_size=2, num_gpu_batches=2, sep_layer=False),
}


@pytest.fixture(scope="module")
def reference(opt_checkpoint):
    path, model = opt_checkpoint
    return reference_generate(model, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_greedy_matches_transformers(opt_checkpoint, reference, placement, tmp_path):
    path, _ = opt_checkpoint
    options = dict(PLACEMENTS[placement])
    policy = Policy.from_percent(options.pop("percent"), **options)
    engine = Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, dtype="float32")
    try:
        ids, logits = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
    finally:
        engine.close()
    ref_ids, ref_logits = reference
    assert torch.equal(ids, ref_ids)
    assert len(logits) == NEW_TOKENS
    for step, (mine, theirs) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(mine, theirs.float(), atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_tensor_input_with_attention_mask(opt_checkpoint, reference, tmp_path):
    from conftest import left_padded
    path, _ = opt_checkpoint
    ids, mask = left_padded(PROMPTS)
    engine = Engine.from_pretrained(path, policy=Policy(gpu_batch_size=8), offload_dir=tmp_path, dtype="float32")
    try:
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    finally:
        engine.close()
    assert torch.equal(out, reference[0])


@pytest.mark.parametrize("placement, handed_off", [("all-compute", False), ("cache-disk", True),
                                                   ("weights-disk", True)])
def test_only_loads_that_move_data_go_to_io_threads(opt_checkpoint, reference, placement, handed_off, tmp_path):
    """Weights resident on the compute device and a KV cache that lives there are used in place:
    a step hands nothing to the I/O threads for them (a hand-off per layer cost more than the
    load at batch 1), while a cache or weights elsewhere still load in the background."""
    path, _ = opt_checkpoint
    options = dict(PLACEMENTS[placement])
    policy = Policy.from_percent(options.pop("percent"), **options)
    engine = Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, dtype="float32")
    jobs = []
    submit = engine.executor.io.submit
    engine.executor.io.submit = lambda fn, *args: jobs.append(fn.__name__) or submit(fn, *args)
    try:
        ids = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    finally:
        engine.close()
    assert torch.equal(ids, reference[0])
    assert bool(jobs) == handed_off, jobs
