"""The dtype and kernel probe: both of its outcomes are run on every CPU by forcing it, so an
AVX-512/AMX machine also runs the no-bf16 path and an AVX2-only machine the bf16 one."""
import json

import pytest
import torch
from conftest import PROMPTS, count_int4_products, reference_generate
from flexgen_dist import Engine, Policy
from flexgen_dist.kernels import compiled, int4, probe
from flexgen_dist.kernels import linear as kernels
from flexgen_dist.run import main

CACHED = (probe.pack_supported, probe.bf16_speedup, probe.int4_choice, int4.int4_cpu_block)


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """No forcing inherited from the environment, and no answers cached by an earlier test."""
    monkeypatch.delenv(probe.BF16_ENV, raising=False)
    monkeypatch.delenv(probe.PACK_ENV, raising=False)
    monkeypatch.delenv(probe.INT4_ENV, raising=False)
    for fn in CACHED:
        fn.cache_clear()
    yield
    for fn in CACHED:  # a test may have forced an answer that later tests must not inherit
        fn.cache_clear()


@pytest.fixture(scope="module")
def reference(opt_checkpoint):
    return reference_generate(opt_checkpoint[1], PROMPTS, 6)


def test_forced_no_bf16_runs_float32_exactly(opt_checkpoint, reference, tmp_path, monkeypatch):
    """The AVX2-only outcome: auto picks float32, nothing is packed, tokens equal transformers'."""
    monkeypatch.setenv(probe.BF16_ENV, "0")
    monkeypatch.setenv(probe.PACK_ENV, "0")
    with Engine.from_pretrained(opt_checkpoint[0], policy=Policy(gpu_batch_size=5), offload_dir=tmp_path) as engine:
        assert engine.dtype == torch.float32
        assert engine.kernels == {"dtype": "float32", "dtype_reason": "forced by FLEXGEN_CPU_BF16=0",
                                  "linear": "F.linear"}
        ids = engine.generate(PROMPTS, max_new_tokens=6)
    assert torch.equal(ids, reference[0])


@pytest.mark.parametrize("pack", ["1", "0"])
def test_forced_bf16_runs_close_to_float32(opt_checkpoint, reference, tmp_path, monkeypatch, pack):
    """The AMX/AVX-512 outcome, with and without prepacked weights (packing only where the op
    really works on this CPU). bf16 is not bit-exact; the first step's logits stay close."""
    monkeypatch.setenv(probe.BF16_ENV, "1")
    monkeypatch.setenv(probe.PACK_ENV, pack)
    with Engine.from_pretrained(opt_checkpoint[0], policy=Policy(gpu_batch_size=5), offload_dir=tmp_path) as engine:
        assert engine.dtype == torch.bfloat16
        packs = pack == "1" and probe.pack_supported()
        assert engine.kernels["linear"] == ("oneDNN prepacked bf16" if packs else "F.linear")
        resident = [h.value for h in engine.executor.homes.values() if isinstance(h.value, torch.Tensor)]
        assert any(t.is_mkldnn for t in resident) == packs
        _, logits = engine.generate(PROMPTS, max_new_tokens=1, return_logits=True)
    torch.testing.assert_close(logits[0], reference[1][0].float(), atol=0.1, rtol=0.05)


def test_packing_falls_back_when_the_op_raises(monkeypatch):
    """What an AVX2-only CPU does: oneDNN's packing raises, so bf16 weights stay plain."""
    def refuse(*args):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert "
                           "or avx512bw, avx512vl and avx512dq")
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    assert probe.pack_supported() is False
    assert not kernels.can_pack(torch.device("cpu"), torch.bfloat16)
    assert kernels.describe(torch.device("cpu"), torch.bfloat16) == "F.linear"


def test_dtype_choice_follows_the_measurement(monkeypatch):
    monkeypatch.setattr(probe, "cpu_has_bf16_path", lambda: False)
    monkeypatch.setattr(probe, "bf16_speedup", lambda dim: pytest.fail("no bf16 path: nothing to time"))
    assert probe.choose_cpu_dtype(2048).dtype == torch.float32
    monkeypatch.setattr(probe, "cpu_has_bf16_path", lambda: True)
    monkeypatch.setattr(probe, "bf16_speedup", lambda dim: 0.7)  # a bf16 path that is still slower
    assert probe.choose_cpu_dtype(2048).dtype == torch.float32
    monkeypatch.setattr(probe, "bf16_speedup", lambda dim: 3.0)
    choice = probe.choose_cpu_dtype(2048)
    assert choice.dtype == torch.bfloat16 and choice.bf16_vs_fp32 == 3.0 and "3.0x faster" in choice.reason


