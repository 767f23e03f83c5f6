"""What a new user meets first: checkpoints as they have them, transformers' stopping rules, the
README's Python example, --help and the files in configs/."""
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, make_checkpoint, reference_generate, run_cli
from flexgen_dist import Engine, EngineConfig, GenerationConfig, Policy
from flexgen_dist.cli.run import build_parser, main, parse_args, policy_from_args
from flexgen_dist.core.config import JobConfig, field_docs
from flexgen_dist.core.policy import PERCENT_FIELDS
from flexgen_dist.models.checkpoint import resolve_model

ROOT = Path(__file__).resolve().parent.parent
NEW = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One model saved three ways: sharded safetensors, one pytorch_model.bin, sharded .bin."""
    base = tmp_path_factory.mktemp("formats")
    model = make_checkpoint(base / "safetensors", post_ln=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    single, sharded = base / "bin", base / "bin-sharded"
    for d in (single, sharded):
        shutil.copytree(base / "safetensors", d, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(state, single / "pytorch_model.bin")
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, sharded / name)
    index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return {"safetensors": base / "safetensors", "bin": single, "bin-sharded": sharded}


def test_bin_checkpoints_give_the_same_tokens_as_safetensors(checkpoints, tmp_path):
    assert not list(checkpoints["bin"].glob("*.safetensors")) and (checkpoints["bin"] / "pytorch_model.bin").is_file()
    assert len(list(checkpoints["bin-sharded"].glob("pytorch_model-*.bin"))) == 2
    outputs = {}
    for kind, path in checkpoints.items():
        with Engine.from_pretrained(str(path), policy=Policy(gpu_batch_size=5), offload_dir=tmp_path / kind,
                                    dtype="float32") as engine:
            outputs[kind] = engine.generate(PROMPTS, max_new_tokens=NEW)
    assert torch.equal(outputs["bin"], outputs["safetensors"])
    assert torch.equal(outputs["bin-sharded"], outputs["safetensors"])


class Payload:
    """A pickle that would create a file when loaded by an unrestricted unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_malicious_pickle_is_refused_and_creates_nothing(checkpoints, tmp_path, capsys):
    evil = tmp_path / "evil"
    shutil.copytree(checkpoints["bin"], evil)
    marker = tmp_path / "pwned"
    torch.save({"decoder.embed_tokens.weight": Payload(marker)}, evil / "pytorch_model.bin")
    offload = tmp_path / "offload"
    assert main(["--model", str(evil), "--offload-dir", str(offload), "--gen-len", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "refused" in err and "pytorch_model.bin" in err
    assert not marker.exists() and not offload.exists()


@pytest.fixture(scope="module")
def eos_checkpoint(tmp_path_factory):
    """A checkpoint whose generation_config names as EOS (a list, as Llama 3's does) the tokens
    greedy decoding produces third, so every prompt stops before max_new_tokens."""
    path = tmp_path_factory.mktemp("eos")
    model = make_checkpoint(path, post_ln=False, seed=3)
    plain, _ = reference_generate(model, PROMPTS, NEW)
    width = max(map(len, PROMPTS))
    eos = sorted({int(t) for t in plain[:, width + 2]})
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 1
    model.save_pretrained(path, max_shard_size="200KB")
    return str(path), model, eos, plain


def test_default_stopping_matches_transformers_generate(eos_checkpoint, tmp_path):
    path, model, eos, plain = eos_checkpoint
    ids, mask = __import__("conftest").left_padded(PROMPTS)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)  # its defaults
    with Engine.from_pretrained(path, policy=Policy(gpu_batch_size=5), offload_dir=tmp_path, dtype="float32") as engine:
        assert engine.eos_token_ids == eos
        out = engine.generate(PROMPTS, max_new_tokens=NEW)
        new_only = engine.generate(PROMPTS, max_new_tokens=NEW, new_tokens_only=True)
        full = engine.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    assert torch.equal(out, expected)
    assert all(len(row) <= 3 and row[-1] in eos for row in new_only)  # every prompt really stopped early
    assert torch.equal(full, plain)  # --ignore-eos: exactly max_new_tokens, as if there were no EOS


def test_cli_stops_at_eos_unless_told_to_ignore_it(eos_checkpoint, tmp_path):
    path, _, eos, _ = eos_checkpoint
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    lengths = {}
    for flag in ([], ["--ignore-eos"]):
        out = tmp_path / f"out{len(flag)}.jsonl"
        code, _, err = run_cli("--model", path, "--prompts", prompts, "--gen-len", NEW, "--gpu-batch-size", 5,
                               "--dtype", "float32", "--offload-dir", tmp_path / "off", "--output", out, *flag)
        assert code == 0, err
        lengths[bool(flag)] = [len(json.loads(line)["output_ids"]) for line in out.read_text().splitlines()]
    assert lengths[True] == [NEW] * len(PROMPTS)
    assert max(lengths[False]) <= 3


def test_eos_comes_from_config_json_without_a_generation_config(checkpoints, tmp_path):
    path = tmp_path / "no-genconfig"
    shutil.copytree(checkpoints["safetensors"], path)
    (path / "generation_config.json").unlink()
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = 7
    (path / "config.json").write_text(json.dumps(config))
    assert resolve_model(str(path)).eos_token_ids == [7]


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return next(b for b in blocks if "Engine.from_pretrained" in b)


def test_readme_python_example_runs_as_written(checkpoints, tmp_path, capsys):
    code = readme_python_example()
    assert "~/models/smollm2-135m-instruct" in code and "with Engine.from_pretrained" in code
    code = code.replace("~/models/smollm2-135m-instruct", str(checkpoints["safetensors"]))
    code = code.replace("/nvme/offload", str(tmp_path))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    printed = capsys.readouterr().out
    assert "total_throughput" in printed
    assert scope["engine"].closed  # the with-block closed it
    with pytest.raises(Exception, match="this Engine is closed"):
        scope["engine"].generate([[2, 5]], max_new_tokens=2)


def test_unknown_api_option_is_one_line(checkpoints, tmp_path):
    with pytest.raises(Exception, match="generate: unknown option 'max_tokens'"):
        with Engine.from_pretrained(str(checkpoints["safetensors"]), offload_dir=tmp_path) as engine:
            engine.generate(PROMPTS, max_tokens=3)
    with pytest.raises(Exception, match="Engine.from_pretrained: unknown option 'offload'"):
        Engine.from_pretrained(str(checkpoints["safetensors"]), offload="x")


def test_help_shows_every_field_with_its_meaning_and_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    fields = [(cls, f) for cls in (JobConfig, EngineConfig, Policy, GenerationConfig)
              for f in dataclasses.fields(cls) if f.name not in PERCENT_FIELDS
              and (cls, f.name) != (GenerationConfig, "seed")]  # one --seed, documented by EngineConfig
    for cls, f in fields:
        flag = "--gen-len" if f.name == "max_new_tokens" else f"--{f.name.replace('_', '-')}"
        assert flag in text, flag
        doc = field_docs(cls)[f.name]
        assert " ".join(doc.split()[:6]) in text, f.name
    assert "(default: 32)" in text and "(default: auto)" in text and "--percent" in text


def test_config_files_are_complete_and_run_offline(tmp_path):
    files = sorted((ROOT / "configs").glob("*.json"))
    assert len(files) >= 2
    for f in files:
        args = parse_args(["--config", str(f)])
        policy_from_args(args)
        assert args.dummy_weights or os.path.isdir(args.model), f"{f.name}: needs weights that are not here"
        resolve_model(args.model, dummy_weights=args.dummy_weights)  # offline: nothing to download
    small = ROOT / "configs" / "opt-125m-cpu.json"
    code, out, err = run_cli("--config", small, "--prompt-len", 8, "--gen-len", 2, "--gpu-batch-size", 2,
                             "--offload-dir", tmp_path)
    assert code == 0, err
    assert "generated tokens: 4" in out


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--gpu-batch-size", "many"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
