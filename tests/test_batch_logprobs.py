"""Logprobs in OpenAI batch files (/v1/completions `logprobs`, `echo`, `max_tokens: 0`): the
token log-probabilities and top alternatives equal transformers' own float32 log-softmax on the
same weights, for generated and echoed tokens; bad values become error records."""
import json

import pytest
import torch
from conftest import make_checkpoint
from llama_checkpoints import make_llama_checkpoint
from flexgen_dist.formats.requests import parse_line
from flexgen_dist.run import main
from test_pipeline import MPIRUN, mpirun

EOS = 2


def completion(cid, **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"temperature": 0, **body}}


GOOD = [
    completion("gen", prompt="the quick brown fox", max_tokens=5, logprobs=3),
    completion("echo", prompt="a stitch in time saves", max_tokens=4, logprobs=5, echo=True),
    completion("score", prompt="offloading moves the weights", max_tokens=0, logprobs=2, echo=True),
    completion("plain", prompt="nine lives", max_tokens=3),
    completion("zero", prompt="the lazy dog", max_tokens=3, logprobs=0),
    completion("ids", prompt=[EOS, 40, 41, 42], max_tokens=2, logprobs=1, echo=True),
    completion("echo-only", prompt="a stitch in", max_tokens=3, echo=True),
]
BAD = [
    (completion("six", prompt="x", logprobs=6), "logprobs must be an integer in [0, 5]"),
    (completion("neg", prompt="x", logprobs=-1), "logprobs must be an integer in [0, 5]"),
    (completion("bool", prompt="x", logprobs=True), "logprobs must be an integer in [0, 5]"),
    (completion("str", prompt="x", logprobs="3"), "logprobs must be an integer in [0, 5]"),
    (completion("echo-str", prompt="x", echo="yes"), "echo must be true or false"),
    (completion("none", prompt="x", max_tokens=0), "max_tokens must be a positive integer (or 0 with echo)"),
    ({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
      "body": {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2}},
     "logprobs are not supported for chat completions"),
]


