"""The planner end to end: the hardware profile's cache, `python -m flexgen_dist.plan`, `--policy
auto` runs (same tokens as any hand-written policy), the prediction next to the measurement, and
the one-line refusal of a request nothing can fit."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import PROMPTS, make_checkpoint, run_cli
from flexgen_dist import Engine, auto_policy
from flexgen_dist.cli import flags
from flexgen_dist.cli.plan import build_parser as plan_parser
from flexgen_dist.cli.run import build_parser as run_parser
from flexgen_dist.models import family_of, spec_from_dir
from flexgen_dist.planning import measure
from flexgen_dist.planning import profile as hardware
from flexgen_dist.system import limits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(path, post_ln=False)
    return str(path)


def run_plan(*args, env=None):
    p = subprocess.run([sys.executable, "-m", "flexgen_dist.plan", *map(str, args)], capture_output=True, text=True,
                       timeout=300, env=env)
    return p.returncode, p.stdout, p.stderr


def test_profile_is_measured_once_and_cached_per_machine(ckpt, tmp_path):
    spec = spec_from_dir(ckpt)
    device, cache = torch.device("cpu"), tmp_path / "cache"
    profile = hardware.load_profile(device, cache_dir=str(cache))
    measure.profile_model(profile, device, (torch.float32,), spec, family_of(spec), str(tmp_path))
    assert profile.measured_s > 0 and any(k.startswith("layer float32") for k in profile.rates)
    assert any(k.startswith("disk read") for k in profile.rates) and "executor job float32 opt" in profile.rates
    again = hardware.load_profile(device, cache_dir=str(cache))
    measure.profile_model(again, device, (torch.float32,), spec, family_of(spec), str(tmp_path))
    assert again.rates == profile.rates and again.measured_s == 0  # nothing measured twice
    assert hardware.load_profile(device, cache_dir=str(cache), reprofile=True).rates == {}
    # a damaged or foreign file is measured afresh, not trusted
    path = again.path
    with open(path, "w") as f:
        f.write("{not json")
    assert hardware.load_profile(device, cache_dir=str(cache)).rates == {}
    data = {"version": hardware.PROFILE_VERSION, "identity": {**again.identity, "cpu": "another"}, "rates": {"x": 1}}
    with open(path, "w") as f:
        json.dump(data, f)
    assert hardware.load_profile(device, cache_dir=str(cache)).rates == {}


def test_plan_command_prints_the_plan(ckpt, tmp_path):
    code, out, err = run_plan("--model", ckpt, "--prompt-len", 8, "--gen-len", 4, "--num-prompts", 16,
                              "--offload-dir", tmp_path, "--dtype", "float32")
    assert code == 0, err
    assert "--percent 100 0 100 0 100 0" in out  # a tiny model fits: nothing offloaded
    assert "predicted memory: RAM" in out and "generated tokens/s" in out and "busiest resource" in out


def test_measuring_a_new_machine_says_so_and_a_cached_one_is_silent(ckpt, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "fresh-cache")}  # a machine never measured
    args = ("--model", ckpt, "--prompt-len", 8, "--gen-len", 4, "--offload-dir", tmp_path, "--dtype", "float32")
    code, out, err = run_plan(*args, env=env)
    assert code == 0 and err == "", err  # stderr is for warnings and errors
    lines = out.splitlines()
    assert lines[0].startswith("measuring this machine for the planner (kept in ")
    assert str(tmp_path / "fresh-cache") in lines[0] and lines[1].startswith("measured in ")
    assert "predicted memory" in out
    code, out, err = run_plan(*args, env=env)
    assert code == 0 and "measur" not in out and "predicted memory" in out, out


def test_the_first_measurement_announces_itself_and_the_profile_still_pickles(tmp_path):
    """The disk probe, which bypasses `ensure`, announces itself too; the announcement's callback
    (a lambda) must not stop the profile from reaching rank 0 pickled, measured or not."""
    said = []
    profile = hardware.HardwareProfile({"cpu": "test"}, path=None)
    profile.on_first_measurement = lambda: said.append("measuring")
    blob = pickle.dumps(profile)  # nothing measured yet: the callback is still set
    measure.measure_disk(profile, str(tmp_path))
    assert said == ["measuring"] and any(k.startswith("disk read") for k in profile.rates)
    profile.on_first_measurement = lambda: said.append("again")
    measure.measure_disk(profile, str(tmp_path))  # measured already: nothing to announce
    assert said == ["measuring"]
    again = pickle.loads(pickle.dumps(profile))
    assert again.rates == profile.rates and again.on_first_measurement is None
    assert pickle.loads(blob).on_first_measurement is None


def test_plan_creates_an_offload_dir_that_does_not_exist_yet(ckpt, tmp_path):
    fresh = tmp_path / "home" / "flexgen_offload_dir"  # as the default dir is on a new machine
    code, out, err = run_plan("--model", ckpt, "--prompt-len", 8, "--gen-len", 4, "--offload-dir", fresh,
                              "--dtype", "float32")
    assert code == 0 and "predicted memory" in out, err
    assert fresh.is_dir() and (fresh.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("bad, message", [
    (("--gen-len", -1), "--gen-len must be at least 1, got -1"),
    (("--gen-len", 0), "--gen-len must be at least 1, got 0"),
    (("--prompt-len", 0), "--prompt-len must be at least 1, got 0"),
    (("--num-prompts", -3), "--num-prompts must be at least 1, got -3"),
    (("--ranks", 0), "--ranks must be at least 1, got 0"),
    (("--model", "/nonexistent/model"), "model /nonexistent/model is neither a built-in name ("),
])
def test_plan_refuses_what_run_refuses_in_one_line(bad, message, tmp_path):
    code, out, err = run_plan("--model", "opt-125m", "--prompt-len", 8, "--gen-len", 4, "--offload-dir", tmp_path, *bad)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert "plan:" not in out


def test_a_request_nothing_fits_gets_one_line(ckpt, tmp_path):
    code, out, err = run_plan("--model", "opt-1.3b", "--prompt-len", 8, "--gen-len", 4, "--cpu-mem", 0.2,
                              "--offload-dir", tmp_path, "--dtype", "float32")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: no placement fits"), err
    assert "GiB more host memory" in err


def test_auto_run_gives_the_tokens_of_a_hand_written_policy(ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    outs = {}
    for name, policy in [("auto", []), ("disk", ["--percent", 0, 0, 0, 0, 100, 0, "--gpu-batch-size", 2])]:
        out, log = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-log.jsonl"
        code, stdout, stderr = run_cli("--model", ckpt, "--prompts", prompts, "--gen-len", 5, "--dtype", "float32",
                                       "--offload-dir", tmp_path / "off", "--output", out, "--log-file", log, *policy)
        assert code == 0, stderr
        assert "predicted:" in stdout and "measured:" in stdout
        entry = json.loads(log.read_text().splitlines()[-1])
        assert entry["plan"]["auto"] is (name == "auto") and entry["plan"]["predicted_throughput"] > 0
        outs[name] = [json.loads(line)["output_ids"] for line in out.read_text().splitlines()]
        if name == "auto":
            before = stdout[:stdout.index("plan: 5 prompts")].splitlines()  # the machine may be measured first
            assert [line.split(" ")[0] for line in before] in ([], ["measuring", "measured"]), stdout
            assert "w_gpu_percent=100" in entry["policy"]
    assert outs["auto"] == outs["disk"]


def test_a_policy_far_from_the_best_is_warned_about(ckpt, tmp_path):
    """Everything on disk, one sequence per batch, for a model that fits in memory many times over."""
    code, stdout, stderr = run_cli("--model", ckpt, "--prompt-len", 8, "--num-prompts", 16, "--gen-len", 4,
                                   "--percent", 0, 0, 0, 0, 0, 0, "--gpu-batch-size", 1, "--overlap", 0,
                                   "--dtype", "float32", "--offload-dir", tmp_path)
    assert code == 0, stderr
    assert "warning: the planner expects" in stderr and "--policy auto" in stderr


def test_cpu_mem_holds_the_engine_to_it(ckpt, tmp_path):
    code, _, stderr = run_cli("--model", ckpt, "--percent", 100, 0, 100, 0, 100, 0, "--dtype", "float32",
                              "--cpu-mem", 0.01, "--offload-dir", tmp_path, "--gen-len", 2, "--prompt-len", 4)
    assert code == 2 and stderr.startswith("error: not enough host memory") and "--cpu-mem 0.01 GiB" in stderr, stderr


def test_policy_auto_in_python(ckpt, tmp_path):
    policy = auto_policy(ckpt, prompt_len=8, gen_len=4, num_prompts=8, offload_dir=str(tmp_path), dtype="float32")
    assert policy.tier_percents("w") == (100, 0, 0) and policy.block_size <= 8 and policy.planned_dtype == "float32"
    with Engine.from_pretrained(ckpt, policy=policy, offload_dir=tmp_path, dtype=policy.planned_dtype) as engine:
        ids = engine.generate(PROMPTS, max_new_tokens=3, new_tokens_only=True)
    assert len(ids) == len(PROMPTS) and all(len(i) == 3 for i in ids)


@pytest.mark.parametrize("source", ["available RAM", "memory cgroup limit"])
def test_budgets_leave_the_code_its_pages_once(source, monkeypatch, tmp_path):
    """The program's resident file pages are taken off a budget that does not count them already
    (free RAM counts them as reclaimable); a cgroup's usage already holds them: only the room the
    run's code grows into is kept back there."""
    from flexgen_dist.core.types import GiB
    from flexgen_dist.runtime.budget import MARGIN
    monkeypatch.setattr(hardware, "host_available", lambda: (8 * GiB, source))
    got = hardware.budgets(torch.device("cpu"), str(tmp_path)).host
    resident = limits.code_reserve() - limits.CODE_RESERVE
    assert resident > 0
    kept = limits.CODE_RESERVE + (resident if source == "available RAM" else 0)
    assert got == pytest.approx((8 * GiB - kept) / MARGIN, rel=1e-3)


def test_plan_takes_the_model_and_workload_flags_of_run(ckpt, tmp_path):
    """`--dummy-weights` (which `run` needs for a built-in name) and `--prompts` are `plan`'s too:
    the plan is for the file's requests, the longest prompt and generation among them."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS[:3]))
    code, out, err = run_plan("--model", ckpt, "--dummy-weights", "--prompts", prompts, "--gen-len", 4,
                              "--dtype", "float32", "--offload-dir", tmp_path / "off-{rank}")
    assert code == 0, err
    longest = max(len(p) for p in PROMPTS[:3])
    assert f"plan: 3 prompts of {longest}" in out, out
    assert (tmp_path / "off-0").is_dir()  # {rank} as rank 0 would have it


def test_plan_and_run_define_their_shared_flags_once():
    def shared(parser) -> dict:
        return {a.dest: (a.option_strings, a.default, a.help, a.type, a.choices) for a in parser._actions
                if a.dest in flags.SHARED_FIELDS}
    plan, run = shared(plan_parser()), shared(run_parser())
    assert set(plan) == set(flags.SHARED_FIELDS) and plan == run
    assert {"dummy_weights", "prompts", "max_new_tokens", "tokenizer"} <= set(plan)
