"""Batch jobs: OpenAI batch files in and out, per-request parameters, bucketing, the journal and
manifest, and resume after kill -9 at any point (one rank and a 3-rank pipeline)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_checkpoint
from flexgen_dist import Engine, FlexGenError, Policy
from flexgen_dist.core.config import RowParams
from flexgen_dist.engine.batch import padding_share, plan
from flexgen_dist.formats.outputs import JobOutput
from flexgen_dist.formats.requests import Request, parse_line
from flexgen_dist.run import main
from test_pipeline import MPIRUN, mpirun

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def openai_line(cid, url, body):
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def item(index, length, max_tokens):
    return Request(index, None, ids=[5] * length, row=RowParams(max_tokens=max_tokens, key=index))


def test_bucketing_cuts_padding_and_keeps_every_request():
    items = [item(i, n, m) for i, (n, m) in enumerate([(30, 4), (3, 4), (28, 8), (2, 8), (31, 4), (4, 4)])]
    blocks = plan(items, 2, bucket=True)
    assert sorted(it.index for b in blocks for it in b) == list(range(6))
    assert [[len(it.ids) for it in b] for b in blocks] == [[2, 3], [4, 28], [30, 31]]
    assert padding_share(blocks) < padding_share(plan(items, 2, bucket=False))


@pytest.mark.parametrize("line,error", [
    (openai_line("a", "/v1/embeddings", {"input": "x"}), "url '/v1/embeddings' is not supported"),
    (openai_line("b", "/v1/completions", {"prompt": "x", "suffix": "y"}), "parameter 'suffix' is not supported"),
    (openai_line("c", "/v1/completions", {"prompt": "x", "temperature": -1}), "temperature must be"),
    (openai_line("d", "/v1/chat/completions", {"messages": "hi"}), "'messages' must be"),
    (openai_line("e", "/v1/completions", {"prompt": "x", "n": 2}), "n=2 is not supported"),
])
def test_bad_openai_requests_become_errors_not_failures(line, error):
    request = parse_line("f.jsonl", 1, json.dumps(line), 0)
    assert error in request.error and request.carry["custom_id"] == line["custom_id"]


def test_journal_torn_line_and_manifest_mismatch(tmp_path):
    out = tmp_path / "out.jsonl"
    job = JobOutput(str(out), {"model": "m", "generation": {"max_new_tokens": 4}})
    assert job.start() == {}
    job.append([{"index": 1, "_index": 1}, {"index": 0, "_index": 0}])
    job.fd = os.close(job.fd)
    with open(job.journal_path, "ab") as f:
        f.write(b'2\t{"index": 2, "te')  # killed while writing
    again = JobOutput(str(out), {"model": "m", "generation": {"max_new_tokens": 4}})
    assert sorted(again.start()) == [0, 1]
    assert Path(again.journal_path).read_bytes().endswith(b'{"index": 0}\n')
    again.append([{"index": 2, "_index": 2}])
    again.finish()
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1, 2]
    assert not Path(again.journal_path).exists()
    with pytest.raises(FlexGenError, match=r"belongs to another job \(generation was"):
        JobOutput(str(out), {"model": "m", "generation": {"max_new_tokens": 5}}).start()


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    from conftest import make_tokenizer
    from llama_checkpoints import make_llama_checkpoint
    path = tmp_path_factory.mktemp("chat-llama")
    make_llama_checkpoint(path, "llama")
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return str(path)


def test_openai_batch_file_mixed_endpoints_and_parameters(chat_llama, tmp_path):
    lines = [
        openai_line("c1", "/v1/completions", {"model": "x", "prompt": "the quick brown fox", "max_tokens": 6}),
        openai_line("chat1", "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "a stitch in time"}], "max_tokens": 5}),
        openai_line("s1", "/v1/completions", {"prompt": "offloading moves", "temperature": 0.9, "top_p": 0.8,
                                              "seed": 11, "max_tokens": 7}),
        openai_line("bad", "/v1/completions", {"prompt": "the lazy dog " * 20, "max_tokens": 8}),
        openai_line("c2", "/v1/completions", {"prompt": "saves nine", "max_tokens": 3}),
        {"prompt": "the quick", "id": "plain-1", "max_tokens": 4},
    ]
    options = dict(policy=Policy(gpu_batch_size=2), offload_dir=tmp_path / "off", dtype="float32")
    with Engine.from_pretrained(chat_llama, **options) as engine:
        tok = engine.tokenizer
        alone = [engine.generate_batch([Request.of(line, i)], max_new_tokens=8, model_name=chat_llama)[0] for i, line in enumerate(lines)]
        ids = tok("the quick brown fox")["input_ids"]
        greedy = engine.generate([ids], max_new_tokens=6, new_tokens_only=True)[0]
    reference = tok.decode(greedy, skip_special_tokens=True)
    stop = reference[2:4]
    lines[0]["body"]["stop"] = [stop, "never-there"]
    prompts, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["--model", chat_llama, "--prompts", str(prompts), "--output", str(out), "--gen-len", "8",
                 "--gpu-batch-size", "2", "--offload-dir", str(tmp_path / "off"), "--dtype", "float32"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("custom_id") for r in records] == ["c1", "chat1", "s1", "bad", "c2", None]
    first = records[0]
    assert first["id"] == "batch_req_0" and first["error"] is None and first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "text_completion" and body["model"] == chat_llama
    assert body["choices"][0]["text"] == reference[:reference.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(ids)
    chat = records[1]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] <= 5
    assert records[3]["response"] is None and "positions but the model has 64" in records[3]["error"]["message"]
    assert records[5]["id"] == "plain-1" and records[5]["index"] == 5 and len(records[5]["output_ids"]) <= 4
    for i in (1, 2, 4, 5):  # greedy and seeded sampling: the same as each request run alone
        assert strip_created(records[i]) == strip_created(alone[i]), i
    assert main(["--model", chat_llama, "--prompts", str(prompts), "--output", str(tmp_path / "strict.jsonl"),
                 "--offload-dir", str(tmp_path / "off"), "--dtype", "float32", "--strict"]) == 2


def strip_created(record):
    record = json.loads(json.dumps(record))
    if record.get("response"):
        record["response"]["body"].pop("created")
    return record


# ----- kill -9 and resume ---------------------------------------------------------------------------
CRASH_PROMPTS = [{"input_ids": [2] + list(range(10, 10 + n)), "id": f"r{i}", "max_tokens": m}
                 for i, (n, m) in enumerate([(3, 4), (9, 2), (5, 4), (2, 3), (12, 4), (6, 1), (4, 4), (8, 3)])]


@pytest.fixture(scope="module")
def crash_job(tmp_path_factory):
    """(checkpoint, prompts file, the uninterrupted single-rank output's bytes)."""
    root = tmp_path_factory.mktemp("crash")
    make_checkpoint(root / "ckpt", post_ln=False, layers=3)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in CRASH_PROMPTS))
    assert main(job_args(root / "ckpt", prompts, root / "ref.jsonl", root / "off")) == 0
    return root / "ckpt", prompts, (root / "ref.jsonl").read_bytes()