def test_real_probe_answers_consistently():
    """Whatever this CPU is: bf16 is chosen only with a oneDNN bf16 path, and the timing is cached."""
    choice = probe.choose_cpu_dtype(512)
    if not probe.cpu_has_bf16_path():
        assert choice.dtype == torch.float32
    if choice.dtype == torch.bfloat16:
        assert choice.bf16_vs_fp32 > 1.1
    if choice.bf16_vs_fp32 is not None:
        assert probe.bf16_speedup.cache_info().currsize == 1
        assert probe.choose_cpu_dtype(512) == choice


def test_explicit_bf16_on_a_cpu_without_it_warns_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probe, "cpu_has_bf16_path", lambda: False)
    monkeypatch.setattr(probe, "bf16_speedup", lambda dim: 1 / 125)
    log = tmp_path / "log.jsonl"
    assert main(["--model", "opt-125m", "--dummy-weights", "--prompt-len", "4", "--gen-len", "2", "--dtype",
                 "bfloat16", "--offload-dir", str(tmp_path), "--log-file", str(log)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: this CPU has no fast bf16 path: a bf16 matmul measured 125x slower than "
                        "float32 here; --dtype auto (or float32) is faster"]
    assert "dtype bfloat16 (requested)" in captured.out
    record = json.loads(log.read_text())
    assert record["dtype"] == "bfloat16" and record["dtype_reason"] == "requested" and "linear" in record


def test_report_and_log_name_the_probed_dtype(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(probe.BF16_ENV, "0")
    log = tmp_path / "log.jsonl"
    assert main(["--model", "opt-125m", "--dummy-weights", "--prompt-len", "4", "--gen-len", "2",
                 "--offload-dir", str(tmp_path), "--log-file", str(log)]) == 0
    out = capsys.readouterr().out
    assert "dtype float32 (forced by FLEXGEN_CPU_BF16=0), linear layers: F.linear" in out
    record = json.loads(log.read_text())
    assert (record["dtype"], record["linear"]) == ("float32", "F.linear")


# ----- packed int4 matmul --------------------------------------------------------------------
def compressed_tokens(path, tmp_path, dtype="float32"):
    policy = Policy(gpu_batch_size=5, compress_weight=True)
    with Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, dtype=dtype) as engine:
        return engine.kernels["compressed_linear"], engine.generate(PROMPTS, max_new_tokens=6)


@pytest.mark.parametrize("failure", ["raise", "wrong"])
def test_int4_falls_back_to_dequantizing_when_the_kernel_fails(opt_checkpoint, tmp_path, monkeypatch, failure,
                                                              cpu_int4_kernel):
    """A kernel (compiled or PyTorch's) that raises (no int4 path for this CPU or dtype) or
    computes something else is not used even when forced on: the run dequantizes and gives the
    tokens of a run forced off."""
    monkeypatch.setenv(probe.INT4_ENV, "0")
    off_kernels, expected = compressed_tokens(opt_checkpoint[0], tmp_path / "off")
    assert off_kernels == "dequantize + dense (forced by FLEXGEN_INT4=0)"

    def broken(x, w, group_size, scales_zeros):
        if failure == "raise":
            raise RuntimeError("_weight_int4pack_mm_cpu: expect A to be either 32-bit or 16-bit float tensor.")
        return torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)
    if cpu_int4_kernel == "compiled":
        monkeypatch.setattr(compiled, "int4_mm", lambda kernel, x, w, path: broken(x, w.data, 0, None))
    else:
        monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", broken)
    monkeypatch.setenv(probe.INT4_ENV, "1")
    probe.int4_choice.cache_clear()
    calls = count_int4_products(monkeypatch)
    described, tokens = compressed_tokens(opt_checkpoint[0], tmp_path / "on")
    why = "fails here" if failure == "raise" else "differs from the dequantized one"
    assert described.startswith("dequantize + dense (the int4 kernel") and why in described
    assert not calls
    assert torch.equal(tokens, expected)


def test_int4_choice_follows_the_measurement(monkeypatch):
    """A float32 model's kernel is tried fed float32 and bf16 activations; the faster feed wins if
    it beats dequantize + dense (an AVX2-only CPU: only the bf16 feed; AMX: neither)."""
    measured = {}
    monkeypatch.setattr(probe, "int4_speedups", lambda dtype, feeds: [measured[f] for f in feeds])
    measured.update({torch.float32: 0.5, torch.bfloat16: 0.9})
    assert not probe.int4_choice("cpu", torch.float32, True).use
    probe.int4_choice.cache_clear()
    measured.update({torch.float32: 4.0, torch.bfloat16: 0.9})
    choice = probe.int4_choice("cpu", torch.float32, True)
    assert choice.use and choice.activations == torch.float32 and choice.reason.endswith("4.0x faster "
                                                                                        "than dequantize + dense for a decode step")
    probe.int4_choice.cache_clear()
    measured.update({torch.float32: 0.1, torch.bfloat16: 5.0})
    choice = probe.int4_choice("cpu", torch.float32, True)
    assert choice.use and choice.activations == torch.bfloat16 and "5.0x faster" in choice.reason
    assert "fed bfloat16 activations" in choice.reason
    assert not probe.int4_choice("mps", torch.float32, True).use  # no kernel wired for that device


