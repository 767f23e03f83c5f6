"""The compiled 4-bit CPU kernel: every vector path gives the dequantized product for any rows,
layout, group size and scale dtype; it is built once and cached; without a compiler (or turned
off) there is none and PyTorch's kernel is used; the engine's decode steps go through it."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import _force_cpu_kernel

from flexgen_dist.kernels import compiled, int4
from flexgen_dist.kernels import linear as kernels
from flexgen_dist.kernels.int4 import dequantize_int4, quantize_int4, with_scales_in


@pytest.fixture
def kernel(monkeypatch, tmp_path):
    """The kernel built afresh into a test cache."""
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "cache"))
    clear = _force_cpu_kernel(monkeypatch, "1")
    found, why = compiled.load()
    if found is None:
        clear()
        pytest.skip(f"no compiled kernel here: {why}")
    yield found
    clear()


def product(kernel, path, x, w):
    fed = compiled.input_dtype(path)
    return compiled.int4_mm(kernel, x.to(fed).contiguous(), w, path)


@pytest.mark.parametrize("path", sorted(compiled.PATH_NAMES))
@pytest.mark.parametrize("shape,group", [((200, 256), 32), ((128, 512), 64), ((64, 384), 128), ((100, 512), 256)])
def test_every_path_gives_the_dequantized_product(kernel, path, shape, group):
    """Rows 1 to 70 (each path's tiles and remainders: AMX's 16-row tiles too), N not a multiple
    of the block (padding skipped), float32 and bf16 scales; the AVX2 path also reads 32-row blocks
    (an AVX2 CPU's)."""
    if path not in kernel.paths:
        pytest.skip(f"this CPU has no {compiled.PATH_NAMES[path]} path")
    g = torch.Generator().manual_seed(group)
    weight = torch.randn(*shape, generator=g) * 0.02
    blocks = (64, 32) if path == compiled.AVX2_F32 else (64,)
    bf16 = compiled.input_dtype(path) == torch.bfloat16
    rows_tried = {compiled.AVX512_BF16_FOLD: (1, 2), compiled.AMX_BF16: (1, 3, 16, 17, 70)}.get(path, (1, 3, 5, 8, 13, 70))
    for block in blocks:
        for scales in (torch.bfloat16,) if bf16 else (torch.float32, torch.bfloat16):
            w = with_scales_in(quantize_int4(weight, group, block=block), scales)
            dense = dequantize_int4(w).float()
            for rows in rows_tried:
                x = torch.randn(rows, shape[1], generator=g).to(compiled.input_dtype(path)).float()
                got = product(kernel, path, x, w)
                want = x @ dense.T
                assert got.shape == (rows, shape[0])
                tol = (1e-2 if bf16 else 2e-5) * want.abs().max().item()
                assert (got - want).abs().max().item() <= tol, (block, scales, rows)


def test_bad_arguments_are_refused_not_read(kernel):
    """A layout a path does not read (the AVX-512 paths take 64-row blocks only) is refused
    before any memory is touched."""
    w = quantize_int4(torch.randn(64, 128), 32, block=32)
    if compiled.AVX512_F32 not in kernel.paths:
        pytest.skip("no AVX-512 path here")
    with pytest.raises(ValueError, match="refused"):
        compiled.int4_mm(kernel, torch.randn(1, 128), with_scales_in(w, torch.float32), compiled.AVX512_F32)


def test_amx_takes_more_than_two_rows_of_inputs_32_at_a_time(kernel):
    """Where the CPU has AMX, bf16 products of three rows or more take it, unless K is not a
    multiple of 32 (the tile width), which the C side refuses too; one or two rows keep the
    decode-light path."""
    if compiled.AMX_BF16 not in kernel.paths:
        pytest.skip("no AMX here")
    assert kernel.path_for(torch.bfloat16, 3, 64, 2048) == compiled.AMX_BF16
    assert kernel.path_for(torch.bfloat16, 2, 64, 2048) == compiled.AVX512_BF16_FOLD
    assert kernel.path_for(torch.bfloat16, 8, 64, 2064) == compiled.AVX512_BF16
    assert kernel.path_for(torch.float32, 8, 64, 2048) == compiled.AVX512_F32
    w = with_scales_in(quantize_int4(torch.randn(64, 144), 48, block=64), torch.bfloat16)
    with pytest.raises(ValueError, match="refused"):
        compiled.int4_mm(kernel, torch.randn(4, 144).bfloat16(), w, compiled.AMX_BF16)


def test_avx512bf16_forcing_keeps_every_path_but_amx(kernel, monkeypatch):
    clear = _force_cpu_kernel(monkeypatch, "avx512bf16")
    try:
        forced = compiled.kernel()
        assert compiled.AMX_BF16 not in forced.paths
        if compiled.AVX512_BF16 in kernel.paths:
            assert forced.path_for(torch.bfloat16, 8, 64, 2048) == compiled.AVX512_BF16
    finally:
        clear()


def test_avx2_forcing_keeps_only_the_avx2_path(kernel, monkeypatch):
    clear = _force_cpu_kernel(monkeypatch, "avx2")
    try:
        forced = compiled.kernel()
        assert forced.paths == {compiled.AVX2_F32}
        assert forced.path_for(torch.bfloat16, 1, 64) == compiled.AVX2_F32
        assert forced.path_for(torch.float32, 8, 32) == compiled.AVX2_F32
        assert forced.path_for(torch.float16, 8, 64) is None
    finally:
        clear()


def test_built_once_and_reused(kernel, monkeypatch, tmp_path):
    """A second process (a later run, another rank) loads the cached library without compiling."""
    cache = tmp_path / "cache"
    built = list(cache.glob("int4_gemm-*.so"))
    assert len(built) == 1 and not list(cache.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    code = "from flexgen_dist.kernels import compiled; k, why = compiled.load(); print(why)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, compiled.CACHE_ENV: str(cache)})
    assert run.returncode == 0 and run.stdout.startswith("compiled kernel (")
    assert "compiling" not in run.stderr
    assert built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("setting,reason", [({"CC": "/nonexistent/cc"}, "no C compiler found"),
                                            ({compiled.ENV: "0"}, "disabled by FLEXGEN_CKERNEL=0")])
def test_without_a_compiler_pytorchs_kernel_is_used(setting, reason, monkeypatch, tmp_path):
    """No compiler (or the kernel turned off): no kernel, said why, and 4-bit products still
    work through PyTorch's kernel or dequantize + dense."""
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "cache"))
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    compiled.load.cache_clear()
    try:
        found, why = compiled.load()
        assert found is None and why.startswith(reason)
        assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
        w = with_scales_in(quantize_int4(torch.randn(96, 128), 64), torch.float32)
        assert int4.compiled_path(w, 1) is None and int4.kernel_name(torch.float32, 64) == "PyTorch's int4 kernel"
        x = torch.randn(3, 128)
        torch.testing.assert_close(kernels.linear(x, w), x @ dequantize_int4(w).T, atol=1e-4, rtol=1e-4)
    finally:
        compiled.load.cache_clear()