def job_args(ckpt, prompts, out, off, gbs=2):
    return ["--model", str(ckpt), "--prompts", str(prompts), "--output", str(out), "--gen-len", "4",
            "--gpu-batch-size", str(gbs), "--offload-dir", str(off), "--dtype", "float32", "--quiet",
            "--policy", "manual"]  # the faults are placed by step: the schedule must be the one given


def faulty(fault, args, ranks=0):
    env = {**os.environ, "FLEXGEN_TEST_FAULT": fault, "PYTHONWARNINGS": "ignore"}
    if ranks:
        os.environ["FLEXGEN_TEST_FAULT"] = fault
        try:
            return mpirun(ranks, [HERE / "fault_wrapper.py", *args], timeout=120)
        finally:
            del os.environ["FLEXGEN_TEST_FAULT"]
    return subprocess.run([sys.executable, HERE / "fault_wrapper.py", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def journal_ids(out: Path) -> list[str]:
    journal = Path(str(out) + ".partial")
    if not journal.exists():
        return []
    return [json.loads(line.split("\t", 1)[1])["id"] for line in journal.read_text().splitlines() if line.endswith("}")]


def assert_same_as_reference(out: Path, reference: bytes):
    got = sorted(out.read_bytes().splitlines(), key=lambda l: json.loads(l)["id"])
    want = sorted(reference.splitlines(), key=lambda l: json.loads(l)["id"])
    assert got == want
    assert out.read_bytes() == reference  # input order, once complete
    assert not Path(str(out) + ".partial").exists()


def test_kill9_single_rank_at_every_point_then_resume(crash_job, tmp_path, capsys):
    ckpt, prompts, reference = crash_job
    out, args = tmp_path / "out.jsonl", job_args(ckpt, prompts, tmp_path / "out.jsonl", tmp_path / "off")
    progress = []
    for fault in ["0:1:loadkill", "0:1:kill", "0:6:kill", "0:2:writekill"]:  # load, prefill, decode, a row
        done = faulty(fault, args)
        assert done.returncode == -9, (fault, done.stderr)
        progress.append(journal_ids(out))
    assert progress[0] == progress[1] == [] and len(progress[2]) == 2 and len(progress[3]) >= 4, progress
    assert not Path(str(out) + ".partial").read_bytes().endswith(b"\n")  # torn by the last kill
    assert main(args) == 0
    assert_same_as_reference(out, reference)
    capsys.readouterr()
    assert main(args) == 0 and out.read_bytes() == reference  # a finished job: nothing to run
    said = capsys.readouterr().out
    assert "nothing to generate: all 8 requests are in" in said and "throughput" not in said, said
    other = args[:args.index("--gen-len") + 1] + ["5"] + args[args.index("--gen-len") + 2:]
    assert main(other) == 2  # another job's output is refused


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")
@pytest.mark.timeout(400)
def test_kill9_three_rank_pipeline_then_resume(crash_job, tmp_path):
    ckpt, prompts, reference = crash_job
    out = tmp_path / "out.jsonl"
    args = job_args(ckpt, prompts, out, tmp_path / "off-{rank}", gbs=1)
    # rank 2 while loading; rank 1 in its first prefill; rank 1 mid-decode of block 2 (3 rows of
    # block 1 kept); rank 0 writing its second block (a torn line)
    for fault, rows in [("2:1:loadkill", 0), ("1:1:kill", 0), ("1:14:kill", 3), ("0:2:writekill", 6)]:
        done = faulty(fault, args, ranks=3)
        assert done.returncode != 0, done.stdout + done.stderr
        assert rows <= len(journal_ids(out)) < 8, (fault, journal_ids(out), done.stderr[-2000:])
    assert not Path(str(out) + ".partial").read_bytes().endswith(b"\n")  # torn by the last kill
    kept = len(journal_ids(out))
    done = mpirun(3, ["-m", "flexgen_dist.run", *args], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{kept} of 8 requests already done" in done.stderr
    assert_same_as_reference(out, reference)


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.skipif(MPIRUN is None, reason="no mpirun"))])
@pytest.mark.timeout(400)
def test_a_finished_output_ending_in_a_torn_line_is_repaired_by_a_rerun(crash_job, tmp_path, ranks):
    """A finished job whose output then ends in a torn line (a kill inside a write) is run again:
    the rerun says so, runs the torn record's request again and writes the uninterrupted output."""
    ckpt, prompts, reference = crash_job
    out = tmp_path / "out.jsonl"
    args = job_args(ckpt, prompts, out, tmp_path / "off-{rank}", gbs=1)
    assert main(args) == 0
    last = reference.splitlines()[-1]
    out.write_bytes(reference[:len(reference) - len(last) // 2 - 1])  # half of the last line and its newline gone
    command = ["-m", "flexgen_dist.run", *args]
    done = mpirun(ranks, command, timeout=300) if ranks > 1 else subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ended in a torn line (an interrupted write): cut it, kept the 7 whole records" in done.stderr
    assert "7 of 8 requests already done" in done.stderr
    assert_same_as_reference(out, reference)


def test_a_rerun_of_a_finished_job_says_so_before_planning(crash_job, tmp_path, capsys):
    ckpt, prompts, reference = crash_job
    out = tmp_path / "out.jsonl"
    args = [a for a in job_args(ckpt, prompts, out, tmp_path / "off") if a not in ("--policy", "manual", "--quiet")]
    assert main(args) == 0 and out.read_bytes() == reference
    capsys.readouterr()
    assert main(args) == 0 and out.read_bytes() == reference
    said = capsys.readouterr().out
    assert said.startswith("nothing to generate: all 8 requests are in") and "plan:" not in said, said


def test_a_job_whose_every_request_failed_exits_3_naming_the_first(crash_job, tmp_path, capsys):
    ckpt, _, _ = crash_job
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"input_ids": [5] * 70, "id": "long"}) + "\n" +
                       json.dumps({"input_ids": [5] * 3, "max_tokens": 0, "id": "none"}) + "\n")
    assert main(job_args(ckpt, prompts, out, tmp_path / "off")) == 3
    err = capsys.readouterr().err
    assert "error: 2 of 2 requests failed, the first: request 0 (long): the prompt has 70 tokens" in err, err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["long", "none"]


