"""The llama.cpp comparison's pure parts on plain data: llama-batched-bench's JSON lines, the
engine's log line, medians over repetitions, the tables and their ratios, the figure (no
llama.cpp, no model run)."""
from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmark")
sys.path.insert(0, BENCH)
import bench_llamacpp
import llamacpp_results as lr
from peer_results import load_rows

BATCHED_BENCH = """0.02.068.088 W llama_context: n_ctx is not divisible by n_seq_max - rounding down to 8192
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, \
"n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 32, "pl": 1, "n_kv": 64, "t_pp": 0.5, "speed_pp": 64.0, \
"t_tg": 2.5, "speed_tg": 12.8, "t": 3.0, "speed": 21.3}
main: some log line {not json
{"n_kv_max": 8192, "pp": 32, "tg": 32, "pl": 8, "n_kv": 512, "t_pp": 2.0, "speed_pp": 128.0, "t_tg": 4.0, \
"speed_tg": 64.0, "t": 6.0, "speed": 85.3}
"""


def row(variant, batch, decode, prefill=100.0, rep=0, scenario="memory", run="run-1", status="ok", **extra):
    r = {"run": run, "scenario": scenario, "variant": variant, "label": lr.VARIANTS[variant][0],
         "system": lr.VARIANTS[variant][1], "batch": batch, "rep": rep, "status": status, "model": "llama-3.2-1b",
         "prompt_len": 32, "gen_len": 32, "threads": 2, **extra}
    if status == "ok":
        r.update(decode_tok_s=decode, prefill_tok_s=prefill, throughput=decode / 2, decode_s=1.0, prefill_s=1.0)
    return r


ROWS = [row("bf16", 1, 12.0), row("bf16", 8, 64.0), row("q4_0", 1, 40.0), row("q4_0", 8, 70.0),
        row("16bit", 1, 6.0, rep=0), row("16bit", 1, 9.0, rep=1), row("16bit", 1, 100.0, rep=2),  # median 9
        row("16bit", 8, 64.0), row("4bit", 1, 20.0), row("4bit", 8, 35.0), row("plan", 8, 77.0),
        row("4bit", 1, None, rep=1, status="error", error="exit 1"),
        row("16bit", 8, 2.0, scenario="disk", memory_limit="1700M", percent=[0, 0, 100, 0, 100, 0],
            limit_enforced=True, page_cache_dropped=True, cgroup_peak_bytes=2**30),
        row("4bit", 8, 6.0, scenario="disk", memory_limit="1700M", percent=[0, 0, 100, 0, 100, 0],
            limit_enforced=True, page_cache_dropped=True, cgroup_peak_bytes=2**29)]


def test_batched_bench_lines_are_read_by_batch_and_turned_into_rows():
    found = lr.parse_batched_bench(BATCHED_BENCH)
    assert sorted(found) == [1, 8] and found[8]["speed_tg"] == 64.0
    m = lr.llamacpp_measure(found[8], gen_len=32)
    assert (m["decode_tok_s"], m["prefill_tok_s"], m["decode_s"], m["prefill_s"]) == (64.0, 128.0, 4.0, 2.0)
    assert m["throughput"] == pytest.approx(8 * 32 / 6.0)
    assert lr.parse_batched_bench("error: failed to load model\n") == {}


def test_engine_log_line_is_read():
    log = {"prefill_latency_s": 1.0, "decode_latency_s": 3.0, "prefill_throughput": 256.0,
           "decode_throughput": 82.7, "generated_tokens": 256}
    m = lr.engine_measure(log)
    assert (m["decode_tok_s"], m["prefill_tok_s"], m["latency_s"]) == (82.7, 256.0, 4.0)
    assert m["throughput"] == 64.0


def test_medians_and_ratios_pair_each_engine_variant_with_its_llamacpp_counterpart():
    assert lr.medians(ROWS, "memory")["16bit"] == {1: 9.0, 8: 64.0}
    ratios = lr.engine_ratios(ROWS)
    assert ratios[("16bit", 1)] == pytest.approx(9 / 12) and ratios[("16bit", 8)] == pytest.approx(1.0)
    assert ratios[("4bit", 1)] == pytest.approx(20 / 40) and ratios[("4bit", 8)] == pytest.approx(0.5)
    assert ratios[("4bit/16bit", 1)] == pytest.approx(20 / 9)
    assert ratios[("plan", 8)] == pytest.approx(77 / 70)  # against llama.cpp's faster variant
    assert ("bf16", 1) not in ratios and ("plan", 1) not in ratios


def test_tables_show_ratios_failures_and_the_disk_scenario():
    table = lr.speed_table(ROWS)
    lines = table.splitlines()
    assert lines[0] == "| decode tok/s | batch 1 | batch 8 |"
    assert "| llama.cpp BF16 | 12.0 | 64.0 |" in lines
    assert "| flexgen-dist 16-bit | 9.0 (0.75× BF16) | 64.0 (1.00× BF16) |" in lines
    assert "| flexgen-dist 4-bit | 20.0 (0.50× Q4_0; 2.22× 16-bit) | 35.0 (0.50× Q4_0; 0.55× 16-bit) |" in lines
    assert "| flexgen-dist, its own plan | – | 77.0 (1.10× llama.cpp's faster) |" in lines
    assert lr.speed_table(ROWS, key="prefill_tok_s").startswith("| prefill tok/s |")
    disk = lr.disk_table(ROWS)
    assert "| 8 | 2.0 | 6.0 | 3.00× | 100.0 | 100.0 | 1.00 / 0.50 |" in disk
    text = lr.report_text(ROWS, "python bench_llamacpp.py run")
    assert "median of 3 repetition(s)" in text and "memory limit 1700M (enforced by a memory cgroup)" in text
    assert "- memory, flexgen-dist 4-bit, batch 1, rep 1: error (exit 1)" in text
    assert "llama.cpp not built" in text


