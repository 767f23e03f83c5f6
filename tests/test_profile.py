"""One hardware profile per machine: measured once with all the machine's cores, by one process at
a time, and shared by runs of any thread count (a rank's rates derived from its share of the cores)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_checkpoint, run_cli
from test_pipeline import MPIRUN, mpirun

from flexgen_dist.planning import profile as hardware


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(path, post_ln=False)
    return str(path)


def profile_files(cache) -> list:
    return sorted((cache / "flexgen_dist" / "hardware").glob("*.json"))


def test_a_rank_with_fewer_threads_derives_its_compute_rates(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "machine_threads", lambda: 4)
    rates = {"matmul float32 any": 8e9, "attention decode float32 2/2x4": 4e9, "copy to compute": 1e10,
             "token choice 64": 4e9,
             "layer float32 opt 8/16/2/2 mlp decode 1": 0.004, "layer float32 opt 8/16/2/2 mlp decode 8": 0.008}
    whole = hardware.HardwareProfile({}, rates=dict(rates), threads=4)
    quarter = hardware.HardwareProfile({}, rates=dict(rates), threads=1)
    assert quarter.share == 0.25 and whole.share == 1.0
    assert quarter.matmul_rate(torch.float32, 8, 8, 8) == pytest.approx(whole.matmul_rate(torch.float32, 8, 8, 8) / 4)
    assert quarter.rate("attention decode float32 2/2x4") == pytest.approx(1e9)
    assert quarter.rate("copy to compute") == whole.rate("copy to compute")  # a copy is not the cores' share
    assert quarter.rate("token choice 64", 1e12) == pytest.approx(1e9) and quarter.rate("token choice 9", 5.0) == 5.0
    key = "layer float32 opt 8/16/2/2 mlp decode 0"
    assert quarter.layer_points(key) == [(1, pytest.approx(0.016)), (8, pytest.approx(0.032))]
    assert whole.layer_points(key) == [(1, 0.004), (8, 0.008)]


def test_the_cache_key_is_the_machine_not_the_threads(tmp_path):
    device, cache = torch.device("cpu"), str(tmp_path)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hardware.load_profile(device, cache_dir=cache)
        torch.set_num_threads(2)
        two = hardware.load_profile(device, cache_dir=cache)
    finally:
        torch.set_num_threads(threads)
    assert one.path == two.path and (one.threads, two.threads) == (1, 2)


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")
def test_a_2_rank_then_a_1_rank_run_measure_the_machine_once(ckpt, tmp_path, monkeypatch):
    """Both ranks of the first run start with an empty cache at once: one measures, the other
    waits and reads; the 1-rank run after it measures nothing."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    args = ["--model", ckpt, "--prompt-len", 8, "--gen-len", 2, "--num-prompts", 4, "--dtype", "float32",
            "--offload-dir", tmp_path / "off-{rank}", "--comm-timeout", 240]
    done = mpirun(2, ["-m", "flexgen_dist.run", *args], timeout=400)
    assert done.returncode == 0, done.stderr
    code, out, err = run_cli(*args, timeout=300)
    assert code == 0, err
    assert not any(line.startswith("measuring") for line in out.splitlines()), out
    [path] = profile_files(cache)
    history = json.loads(path.read_text())["history"]
    assert len(history) == 1, history
    assert history[0]["threads"] == hardware.machine_threads()  # measured with all the cores