def test_partial_failure_exits_0_unless_asked_to_fail(crash_job, tmp_path, capsys):
    ckpt, _, _ = crash_job
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"input_ids": [5] * 70}) + "\n" + json.dumps({"input_ids": [5] * 3}) + "\n")
    args = job_args(ckpt, prompts, tmp_path / "out.jsonl", tmp_path / "off")
    assert main(args) == 0
    assert "error: 1 of 2 requests failed, the first: request 0: the prompt has 70 tokens" in capsys.readouterr().err
    assert main(job_args(ckpt, prompts, tmp_path / "again.jsonl", tmp_path / "off") + ["--fail-on-error"]) == 3


def test_a_strict_job_refused_at_its_first_request_leaves_no_files(crash_job, tmp_path, capsys):
    ckpt, _, _ = crash_job
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"input_ids": [5] * 70}) + "\n" + json.dumps({"input_ids": [5] * 3}) + "\n")
    assert main(job_args(ckpt, prompts, out, tmp_path / "off") + ["--strict"]) == 2
    assert "error: request 0: the prompt has 70 tokens" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["off", "p.jsonl"]


def test_the_requests_bar_draws_the_finished_job_once(crash_job, tmp_path, monkeypatch):
    """Under mpirun every draw of rank 0's bar reaches the terminal as a line of its own."""
    import io
    ckpt, _, _ = crash_job
    with Engine.from_pretrained(str(ckpt), policy=Policy(gpu_batch_size=2), offload_dir=tmp_path, dtype="float32") as engine:
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        engine.generate_batch([[2, 10, 11], [2, 12], [2, 13, 14, 15], [2, 9]], max_new_tokens=2, progress=True)
        drawn = sys.stderr.getvalue()
    assert drawn.count("4/4") == 1, drawn


