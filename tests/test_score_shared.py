"""A context shared by several scoring requests (the choices of one question) computed once: each
request's log-likelihood and greedy flag equal the unshared path's and transformers' own float32
log-softmax (|Δ| ≤ 1e-3) on tiny Llama and OPT checkpoints, in memory, with weights and KV cache on
disk, with grid-exact 4-bit weights and at 2 ranks; the shared context's tokens go through the
model once; the packing rule as plain data."""
import json

import pytest
import torch
from conftest import make_checkpoint
from llama_checkpoints import make_llama_checkpoint
from test_compressed_equivalence import fake_quantize_checkpoint
from test_pipeline import MPIRUN, mpirun

from flexgen_dist import Engine, Policy
from flexgen_dist.engine.packing import SHARED_MIN, combined, fill, model_rows
from flexgen_dist.models.base import score_positions, token_scores

QUESTION_A = [2] + list(range(20, 44))  # 25 tokens: shared by its choices (at least SHARED_MIN)
QUESTION_B = [2] + list(range(150, 170))


def requests(greedy: list[int]) -> list[tuple[list[int], list[int]]]:
    """Two questions of several choices (one of them the model's greedy continuation), a lone
    request and a question too short to share."""
    return [(QUESTION_A, [50, 51]), (QUESTION_A, [60]), (QUESTION_A, greedy), (QUESTION_A, [70, 71, 72, 73]),
            (QUESTION_B, [5, 6, 7]), (QUESTION_B, [8]),
            ([2, 9, 10], [11, 12]), ([2, 9, 10], [13]),
            ([2] + list(range(200, 230)), [231, 232])]