@pytest.fixture(scope="module", params=["opt", "llama"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(path, post_ln=False) if request.param == "opt" else \
        make_llama_checkpoint(path, "llama", tokenizer=True)
    return str(path), model


@pytest.fixture(scope="module")
def records(checkpoint, tmp_path_factory):
    path, _ = checkpoint
    root = tmp_path_factory.mktemp("job")
    prompts, out = root / "batch.jsonl", root / "out.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in GOOD + [b for b, _ in BAD]))
    assert main(["--model", path, "--prompts", str(prompts), "--output", str(out), "--gen-len", "8",
                 "--gpu-batch-size", "2", "--offload-dir", str(root / "off"), "--dtype", "float32", "--quiet"]) == 0
    return {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}


def reference(model, prompt_ids, steps):
    """Greedy tokens of transformers' float32 model and its log-softmax at every position."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return ids, logp


def check_position(tok, got_lp, got_top, logp_row, target, n):
    assert got_lp == pytest.approx(float(logp_row[target]), abs=1e-4)
    values, ids = logp_row.topk(n)
    want = {}
    for v, t in zip(values.tolist(), ids.tolist()):
        want.setdefault(tok.decode([t]), v)
    assert got_top.keys() == want.keys()
    assert list(got_top.values()) == pytest.approx(list(want.values()), abs=1e-4)


@pytest.mark.parametrize("cid", ["gen", "echo", "score", "zero", "ids"])
def test_logprobs_equal_transformers_log_softmax(checkpoint, records, cid):
    from transformers import AutoTokenizer
    path, model = checkpoint
    tok = AutoTokenizer.from_pretrained(path)
    body = next(line for line in GOOD if line["custom_id"] == cid)["body"]
    got = records[cid]
    assert got["error"] is None, got
    choice = got["response"]["body"]["choices"][0]
    usage = got["response"]["body"]["usage"]
    prompt_ids = body["prompt"] if isinstance(body["prompt"], list) else tok(body["prompt"])["input_ids"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    steps = usage["completion_tokens"]
    assert 1 <= steps <= body["max_tokens"] or steps == body["max_tokens"] == 0
    ids, logp = reference(model, prompt_ids, steps)
    generated = ids[len(prompt_ids):]
    assert EOS not in generated[:-1]
    echo, n = body.get("echo", False), body["logprobs"]
    first = 0 if echo else len(prompt_ids)
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in ids[first:]]  # special tokens by name
    assert choice["text"] == (tok.decode(prompt_ids, skip_special_tokens=True) if echo else "") + \
        tok.decode(generated, skip_special_tokens=True)
    assert choice["text"].endswith("".join(tok.decode([t], skip_special_tokens=True) for t in ids[first:]))
    for k, offset in enumerate(lp["text_offset"]):  # offsets into the prompt's text and the completion's
        assert offset == len(tok.decode(ids[:first + k], skip_special_tokens=True))
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) - first
    if echo:
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for k in range(max(first, 1), len(ids)):
        check_position(tok, lp["token_logprobs"][k - first], lp["top_logprobs"][k - first], logp[k - 1], ids[k], n)
    if body["max_tokens"] == 0:
        assert generated == [] and choice["finish_reason"] == "length"


def test_echo_without_logprobs_and_requests_without_logprobs(checkpoint, records):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(checkpoint[0])
    echoed = records["echo-only"]["response"]["body"]["choices"][0]
    prompt = tok.decode(tok("a stitch in")["input_ids"], skip_special_tokens=True)
    assert echoed["logprobs"] is None and echoed["text"].startswith(prompt) and len(echoed["text"]) > len(prompt)
    assert records["plain"]["response"]["body"]["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("line,error", BAD, ids=[b["custom_id"] for b, _ in BAD])
def test_bad_logprobs_values_become_error_records(records, line, error):
    request = parse_line("f.jsonl", 1, json.dumps(line), 0)
    assert error in request.error
    got = records[line["custom_id"]]
    assert got["response"] is None and error in got["error"]["message"]


def test_a_strict_job_refuses_a_bad_logprobs_value_in_one_line(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(completion("six", prompt="x", logprobs=6)) + "\n")
    assert main(["--model", checkpoint[0], "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                 "--offload-dir", str(tmp_path / "off"), "--dtype", "float32", "--strict", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: request 0 (six): logprobs must be an integer in [0, 5]"), err


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")
@pytest.mark.timeout(400)
def test_logprobs_at_two_ranks_equal_one_rank(checkpoint, records, tmp_path):
    path, _ = checkpoint
    if "opt" not in path:
        pytest.skip("one family is enough for the pipeline path")
    prompts, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in GOOD))
    done = mpirun(2, ["-m", "flexgen_dist.run", "--model", path, "--prompts", str(prompts), "--output", str(out),
                      "--gen-len", "8", "--gpu-batch-size", "2", "--offload-dir", str(tmp_path / "off-{rank}"),
                      "--dtype", "float32", "--quiet"], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for got in map(json.loads, out.read_text().splitlines()):
        one = records[got["custom_id"]]["response"]["body"]["choices"][0]
        two = got["response"]["body"]["choices"][0]
        assert two["text"] == one["text"]
        if one["logprobs"] is None:
            assert two["logprobs"] is None
            continue
        for key in ("tokens", "text_offset"):
            assert two["logprobs"][key] == one["logprobs"][key]
        lps = [x for x in one["logprobs"]["token_logprobs"] if x is not None]
        assert [x for x in two["logprobs"]["token_logprobs"] if x is not None] == pytest.approx(lps, abs=1e-5)
        assert [t and list(t) for t in two["logprobs"]["top_logprobs"]] == \
            [t and list(t) for t in one["logprobs"]["top_logprobs"]]
