"""The peer benchmark harness: result parsing and aggregation, the memory-limit wrapper, the
figures, and one tiny end-to-end run of all three systems (timings themselves are benchmarks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_checkpoint

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmark")
sys.path.insert(0, BENCH)
import bench_peers  # noqa: E402
import peer_results  # noqa: E402
import plot  # noqa: E402

LIMIT = os.path.join(BENCH, "with_memory_limit.sh")


def row(label, system, batch, throughput=None, status="ok", scenario="disk", **extra):
    r = {"scenario": scenario, "label": label, "system": system, "batch": batch, "status": status, "model": "opt-1.3b",
         "prompt_len": 32, "gen_len": 32, "memory_limit": "2G", "limit_enforced": True, "disk_bound": True, **extra}
    if status == "ok":
        latency = batch * 32 / throughput
        r.update(throughput=throughput, latency_s=latency, prefill_s=latency / 4, decode_s=latency * 3 / 4,
                 page_cache_dropped=True, disk_read_bytes=2e9, peak_rss_bytes=2**30, cgroup_peak_bytes=2**31)
    return r


ROWS = [row("flexgen-dist", "flexgen", 32, 14.0), row("flexgen-dist", "flexgen", 128, 30.0, ngb=2),
        row("flexgen-dist", "flexgen", 256, status="oom", error="over the 2G limit"),
        row("flexgen-dist 4-bit", "flexgen", 128, 36.0, ngb=2),
        row("Accelerate", "accelerate", 8, 4.0), row("Accelerate", "accelerate", 32, 12.0),
        row("Accelerate", "accelerate", 64, status="error", error="error: boom"),
        row("flexgen-dist", "flexgen", 8, 60.0, scenario="memory"), row("transformers", "transformers", 8, 50.0,
                                                                        scenario="memory")]


def test_best_runs_and_ratios_use_each_systems_best_batch():
    best = peer_results.best_runs(ROWS, "disk")
    assert {k: v["batch"] for k, v in best.items()} == {"flexgen-dist": 128, "flexgen-dist 4-bit": 128, "Accelerate": 32}
    # this project's best over its plain and compressed rows, against the peer's best
    assert peer_results.ratios(ROWS, "disk") == {"Accelerate": pytest.approx(3.0)}
    assert peer_results.ratios(ROWS, "memory") == {"transformers": pytest.approx(1.2)}


def test_tables_show_the_workload_failures_and_ratios():
    table = peer_results.peer_table(ROWS, "disk")
    assert "| flexgen-dist | 64×2 | 30.00 |" in table
    assert "| Accelerate | 32 | 12.00 |" in table and "| 3.00× |" in table
    runs = peer_results.runs_table(ROWS, "disk")
    assert "oom: over the 2G limit" in runs and "error: error: boom" in runs
    text = peer_results.workload_text(ROWS, "disk")
    assert "32 prompt tokens and 32 generated tokens" in text
    assert "generated tokens / (prefill + decode time)" in text and "enforced by a memory cgroup" in text
    unlimited = [dict(r, limit_enforced=False, page_cache_dropped=False) for r in ROWS]
    text = peer_results.workload_text(unlimited, "disk")
    assert "NOT enforced" in text and "NOT dropped" in text
    failed = [row("Accelerate", "accelerate", 8, status="oom")] + ROWS[:2]
    assert "no successful run (oom)" in peer_results.peer_table(failed, "disk")


def test_load_rows_names_the_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [r["batch"] for r in peer_results.load_rows(str(path))] == [32, 128]
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"r.jsonl:2: not JSON"):
        peer_results.load_rows(str(path))
    path.write_text(json.dumps({"label": "x"}) + "\n")
    with pytest.raises(ValueError, match=r":1: a run needs scenario, system, batch, status"):
        peer_results.load_rows(str(path))
    path.write_text(json.dumps({**ROWS[0], "throughput": "fast"}) + "\n")
    with pytest.raises(ValueError, match="numeric throughput"):
        peer_results.load_rows(str(path))


def test_results_section_is_replaced_in_place():
    text = "# Results\n\nintro\n"
    once = peer_results.replace_section(text, "cpu-quick", "table v1")
    assert once.startswith(text.rstrip("\n")) and "table v1" in once
    twice = peer_results.replace_section(once + "\n## later\n", "cpu-quick", "table v2")
    assert "table v1" not in twice and twice.count("table v2") == 1 and twice.endswith("## later\n")
    assert "table v2" in peer_results.replace_section(twice, "other", "x") and twice.count("peers:cpu-quick:begin") == 1


def test_parse_batch():
    assert bench_peers.parse_batch("32") == (32, 1)
    assert bench_peers.parse_batch("64x2") == (128, 2)
    with pytest.raises(ValueError):
        bench_peers.parse_batch("0x2")


def test_figures_are_written_as_png(tmp_path):
    paths = plot.write_figures(ROWS, str(tmp_path), "t")
    assert [os.path.basename(p) for p in paths] == ["t-latency-throughput.png", "t-bars.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 10_000  # axes, lines and labels, not an empty canvas
    with pytest.raises(ValueError, match="no successful runs"):
        plot.write_figures([r for r in ROWS if r["status"] != "ok"], str(tmp_path), "t")


def run_limited(limit, *cmd, env=None, report=None):
    env = {**os.environ, **(env or {})}
    if report:
        env["MEMLIMIT_REPORT"] = str(report)
    return subprocess.run([LIMIT, limit, "--", *cmd], capture_output=True, text=True, env=env, timeout=120)


def test_memory_limit_falls_back_with_a_warning(tmp_path):
    report = tmp_path / "r.json"
    done = run_limited("1G", "sh", "-c", "echo ran; exit 3", env={"FLEXGEN_CGROUP_ROOT": str(tmp_path / "none")},
                       report=report)
    assert done.returncode == 3 and done.stdout == "ran\n"
    assert "WITHOUT a memory limit" in done.stderr
    assert json.loads(report.read_text()) == {"limit_bytes": None, "enforced": False, "peak_bytes": None,
                                              "oom_kills": 0, "rc": 3}
    bad = run_limited("1X", "true")
    assert bad.returncode == 2 and "bad memory limit '1X'" in bad.stderr


def cgroup_writable() -> bool:
    own = [line.split(":")[2].strip() for line in open("/proc/self/cgroup") if line.split(":")[1] == "memory"]
    return bool(own) and os.access(f"/sys/fs/cgroup/memory{own[0].rstrip('/')}", os.W_OK)


@pytest.mark.skipif(not cgroup_writable(), reason="needs root and a cgroup v1 memory controller")
def test_memory_limit_is_enforced_page_cache_included(tmp_path):
    report = tmp_path / "r.json"
    inside = run_limited("256M", sys.executable, "-c",
                         "import re; g = [l for l in open('/proc/self/cgroup') if ':memory:' in l][0].split(':')[2].strip();"
                         "print(open('/sys/fs/cgroup/memory' + g + '/memory.limit_in_bytes').read().strip())",
                         report=report)
    assert inside.returncode == 0 and inside.stdout.strip() == str(256 * 2**20)
    assert json.loads(report.read_text())["enforced"] is True
    killed = run_limited("128M", sys.executable, "-c", "a = bytearray(400 << 20); a[::4096] = b'x' * len(a[::4096])",
                         report=report)
    assert killed.returncode == 137 and "killed for exceeding 128M" in killed.stderr
    assert json.loads(report.read_text())["oom_kills"] >= 1
    # reading a file larger than the limit leaves the cgroup's usage (page cache included) under it
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1 << 20) * 200)
    read = run_limited("64M", "sh", "-c", f"cat {big} > /dev/null", report=report)
    assert read.returncode == 0 and json.loads(report.read_text())["peak_bytes"] <= 64 * 2**20


def test_gpu_presets_print_their_commands(capsys):
    assert bench_peers.main(["print", "--preset", "gpu-opt-30b"]) == 0
    out = capsys.readouterr().out
    assert "208 GB RAM" in out and out.count("with_memory_limit.sh 208G --") == 6
    assert "checkpoint opt-30b --dtype float16 --out" in out
    assert '"percent": [20, 80, 0, 100, 0, 100]' in out and '"max_memory": {"0": "15GiB"' in out


def test_tiny_end_to_end_run_of_all_three_systems(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, post_ln=False)
    plans = [bench_peers.SystemPlan("flexgen-dist", "flexgen", ["2", "2x2"], {"percent": [0, 0, 100, 0, 100, 0]}),
             bench_peers.SystemPlan("transformers generate", "transformers", ["2"]),
             bench_peers.SystemPlan("transformers + Accelerate", "accelerate", ["2"], {"max_memory": {"cpu": "150KB"}})]
    preset = bench_peers.Preset("tiny", "test", [bench_peers.Scenario("tiny", str(ckpt), 8, 4, "1G", False, plans)])
    runner = bench_peers.Runner(preset, str(tmp_path / "work"), run_timeout=300, log=lambda m: None)
    rows = runner.run()
    assert [(r["label"], r["batch"], r["status"]) for r in rows] == [
        ("flexgen-dist", 2, "ok"), ("flexgen-dist", 4, "ok"), ("transformers generate", 2, "ok"),
        ("transformers + Accelerate", 2, "ok")], [r.get("error") for r in rows]
    for r in rows:
        assert r["throughput"] == pytest.approx(r["batch"] * 4 / (r["prefill_s"] + r["decode_s"]))
        assert r["prefill_s"] > 0 and r["decode_s"] > 0
    assert "disk" in rows[-1]["placement"]  # Accelerate really left weights on disk
    assert rows[1]["disk_read_bytes"] >= 0 and rows[0]["limit_enforced"] in (True, False)
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = peer_results.load_rows(str(path))
    assert set(peer_results.ratios(loaded, "tiny")) == {"transformers generate", "transformers + Accelerate"}
    figures = plot.write_figures(loaded, str(tmp_path / "fig"), "tiny")
    assert all(os.path.getsize(p) > 10_000 for p in figures)


def test_dummy_checkpoint_is_one_every_system_reads_alike(tmp_path):
    """The checkpoint the peers share: a valid transformers OPT (tied head, initialised like
    transformers does), on which this project's greedy tokens equal transformers' own."""
    import torch
    from conftest import reference_generate
    from flexgen_dist import Engine
    from transformers import OPTForCausalLM
    path = bench_peers.write_dummy_checkpoint("opt-125m", str(tmp_path / "c"), dtype="float32")
    shard = os.path.join(path, "model-00000.safetensors")
    stamp = os.stat(shard).st_mtime_ns
    assert bench_peers.write_dummy_checkpoint("opt-125m", path, dtype="float32") == path
    assert os.stat(shard).st_mtime_ns == stamp  # written once
    model = OPTForCausalLM.from_pretrained(path).eval()
    assert torch.equal(model.lm_head.weight, model.model.decoder.embed_tokens.weight)
    assert 0.018 < model.model.decoder.layers[3].fc1.weight.std() < 0.022
    assert torch.equal(model.model.decoder.layers[3].final_layer_norm.weight, torch.ones(768))
    prompts = [[2, 100, 200, 300, 400], [2, 7, 8]]
    expected, _ = reference_generate(model, prompts, max_new_tokens=4)
    engine = Engine.from_pretrained(path, offload_dir=tmp_path / "o", dtype="float32")
    try:
        assert torch.equal(engine.generate(prompts, max_new_tokens=4), expected)
    finally:
        engine.close()