@pytest.fixture(scope="module", params=["llama", "opt"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_llama_checkpoint(path, "llama") if request.param == "llama" else make_checkpoint(path, post_ln=False)
    return str(path), model


def greedy_continuation(model, context: list[int], n: int = 3) -> list[int]:
    ids = torch.tensor([context])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=2)
    return out[0, len(context):].tolist()


def transformers_scores(model, reqs) -> list[tuple[float, bool]]:
    out = []
    for context, continuation in reqs:
        with torch.no_grad():
            logp = model(torch.tensor([context + continuation[:-1]])).logits.float().log_softmax(-1)
        logp, target = logp[0, -len(continuation):], torch.tensor(continuation)
        out.append((logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
    return out


def assert_close(got, ref) -> None:
    assert len(got) == len(ref)
    for (a, ga), (b, gb) in zip(got, ref):
        assert abs(a - b) <= 1e-3, (a, b)
        assert ga == gb
    assert any(g for _, g in ref), "no greedy continuation among the requests: the flags show nothing"


def scored(path, tmp_path, reqs, percent, share: bool, **policy):
    with Engine.from_pretrained(path, Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2, **policy),
                                offload_dir=str(tmp_path / ("shared" if share else "alone")), dtype="float32") as engine:
        return engine.score(reqs, pack=share)


@pytest.mark.parametrize("percent", [[100, 0, 100, 0, 100, 0], [0, 0, 0, 0, 100, 0]], ids=["memory", "disk"])
def test_shared_context_equals_unshared_and_transformers(checkpoint, percent, tmp_path):
    path, model = checkpoint
    reqs = requests(greedy_continuation(model, QUESTION_A))
    ref = transformers_scores(model, reqs)
    assert_close(scored(path, tmp_path, reqs, percent, share=True), ref)
    assert_close(scored(path, tmp_path, reqs, percent, share=False), ref)


def test_shared_context_with_grid_exact_4bit_weights(checkpoint, tmp_path):
    model = checkpoint[1]
    quantized = fake_quantize_checkpoint(checkpoint, tmp_path / "gridq", tables=False)
    clone = type(model).from_pretrained(quantized).eval()
    reqs = requests(greedy_continuation(clone, QUESTION_A))
    got = scored(quantized, tmp_path, reqs, [100, 0, 100, 0, 100, 0], share=True, compress_weight=True)
    assert_close(got, transformers_scores(clone, reqs))


def test_shared_context_goes_through_the_model_once(checkpoint, tmp_path):
    """Four choices of one context in one micro-batch: shared, the embedding sees the context once
    and each choice's own tokens (one row); alone, four padded rows of context + choice."""
    path, model = checkpoint
    choices = [[50], [60, 61], [70, 71, 72], [80, 81, 82, 83]]
    reqs = [(QUESTION_A, c) for c in choices]
    counts = {}
    for share in (True, False):
        with Engine.from_pretrained(path, Policy(gpu_batch_size=4, num_gpu_batches=1), offload_dir=str(tmp_path),
                                    dtype="float32") as engine:
            embed = engine.executor.layers[0]
            forward, seen = embed.forward, []
            embed.forward = lambda w, ids, inputs, _f=forward, _s=seen: _s.append(ids.numel()) or _f(w, ids, inputs)
            got = engine.score(reqs, pack=share)
            counts[share] = sum(seen)
        assert_close_values(got, transformers_scores(model, reqs))
    assert counts[True] == len(QUESTION_A) - 1 + sum(map(len, choices))
    assert counts[False] == len(choices) * (len(QUESTION_A) - 1 + max(map(len, choices)))


def assert_close_values(got, ref) -> None:
    for (a, ga), (b, gb) in zip(got, ref, strict=True):
        assert abs(a - b) <= 1e-3 and ga == gb


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")
def test_shared_context_at_two_ranks(checkpoint, tmp_path):
    path, model = checkpoint
    reqs = requests(greedy_continuation(model, QUESTION_A))
    job = {"model": path, "offload": str(tmp_path / "off"), "output": str(tmp_path / "out.json"), "score": reqs,
           "runs": [{"percent": [100, 0, 100, 0, 100, 0], "policy": {"gpu_batch_size": 2, "num_gpu_batches": 2}},
                    {"percent": [0, 0, 0, 0, 100, 0], "policy": {"gpu_batch_size": 2, "num_gpu_batches": 1}}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = mpirun(2, ["tests/pipeline_job.py", tmp_path / "job.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = transformers_scores(model, reqs)
    for got in json.loads((tmp_path / "out.json").read_text()):
        assert_close([tuple(r) for r in got], ref)


def test_packing_rule():
    shared = [2] + list(range(10, 10 + SHARED_MIN))
    rows = [(shared + [5], [5, 6]), (shared + [7, 8], [7, 8, 9]), ([2, 3], [4]), ([2, 3], [5]),
            (shared + [9] * 3, [9] * 4)]
    units = model_rows(rows, limit=64)
    assert sorted([i for i, _ in members] for _, members in units) == [[0, 1, 4], [2], [3]]
    row, members = next(unit for unit in units if len(unit[1]) == 3)
    assert members == [(0, 0), (1, 2), (4, 5)]  # where each request's targets start in the row's
    last = shared[-1]  # each choice's segment starts at the context's last token, which predicts its first
    assert row.tokens == shared[:-1] + [last, 5] + [last, 7, 8] + [last, 9, 9, 9]
    assert row.targets == [5, 6, 7, 8, 9] + [9] * 4
    assert row.positions == list(range(SHARED_MIN)) + [16, 17, 16, 17, 18, 16, 17, 18, 19]
    assert row.segments == [0] * SHARED_MIN + [1, 1, 2, 2, 2, 3, 3, 3, 3]
    # a row never grows past `limit` tokens: the context is repeated in a second row
    split = model_rows(rows, limit=len(shared) + 5)
    assert sorted([i for i, _ in members] for _, members in split) == [[0, 1], [2], [3], [4]]
    assert all(len(members) == 1 for _, members in model_rows(rows, limit=64, share=False))
    # many continuations: a row grows to `cheap` tokens or twice its first request's width, not to `limit`
    many = [(shared + [t], [t, t]) for t in range(40)]  # 18 input tokens each: 16 shared, 2 scored
    assert [len(m) for _, m in model_rows(many, limit=1000, cheap=30)] == [10] * 4  # 16 + 10 * 2 <= 36
    assert [len(m) for _, m in model_rows(many, limit=1000, cheap=60)] == [22, 18]  # 16 + 22 * 2 <= 60


def test_output_head_makes_logits_only_for_positions_with_a_target():
    torch.manual_seed(0)
    h, table = torch.randn(3, 7, 8), torch.randn(11, 8)
    targets = torch.full((3, 7), -1)
    targets[0, 5:], targets[2, 1], targets[2, 6] = torch.tensor([3, 4]), 9, 10
    seen = []

    def logits_of(x):
        seen.append(x.shape[:-1].numel())
        return x @ table.T
    got = score_positions(h, targets, logits_of, vocab=11)
    assert sum(seen) == 4
    assert torch.equal(got[targets < 0], torch.zeros_like(got[targets < 0]))
    full = token_scores(h @ table.T, targets)
    assert torch.allclose(got, full, atol=1e-6)


def test_fill_puts_short_rows_side_by_side():
    units = model_rows([([2] * 10, [3, 4]), ([5] * 6, [6]), ([7] * 3, [8, 9]), ([1] * 12, [1])], limit=64)
    rows = fill(units, width=12)  # best fit, longest first: [12], [10], [6 + 3]
    assert sorted(len(row.tokens) for row, _ in rows) == [9, 10, 12]
    row, members = next(unit for unit in rows if len(unit[1]) == 2)
    assert row.tokens == [5] * 6 + [7] * 3
    assert row.positions == list(range(6)) + list(range(3))  # each as it would be alone
    assert row.segments == row.context == [0] * 6 + [1] * 3  # each sees only itself
    assert row.targets == [6, -1, 8, 9]  # the last 4 positions: 5 predicts 6, 6 nothing, 7 and 8 predict 8, 9
    assert members == [(1, 0), (2, 2)]
    assert fill(units, width=5) == [units[3], units[0], units[1], units[2]]  # too wide to share: alone
    assert combined([units[0]]) == units[0]
