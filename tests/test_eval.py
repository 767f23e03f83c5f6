"""Evaluation through lm-evaluation-harness: the `flexgen` backend gives lm-eval's `hf` backend's
per-request results in float32 on the same weights (log-likelihoods within 1e-3, the same greedy
flags, the same generated text after stop strings) for a multiple-choice task, rolling perplexity
over documents longer than the model's context, and generation with stop strings: in memory, with
weights and KV cache on disk, with grid-exact 4-bit weights, with the planner choosing the policy,
and at 2 ranks. Engine.score itself is checked against transformers' own log-softmax."""
import glob
import json
import os

import pytest
import torch
from conftest import make_checkpoint, make_tokenizer
from eval_tasks import TASKS, evaluate, responses, write_tasks
from llama_checkpoints import make_llama_checkpoint
from test_compressed_equivalence import fake_quantize_checkpoint
from test_pipeline import MPIRUN, mpirun

from flexgen_dist import Engine, Policy
from flexgen_dist.core.errors import FlexGenError
from flexgen_dist.engine.scoring import rolling_windows

pytest.importorskip("lm_eval")

IN_MEMORY = "100:0:100:0:100:0"
ON_DISK = "0:0:0:0:100:0"  # weights and KV cache on disk


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module", params=["llama", "opt"])
def checkpoint(request, tmp_path_factory):
    """(directory with a tokenizer, transformers model) of a tiny random Llama or OPT."""
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        model = make_llama_checkpoint(path, "llama", tokenizer=True)
    else:
        model = make_checkpoint(path, post_ln=False)
    return str(path), model


def hf_responses(path, task_dir):
    return evaluate("hf", {"pretrained": path, "dtype": "float32", "device": "cpu"}, task_dir)


@pytest.fixture(scope="module")
def reference(checkpoint, task_dir):
    return hf_responses(checkpoint[0], task_dir)


def assert_same(got: dict, ref: dict) -> None:
    """Per task and document: log-likelihoods within 1e-3, greedy flags and texts equal."""
    assert set(got) == set(ref) == set(TASKS)
    for task in TASKS:
        assert len(got[task]) == len(ref[task])
        for doc_got, doc_ref in zip(got[task], ref[task]):
            for a, b in zip(doc_got, doc_ref, strict=True):
                a, b = a[0], b[0]  # one response per request
                if task == "fg_gen":
                    assert a == b
                    continue
                a, b = (a, b) if task == "fg_mc" else ((a, None), (b, None))
                assert abs(a[0] - b[0]) <= 1e-3, (task, a, b)
                assert a[1] == b[1]
    assert any(r[0][0] for r in ref["fg_gen"]), "every generation came back empty: the test shows nothing"


def flexgen(path, tmp_path, percent=IN_MEMORY, **extra):
    return {"pretrained": path, "dtype": "float32", "percent": percent, "offload_dir": str(tmp_path), **extra}


@pytest.mark.parametrize("percent", [IN_MEMORY, ON_DISK], ids=["memory", "disk"])
def test_backend_equals_hf(checkpoint, task_dir, reference, percent, tmp_path):
    assert_same(evaluate("flexgen", flexgen(checkpoint[0], tmp_path, percent), task_dir), reference)


def test_backend_equals_hf_with_grid_exact_4bit_weights(checkpoint, task_dir, tmp_path_factory, tmp_path):
    """4-bit weights whose values lie on the quantization grid: the compressed engine computes
    with exactly the checkpoint's weights, so it must agree with hf on that checkpoint."""
    path = fake_quantize_checkpoint(checkpoint, tmp_path_factory.mktemp("gridq"), tables=False)
    make_tokenizer().save_pretrained(path)
    got = evaluate("flexgen", flexgen(path, tmp_path, compress_weight=True), task_dir)
    assert_same(got, hf_responses(path, task_dir))


def test_planned_scoring_policy_runs(checkpoint, task_dir, reference, tmp_path, monkeypatch):
    """Without a policy the planner plans for the scoring workload (prefill only), for as many
    model rows as the requests make (not for a default block of thousands), and the engine
    accepts its plan."""
    if "llama" not in checkpoint[0]:
        pytest.skip("one family is enough for the planner path")
    from flexgen_dist.cli import eval as backend
    planned_rows, plan_run = [], backend.plan_run

    def recording_plan_run(ctx, job, *args):
        planned_rows.append(job.num_prompts)
        return plan_run(ctx, job, *args)
    monkeypatch.setattr(backend, "plan_run", recording_plan_run)
    got = evaluate("flexgen", {"pretrained": checkpoint[0], "dtype": "float32", "offload_dir": str(tmp_path)},
                   task_dir, tasks=["fg_mc"])
    for doc_got, doc_ref in zip(got["fg_mc"], reference["fg_mc"]):
        assert [round(r[0][0], 3) for r in doc_got] == pytest.approx([r[0][0] for r in doc_ref], abs=1e-3)
    requests = sum(map(len, reference["fg_mc"]))
    assert len(planned_rows) == 1 and 1 <= planned_rows[0] <= requests, (planned_rows, requests)


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")
def test_backend_at_two_ranks_equals_hf(checkpoint, task_dir, reference, tmp_path):
    out = tmp_path / "results"
    args = [f"{k}={v}" for k, v in flexgen(checkpoint[0], tmp_path / "off").items()]
    proc = mpirun(2, ["-m", "flexgen_dist.eval", "run", "--model", "flexgen", "--model_args", *args,
                      "--tasks", ",".join(TASKS), "--include_path", task_dir, "--batch_size", "4",
                      "--output_path", str(out), "--log_samples"], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = {}
    for task in TASKS:
        (path,) = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)  # written once
        with open(path) as f:
            samples[task] = [json.loads(line) for line in f]
    assert_same(responses(samples), reference)