def test_an_explicit_dtype_is_never_fed_lower(monkeypatch):
    """Asked for float32, the kernel is tried fed float32 only: used where that feed pays, else not
    at all (even where a bf16 feed would pay, or FLEXGEN_INT4=bf16 asks for one); auto may lower it."""
    tried = []
    measured = {torch.float32: 3.0, torch.bfloat16: 6.0}
    monkeypatch.setattr(probe, "int4_speedups", lambda dtype, feeds: tried.append(feeds) or [measured[f] for f in feeds])
    choice = probe.int4_choice("cpu", torch.float32, False)
    assert tried == [[torch.float32]] and choice.use and choice.activations == torch.float32
    assert choice.reason == "3.0x faster than dequantize + dense for a decode step, fed float32 activations as --dtype float32 asks"
    assert probe.int4_choice("cpu", torch.float32, True).activations == torch.bfloat16
    measured[torch.float32] = 0.05  # an AVX2-only CPU's float32 int4 product
    probe.int4_choice.cache_clear()
    choice = probe.int4_choice("cpu", torch.float32, False)
    assert not choice.use and choice.activations is None and "0.05x" in choice.reason
    monkeypatch.setenv(probe.INT4_ENV, "bf16")
    probe.int4_choice.cache_clear()
    choice = probe.int4_choice("cpu", torch.float32, False)
    assert not choice.use and choice.reason == "FLEXGEN_INT4=bf16 asks for bf16 activations, which --dtype float32 does not allow"
    assert probe.resolve_dtype("float32", torch.device("cpu"), 64).requested == "float32"
    assert not probe.resolve_dtype(torch.float32, torch.device("cpu"), 64).lower_feed_ok


def test_int4_forced_feeds(monkeypatch):
    """FLEXGEN_INT4=1 keeps a float32 model's own (exact) feed; =bf16 feeds bf16 activations."""
    monkeypatch.setenv(probe.INT4_ENV, "1")
    assert probe.int4_choice("cpu", torch.float32, True).activations == torch.float32
    monkeypatch.setenv(probe.INT4_ENV, "bf16")
    probe.int4_choice.cache_clear()
    choice = probe.int4_choice("cpu", torch.float32, True)
    assert choice.activations == torch.bfloat16 and choice.reason == ("forced by FLEXGEN_INT4=bf16, fed bfloat16 "
                                                                           "activations, which --dtype auto allows")


def test_int4_kernel_reading_an_unknown_layout_is_not_used(monkeypatch):
    """A CPU whose conversion op writes neither known layout, and no compiled kernel: the engine's
    codes would be read wrong, so PyTorch's kernel is not used even when forced."""
    from conftest import _force_cpu_kernel
    clear = _force_cpu_kernel(monkeypatch, "0")
    monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", lambda codes, inner: codes.byte()[:, ::2])
    int4.int4_cpu_block.cache_clear()
    monkeypatch.setenv(probe.INT4_ENV, "1")
    try:
        choice = probe.int4_choice("cpu", torch.float32, True)
    finally:
        int4.int4_cpu_block.cache_clear()
        clear()
    assert not choice.use and choice.reason == "the int4 kernel reads a layout this engine does not write"


def test_forced_int4_in_bf16_stays_close_to_dequantizing(opt_checkpoint, tmp_path, monkeypatch):
    """The AMX/AVX-512 outcome in its own dtype: packed and dequantized bf16 products differ only
    in summation order, so the first token of every prompt agrees."""
    monkeypatch.setenv(probe.BF16_ENV, "1")
    runs = {}
    for forced in ("1", "0"):
        monkeypatch.setenv(probe.INT4_ENV, forced)
        probe.int4_choice.cache_clear()
        runs[forced] = compressed_tokens(opt_checkpoint[0], tmp_path / forced, dtype="auto")
    if not runs["1"][0].startswith("packed int4"):
        pytest.skip(f"no bf16 int4 kernel on this CPU: {runs['1'][0]}")
    width = max(map(len, PROMPTS))
    assert torch.equal(runs["1"][1][:, :width + 1], runs["0"][1][:, :width + 1])


def test_report_names_the_compressed_linear_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(probe.BF16_ENV, "0")
    monkeypatch.setenv(probe.INT4_ENV, "0")
    log = tmp_path / "log.jsonl"
    assert main(["--model", "opt-125m", "--dummy-weights", "--prompt-len", "4", "--gen-len", "2", "--compress-weight",
                 "--offload-dir", str(tmp_path), "--log-file", str(log)]) == 0
    assert "4-bit linear layers: dequantize + dense (forced by FLEXGEN_INT4=0)" in capsys.readouterr().out
    assert json.loads(log.read_text())["compressed_linear"] == "dequantize + dense (forced by FLEXGEN_INT4=0)"