def test_report_reads_the_last_run_of_an_appended_file(tmp_path):
    path = tmp_path / "r.jsonl"
    old = [dict(r, run="run-0", decode_tok_s=1.0) for r in ROWS if r["status"] == "ok"]
    path.write_text("".join(json.dumps(r) + "\n" for r in old + ROWS))
    rows = load_rows(str(path))
    assert lr.latest_run(rows) == ROWS and len(lr.latest_run(rows, "run-0")) == len(old)
    figure = tmp_path / "fig.png"
    assert bench_llamacpp.main(["report", str(path), "--figure", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no successful runs"):
        lr.write_figure([r for r in ROWS if r["status"] != "ok"], str(tmp_path / "none.png"))


def test_a_machine_without_a_compiler_gets_one_line(tmp_path):
    line = bench_llamacpp.skip_line(["C++ compiler", "cmake"])
    assert line == "skipped: llama.cpp needs a C and C++ compiler and cmake (C++ compiler, cmake missing)"
    assert "\n" not in line
    cache = bench_llamacpp.Cache(str(tmp_path), 2, log=lambda m: None)
    assert cache.configure_command()[-7:] == ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                                              "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                                              "-DLLAMA_OPENSSL=OFF"]


def test_engine_commands_use_the_documented_flags(tmp_path):
    import argparse
    args = argparse.Namespace(threads=2, prompt_len=32, gen_len=32, batches=[1, 8, 32])
    bench = object.__new__(bench_llamacpp.Bench)  # the command builders only read these two
    bench.args, bench.cache = args, bench_llamacpp.Cache(str(tmp_path), 2, log=lambda m: None)
    four = bench.engine_command("4bit", 8, 32, "log.jsonl")
    assert four[four.index("--percent") + 1:four.index("--percent") + 7] == ["100", "0", "100", "0", "100", "0"]
    assert four[-4:] == ["--compress-weight", "1", "--compress-embeddings", "1"]
    assert four[four.index("--gpu-batch-size") + 1] == "8" and four[four.index("--num-prompts") + 1] == "8"
    disk = bench.engine_command("16bit", 8, 32, "log.jsonl", disk=True)
    assert disk[disk.index("--percent") + 1] == "0" and "--compress-weight" not in disk
    assert bench.engine_command("plan", 8, 32, "l")[-4:] == ["--policy", "auto", "--auto-compress", "1"]
    ll = bench.llamacpp_command("q4_0", 32, [1, 8, 32])
    assert ll[ll.index("-npl") + 1] == "1,8,32" and ll[ll.index("-c") + 1] == "2048"
    assert ll[-2:] == ["--output-format", "jsonl"] and ll[2].endswith("/gguf/llama-3.2-1b-random-q4_0.gguf")


def test_missing_tools_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no compiler, no cmake
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    assert bench_llamacpp.missing_tools() == ["C compiler", "C++ compiler", "cmake"]


def test_a_llamacpp_run_killed_by_a_signal_runs_again_without_repacking(tmp_path):
    """A llama-batched-bench killed by a signal with no lines (its AMX matmul crashed on a Xeon) is
    run once more with --no-repack; its rows carry the reason, which the report prints."""
    import argparse
    bench = object.__new__(bench_llamacpp.Bench)
    bench.args = argparse.Namespace(threads=2, prompt_len=32, gen_len=32, batches=[1, 8])
    bench.cache = bench_llamacpp.Cache(str(tmp_path), 2, log=lambda m: None)
    bench.run_id, bench.machine, bench.llamacpp, bench.log, bench.logs = "run-1", {}, {}, lambda m: None, str(tmp_path)
    calls = []

    def process(cmd, name, env=None):
        calls.append(cmd)
        return (-11, "") if "--no-repack" not in cmd else (0, BATCHED_BENCH)
    bench.process = process
    rows = bench.run_llamacpp("q4_0", 0)
    assert len(calls) == 2 and calls[1][-1] == "--no-repack" and "--no-repack" not in calls[0]
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["decode_tok_s"] == 12.8
    assert rows[0]["llamacpp_note"] == "--no-repack: the default run was killed by signal 11"
    assert rows[0]["command"][-1] == "--no-repack"
    text = lr.report_text(ROWS + rows, "python bench_llamacpp.py run")
    assert "- llama.cpp Q4_0: --no-repack: the default run was killed by signal 11" in text

    bench.process = lambda cmd, name, env=None: calls.append(cmd) or (1, "")  # an ordinary failure: no retry
    calls.clear()
    assert [r["status"] for r in bench.run_llamacpp("q4_0", 0)] == ["error", "error"] and len(calls) == 1