def test_smollm2_answers_as_hf(smollm2_dir, task_dir, tmp_path):
    """The real SmolLM2 through the backend chooses the same answer as `hf` on every question
    (both in float32; log-likelihoods within 1e-3)."""
    ref = evaluate("hf", {"pretrained": smollm2_dir, "dtype": "float32", "device": "cpu"}, task_dir, ["fg_real_mc"])
    got = evaluate("flexgen", flexgen(smollm2_dir, tmp_path), task_dir, ["fg_real_mc"])

    def answers(resps):
        return [max(range(len(doc)), key=lambda c: doc[c][0][0]) for doc in resps["fg_real_mc"]]
    assert answers(got) == answers(ref)
    for doc_got, doc_ref in zip(got["fg_real_mc"], ref["fg_real_mc"]):
        assert [r[0][0] for r in doc_got] == pytest.approx([r[0][0] for r in doc_ref], abs=1e-3)


def test_score_equals_transformers_log_softmax(checkpoint, tmp_path):
    """Engine.score against transformers' own float32 log-softmax, several blocks, mixed lengths."""
    path, model = checkpoint
    requests = [([2, 15, 16, 17], [18, 19]), ([2, 33], [40, 41, 42]), ([2, 5, 6, 7, 8, 9, 10, 11], [12]),
                ([2, 100], [101]), ([2] + list(range(50, 110)), [111, 112, 113])]  # the last one is cut to 64
    with Engine.from_pretrained(path, Policy(gpu_batch_size=2, num_gpu_batches=1), offload_dir=str(tmp_path),
                                dtype="float32") as engine:
        got = engine.score(requests)
    for (context, continuation), (logprob, greedy) in zip(requests, got):
        ids = torch.tensor([(context + continuation)[-65:-1]])
        with torch.no_grad():
            logp = model(ids).logits.float().log_softmax(-1)[0, -len(continuation):]
        target = torch.tensor(continuation)
        assert logprob == pytest.approx(logp.gather(-1, target[:, None]).sum().item(), abs=1e-3)
        assert greedy == bool((logp.argmax(-1) == target).all())


def test_scoring_a_model_greedy_continuation_says_greedy(checkpoint, tmp_path):
    path, model = checkpoint
    context = [2, 15, 16, 17]
    with torch.no_grad():
        ids = torch.tensor([context])  # an explicit mask: the context starts with the pad id
        chosen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                pad_token_id=2)[0, len(context):].tolist()
    with Engine.from_pretrained(path, Policy(), offload_dir=str(tmp_path), dtype="float32") as engine:
        (_, greedy), (_, other) = engine.score([(context, chosen), (context, chosen[:-1] + [(chosen[-1] + 1) % 300])])
    assert greedy and not other


def test_rolling_windows_cover_every_token_once():
    tokens = list(range(10, 160))
    windows = rolling_windows(tokens, 2, 64)
    assert [t for _, cont in windows for t in cont] == tokens
    assert windows[0][0] == [2]
    for context, continuation in windows:
        assert len(context) + len(continuation) - 1 <= 64
        assert len(context) >= 1


def test_bad_scoring_requests_are_refused(checkpoint, tmp_path):
    with Engine.from_pretrained(checkpoint[0], Policy(), offload_dir=str(tmp_path), dtype="float32") as engine:
        with pytest.raises(FlexGenError, match="empty continuation"):
            engine.score([([2, 3], [])])
        with pytest.raises(FlexGenError, match="outside the vocabulary"):
            engine.score([([2, 3], [100000])])


def test_eval_without_pretrained_is_one_line_error(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "flexgen_dist.eval", "run", "--model", "flexgen", "--tasks",
                           "fg_mc", "--include_path", write_tasks(tmp_path)], capture_output=True, text=True,
                          check=False, timeout=300, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "error: model_args needs pretrained=DIR" in proc.stderr
