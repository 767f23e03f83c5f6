"""The CLI end to end, and every bad input it must refuse with a one-line message."""
import json

import pytest
from conftest import PROMPTS, make_checkpoint, run_cli
from flexgen_dist import Engine, Policy
from flexgen_dist.cli.run import build_parser
from flexgen_dist.run import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(path, post_ln=False)
    return str(path)


def test_text_prompts_end_to_end(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox\n\na stitch in time\noffloading moves weights\n")
    out, log = tmp_path / "out.jsonl", tmp_path / "log.jsonl"
    args = ["--model", ckpt, "--prompts", prompts, "--gen-len", 6, "--gpu-batch-size", 2, "--num-gpu-batches", 1,
            "--percent", 0, 50, 0, 100, 100, 0, "--offload-dir", tmp_path / "off", "--dtype", "float32",
            "--output", out, "--log-file", log]
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    assert "total throughput" in stdout and "decode throughput" in stdout and "peak memory" in stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all(len(r["output_ids"]) == 6 and isinstance(r["text"], str) for r in records)
    # the same prompts through the API give the same ids
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = [tok(t)["input_ids"] for t in ["the quick brown fox", "a stitch in time", "offloading moves weights"]]
    engine = Engine.from_pretrained(ckpt, policy=Policy(gpu_batch_size=3), offload_dir=tmp_path / "off2", dtype="float32")
    try:
        api = engine.generate(ids, max_new_tokens=6)[:, max(map(len, ids)):]
    finally:
        engine.close()
    assert [r["output_ids"] for r in records] == api.tolist()
    assert records[0]["text"] == tok.decode(api[0], skip_special_tokens=True)
    metrics = json.loads(log.read_text().splitlines()[-1])
    assert metrics["generated_tokens"] == 18 and metrics["total_throughput"] > 0
    # a new job (another output) appends to the log and reuses the converted store; a rerun of the
    # finished job generates nothing and so logs nothing
    again = [tmp_path / "out2.jsonl" if a == out else a for a in args]
    code, _, _ = run_cli(*again)
    assert code == 0 and len(log.read_text().splitlines()) == 2
    code, stdout, _ = run_cli(*args)
    assert code == 0 and "nothing to generate" in stdout and len(log.read_text().splitlines()) == 2


def test_jsonl_ids_stop_and_order(ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"input_ids": p}) for p in PROMPTS) + "\n")
    engine = Engine.from_pretrained(ckpt, policy=Policy(gpu_batch_size=5), offload_dir=tmp_path / "o", dtype="float32")
    try:
        plain = engine.generate(PROMPTS, max_new_tokens=8)[:, max(map(len, PROMPTS)):]
    finally:
        engine.close()
    stop = int(plain[1, 2])
    out = tmp_path / "out.jsonl"
    assert main(["--model", ckpt, "--prompts", str(prompts), "--gen-len", "8", "--gpu-batch-size", "2",
                 "--num-gpu-batches", "2", "--offload-dir", str(tmp_path / "o"), "--dtype", "float32",
                 "--stop", str(stop), "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    expected = plain[1].tolist()
    assert records[1]["output_ids"] == expected[:expected.index(stop) + 1]


def test_synthetic_prompts_with_dummy_weights(tmp_path):
    code, stdout, stderr = run_cli("--model", "opt-125m", "--dummy-weights", "--prompt-len", 8, "--gen-len", 3,
                                   "--gpu-batch-size", 2, "--num-gpu-batches", 2, "--percent", 0, 100, 0, 100, 100, 0,
                                   "--offload-dir", tmp_path)
    assert code == 0, stderr
    assert "generated tokens: 12" in stdout


def bad(args, capsys) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("percent,message", [
    ([100, 0, 100, 0, 100, 120], "outside 0-100"),
    ([-5, 0, 100, 0, 100, 0], "outside 0-100"),
    ([60, 50, 100, 0, 100, 0], "sum to more than 100"),
    ([100, 0, 70, 40, 100, 0], "sum to more than 100"),
    ([100, 0, 100, 0], "takes 6 numbers"),
    ([100, 0, 100, 0, 50, 50], "activations must be 100% on one tier"),
])
def test_bad_percent(percent, message, capsys, tmp_path):
    assert message in bad(["--dummy-weights", "--offload-dir", tmp_path, "--percent", *percent], capsys)


def test_missing_model_path(capsys, tmp_path):
    err = bad(["--model", tmp_path / "nope", "--offload-dir", tmp_path], capsys)
    assert "does not exist" in err and "nope" in err


def test_model_that_is_not_opt(capsys, tmp_path):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "'gpt2' model; supported families: opt" in bad(["--model", tmp_path / "gpt", "--offload-dir", tmp_path], capsys)


def test_unwritable_offload_dir(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "is not writable" in bad(["--dummy-weights", "--offload-dir", blocker / "sub"], capsys)


def test_prompt_longer_than_positions(ckpt, capsys, tmp_path):
    err = bad(["--model", ckpt, "--prompt-len", 60, "--gen-len", 8, "--offload-dir", tmp_path], capsys)
    assert "needs 68 positions but the model has 64" in err


def test_gen_len_zero(capsys, tmp_path):
    assert "at least 1" in bad(["--dummy-weights", "--gen-len", 0, "--offload-dir", tmp_path], capsys)


@pytest.mark.parametrize("flag,value,message", [
    ("--gpu-batch-size", 0, "error: --gpu-batch-size must be a positive integer, got 0"),
    ("--num-gpu-batches", -2, "error: --num-gpu-batches must be a positive integer, got -2"),
    ("--gen-len", 0, "error: --gen-len must be at least 1, got 0"),
    ("--top-p", 1.5, "error: --top-p must be in (0, 1], got 1.5"),
    ("--micro-batches", 0, "error: --micro-batches must be at least 1, got 0"),
])
def test_a_bad_flag_value_is_named_by_its_flag(flag, value, message, capsys, tmp_path):
    assert bad(["--dummy-weights", flag, value, "--offload-dir", tmp_path], capsys).startswith(message)


def test_help_names_the_values_as_the_flags_do():
    help_text = " ".join(build_parser().format_help().split())
    assert "--gen-len GEN_LEN" in help_text and "MAX_NEW_TOKENS" not in help_text


def test_empty_prompts_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "has no prompts" in bad(["--dummy-weights", "--prompts", empty, "--offload-dir", tmp_path], capsys)


def test_missing_prompts_file(capsys, tmp_path):
    assert "does not exist" in bad(["--dummy-weights", "--prompts", tmp_path / "x.txt", "--offload-dir", tmp_path], capsys)


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "a"}', '{"prompt": "b"', '{"prompt": "c"}'], "line 2: not valid JSON"),
    (['{"prompt": "a"}', '', '{"input_ids": "abc"}'], "line 3: needs a 'prompt' string"),
    (['{"input_ids": []}'], "line 1: needs"),
])
def test_malformed_jsonl(lines, message, capsys, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    assert message in bad(["--model", "opt-125m", "--dummy-weights", "--prompts", f, "--offload-dir", tmp_path], capsys)


def test_text_prompts_without_tokenizer(capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("hello\n")
    assert "need a tokenizer" in bad(["--dummy-weights", "--prompts", f, "--offload-dir", tmp_path], capsys)


def test_store_damage_is_reported(ckpt, capsys, tmp_path):
    args = ["--model", ckpt, "--gen-len", 2, "--prompt-len", 4, "--offload-dir", tmp_path, "--percent", 0, 0, 100, 0, 100, 0]
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    store = next(p for p in (tmp_path / "weights").iterdir() if p.is_dir())
    victim = store / "decoder.layers.1.fc1.weight.bin"
    with open(victim, "r+b") as f:
        f.truncate(100)
    err = bad(args, capsys)
    assert "decoder.layers.1.fc1.weight.bin is truncated" in err
    victim.unlink()
    assert "decoder.layers.1.fc1.weight.bin is missing" in bad(args, capsys)


def test_no_traceback_from_a_subprocess(tmp_path):
    code, stdout, stderr = run_cli("--dummy-weights", "--percent", 100, 0, 100, 0, 100, 101, "--offload-dir", tmp_path)
    assert code == 2 and stderr.strip().splitlines() == ["error: act percent 101 is outside 0-100"]


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "opt-125m", "dummy_weights": True, "gpu_batch_size": 3,
                                  "prompt_len": 4, "gen_len": 2}))
    code, out, err = run_cli("--config", config, "--gen-len", 3, "--offload-dir", tmp_path)
    assert code == 0, err
    assert "prompts: 3" in out and "generated tokens: 9" in out


def test_config_file_errors(capsys, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"gpu_batch": 3}))
    assert "unknown key 'gpu_batch'" in bad(["--config", config], capsys)
    config.write_text("{")
    assert "is not valid JSON" in bad(["--config", config], capsys)