def test_a_failed_build_leaves_nothing_behind(monkeypatch, tmp_path):
    """A compiler that fails: no kernel, the reason, and no half-written library in the cache."""
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\necho 'error: broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "cache"))
    compiled.load.cache_clear()
    try:
        found, why = compiled.load()
    finally:
        compiled.load.cache_clear()
    assert found is None and "could not be built" in why and "broken compiler" in why
    assert list((tmp_path / "cache").iterdir()) == []


def test_decode_steps_of_a_bf16_run_take_the_compiled_kernel(opt_checkpoint, tmp_path, monkeypatch, kernel):
    """A bf16 4-bit run on this CPU multiplies its decode steps with the compiled kernel (its
    BF16 paths where the CPU has them) and gives the tokens of PyTorch's kernel, or of
    dequantize + dense, up to bf16 rounding."""
    from conftest import PROMPTS as prompts
    from conftest import _force_int4

    from flexgen_dist.core.policy import Policy
    from flexgen_dist.engine.engine import Engine
    calls, original = [], compiled.int4_mm
    monkeypatch.setattr(compiled, "int4_mm", lambda k, x, w, path: calls.append((x.shape[0], path)) or original(k, x, w, path))
    clear = _force_int4(monkeypatch, True)
    try:
        policy = Policy(gpu_batch_size=2, compress_weight=True)
        with Engine.from_pretrained(opt_checkpoint[0], policy=policy, offload_dir=tmp_path / "a", dtype="bfloat16") as engine:
            described = engine.kernels["compressed_linear"]
            _, logits = engine.generate(prompts, max_new_tokens=1, return_logits=True)
            engine.generate(prompts, max_new_tokens=4)
    finally:
        clear()
    assert "compiled kernel" in described
    decode = [path for rows, path in calls if rows <= policy.gpu_batch_size]
    assert decode and set(decode) <= kernel.paths
    want_fold = compiled.AVX512_BF16_FOLD in kernel.paths
    assert (compiled.AVX512_BF16_FOLD in decode) == want_fold
    monkeypatch.setenv("FLEXGEN_INT4", "0")
    from flexgen_dist.kernels import probe
    probe.int4_choice.cache_clear()
    try:
        with Engine.from_pretrained(opt_checkpoint[0], policy=policy, offload_dir=tmp_path / "b", dtype="bfloat16") as engine:
            _, dense_logits = engine.generate(prompts, max_new_tokens=1, return_logits=True)
    finally:
        probe.int4_choice.cache_clear()
    got, want = logits[0].float().flatten(), dense_logits[0].float().flatten()
    assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.999
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