def test_host_memory_does_not_grow_with_blocks(tmp_path):
    """40 blocks with a 32000-token vocabulary: a per-block leak of logits (rows × steps × vocab
    × 4 B = 2 MiB here) would add 70 MiB between block 5 and block 40."""
    from transformers import OPTConfig
    OPTConfig(vocab_size=32000, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=64, word_embed_proj_dim=32).save_pretrained(tmp_path / "big-vocab")
    rss = []

    def sample(records):
        with open("/proc/self/statm") as f:
            rss.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    with Engine.from_pretrained(str(tmp_path / "big-vocab"), dummy_weights=True, policy=Policy(gpu_batch_size=4),
                                offload_dir=tmp_path / "off", dtype="float32") as engine:
        prompts = [[2] + [7 + i % 50] * (3 + i % 5) for i in range(160)]
        engine.generate_batch(prompts, max_new_tokens=4, ignore_eos=True, on_records=sample, progress=False)
        peak = engine.last_stats.peak_rss_bytes
    growth = rss[-1] - rss[5]
    print(f"rss after block 5: {rss[5] / 2**20:.1f} MiB, after block 40: {rss[-1] / 2**20:.1f} MiB, "
          f"peak {peak / 2**20:.1f} MiB")
    assert len(rss) == 41 and growth < 16 * 2**20, growth
