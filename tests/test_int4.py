"""The packed int4 layout: what the CPU kernel reads, within half a step of the weight, and the
dispatch between the kernel (few rows) and dequantize + dense (many rows)."""
import pytest
import torch
import torch.nn.functional as F
from flexgen_dist.core.compression import CompressionConfig
from flexgen_dist.kernels import int4, probe
from flexgen_dist.kernels import linear as kernels
from flexgen_dist.kernels.int4 import (
    Int4Weight,
    _to_layout,
    dequantize_int4,
    padded_rows,
    quantize_int4,
    weight_parts,
    with_scales_in,
)
from flexgen_dist.models.base import WeightSpec
from flexgen_dist.storage.store import TensorStore
from flexgen_dist.system.io import padded

HAS_CPU_KERNEL = hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="this PyTorch has no CPU int4 kernel")
@pytest.mark.parametrize("rows", [64, 192])
def test_layout_is_the_one_the_cpu_conversion_op_writes(rows):
    """The op's layout follows the CPU (64-row blocks with AVX-512, 32 with AVX2): the probe names
    one of ours, and converting the store's layout to it gives what the op writes."""
    codes = torch.randint(0, 16, (rows, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 2)
    block = int4.int4_cpu_block()
    assert block in int4.BLOCKS
    assert torch.equal(_to_layout(codes, block), expected)
    stored = Int4Weight(_to_layout(codes), torch.zeros(4, rows, 2), (rows, 256), 64, torch.float32)
    assert torch.equal(int4.to_block(stored, block).data, expected)


def test_every_layout_gives_the_same_weight_and_rows():
    """The 64-row layout shuffled into 32-row blocks (an AVX2 CPU's) is the same weight: dequantized
    and looked up row by row, bit for bit; it is what quantizing into 32-row blocks writes, and
    shuffles back."""
    w = torch.randn(200, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    avx512 = quantize_int4(w, 32)
    avx2 = int4.to_block(avx512, 32)
    assert avx2.block_n == 32 and not torch.equal(avx2.data, avx512.data)
    assert torch.equal(dequantize_int4(avx2), dequantize_int4(avx512))
    ids = torch.tensor([0, 15, 16, 31, 32, 47, 48, 63, 64, 199])
    assert torch.equal(kernels.embedding(ids, avx2), dequantize_int4(avx512)[ids])
    assert torch.equal(quantize_int4(w, 32, block=32).data, avx2.data)
    assert torch.equal(int4.to_block(avx2, 64).data, avx512.data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_within_half_a_step_and_padding_rows_are_zero(dtype):
    w = (torch.randn(100, 256, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    q = quantize_int4(w, 64)
    assert q.data.shape == (padded_rows(100), 128) and q.scales_zeros.shape == (4, 128, 2)
    assert q.nbytes == sum(weight_parts((100, 256), dtype, CompressionConfig(4, 64, 1)))
    step = q.scales_zeros[..., 0].T[:100].float().repeat_interleave(64, dim=1)
    err = (dequantize_int4(q).float() - w.float()).abs()
    # in bf16, (code - 8) * scale and the sum with zero are each rounded to the dtype
    rounding = 0 if dtype == torch.float32 else (w.float().abs() + 8 * step) * 2 ** -8
    assert (err <= step / 2 + rounding + 1e-7).all()
    assert not q.scales_zeros[:, 100:].any()


def test_weights_on_the_grid_come_back_exactly():
    """A weight that already went through quantization gets the same codes again, and its values
    back to float32 rounding (what the equivalence tests rely on)."""
    first = quantize_int4(torch.randn(64, 128, generator=torch.Generator().manual_seed(1)), 32)
    grid = dequantize_int4(first)
    again = quantize_int4(grid, 32)
    assert torch.equal(again.data, first.data)
    torch.testing.assert_close(dequantize_int4(again), grid, atol=1e-6, rtol=1e-6)


def test_a_large_weight_quantized_in_parts_is_the_weight_quantized_whole(monkeypatch):
    """Quantizing a vocabulary-sized table part by part (bounded temporaries) gives exactly the
    codes, scales and padding of quantizing it at once."""
    w = torch.randn(300, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    whole = quantize_int4(w, 32)
    monkeypatch.setattr(int4, "QUANTIZE_ROWS", 128)
    parts = quantize_int4(w, 32)
    assert torch.equal(parts.data, whole.data) and torch.equal(parts.scales_zeros, whole.scales_zeros)
    assert parts.shape == whole.shape == (300, 128)


@pytest.mark.parametrize("over", [None, 0, 1])
def test_few_rows_use_the_kernel_and_many_dequantize(over, cpu_int4_kernel, monkeypatch):
    """Up to the kernel's row limit (PyTorch's: 32; the compiled one's: 128) a product multiplies
    from the codes, above it dequantizes; `over` rows past the limit (None: one row)."""
    if cpu_int4_kernel == "torch" and not HAS_CPU_KERNEL:
        pytest.skip("this PyTorch has no CPU int4 kernel")
    limit = kernels.COMPILED_MAX_ROWS if cpu_int4_kernel == "compiled" else kernels.INT4_MAX_ROWS
    rows = 1 if over is None else limit + over
    g = torch.Generator().manual_seed(2)
    w = int4.with_scales_in(int4.int4_to_cpu_form(quantize_int4(torch.randn(96, 128, generator=g), 64)), torch.float32)
    assert kernels.max_kernel_rows(w, rows) == limit
    b = torch.randn(96, generator=g)
    x = torch.randn(1, rows, 128, generator=g)
    calls, original = [], int4.int4_mm
    monkeypatch.setattr(int4, "int4_mm", lambda x, w: calls.append(x.shape) or original(x, w))
    y = kernels.linear(x, w, b)
    assert y.shape == (1, rows, 96)
    torch.testing.assert_close(y, x @ dequantize_int4(w).T + b, atol=1e-4, rtol=1e-4)
    assert calls == ([(rows, 128)] if rows <= limit else [])


class _Source:
    fingerprint = "test:int4-layout"

    def get(self, name, shape, dtype):
        return torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)


def _store(root, monkeypatch, block: int | None = None) -> TensorStore:
    """A float32 4-bit store of one compressible weight, converted on a CPU whose kernel reads
    `block`-row blocks (forced; None: this CPU's own)."""
    if block is not None:
        monkeypatch.setattr(int4, "int4_cpu_block", lambda: block)
    store = TensorStore(str(root), _Source.fingerprint, torch.float32, CompressionConfig(4, 32))
    store.ensure([WeightSpec("w", "w", (200, 128), compressible=True, linear=True)], _Source(), progress=False)
    return store


def test_the_store_holds_the_layout_its_cpu_kernel_reads(tmp_path, monkeypatch):
    """4-bit codes are stored in the CPU kernel's layout, whichever this CPU's is (both forced), with
    a float32 weight's scales as bf16 (its bf16 grid: half the bytes), so loading them shuffles and
    converts nothing; the other layout is a store version of its own, the same weight bit for bit."""
    stores = {block: _store(tmp_path / "w", monkeypatch, block) for block in int4.BLOCKS}
    try:
        read = {block: store.read("w") for block, store in stores.items()}
        assert stores[64].root != stores[32].root
        assert [w.block_n for w in read.values()] == list(int4.BLOCKS)
        assert {w.scales_zeros.dtype for w in read.values()} == {torch.bfloat16}
        assert {w.dtype for w in read.values()} == {torch.float32}
        assert torch.equal(int4.to_block(read[64], 32).data, read[32].data)
        assert torch.equal(dequantize_int4(read[64]), dequantize_int4(read[32]))
        assert dequantize_int4(read[32]).dtype == torch.float32
        assert stores[32].file_bytes("w") == sum(map(padded, weight_parts((200, 128), torch.float32,
                                                                             CompressionConfig(4, 32))))
    finally:
        for store in stores.values():
            store.close()


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="this PyTorch has no CPU int4 kernel")
def test_a_disk_homed_weight_reaches_the_kernel_as_read(tmp_path, monkeypatch):
    """A weight read from the store is already in the form this CPU's kernel takes when fed bf16:
    no shuffle, no scale conversion, no copy per load."""
    from conftest import _force_int4
    clear = _force_int4(monkeypatch, "bf16")
    try:
        if not probe.int4_choice("cpu", torch.float32, True).use:
            pytest.skip("no int4 kernel fed bf16 on this CPU")
        store = _store(tmp_path / "w", monkeypatch)
        try:
            w = store.read("w")
            assert kernels.int4_for_device(w, torch.device("cpu"), torch.bfloat16) is w
        finally:
            store.close()
    finally:
        clear()


def test_many_rows_dequantize_into_one_reused_buffer():
    """Products that dequantize reuse one buffer per thread, grown to the largest weight: a smaller
    weight after a larger one still multiplies by exactly its own values (what a fresh tensor gives)."""
    kernels.release_dense_buffers()  # what earlier tests on this thread left
    g = torch.Generator().manual_seed(6)
    # float32 scales: fed float32, no AMX path (which multiplies any number of rows from the codes)
    large, small = (with_scales_in(quantize_int4(torch.randn(n, k, generator=g), 32), torch.float32)
                    for n, k in ((192, 256), (70, 64)))
    rows = max(kernels.COMPILED_MAX_ROWS, kernels.INT4_MAX_ROWS) + 8  # dequantized by either kernel
    x_large, x_small = torch.randn(rows, 256, generator=g), torch.randn(rows, 64, generator=g)
    y_large = kernels.linear(x_large, large)
    buffer = kernels._scratch.buffers[torch.float32]
    y_small = kernels.linear(x_small, small)
    assert kernels._scratch.buffers[torch.float32] is buffer and buffer.numel() >= 192 * 256
    assert torch.equal(y_large, F.linear(x_large, dequantize_int4(large)))
    assert torch.equal(y_small, F.linear(x_small, dequantize_int4(small)))
    assert torch.equal(dequantize_int4(small, out=torch.full((128, 64), float("nan")))[:70], dequantize_int4(small))
    kernels.release_dense_buffers()
    assert not getattr(kernels._scratch, "buffers", None)


def test_dequantizing_in_chunks_gives_the_whole_weight(monkeypatch):
    """Codes are unpacked a few blocks at a time (a small temporary); every chunk boundary lands on a
    block of the layout, in both layouts."""
    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(7))
    whole = {block: dequantize_int4(quantize_int4(w, 64, block)) for block in int4.BLOCKS}
    monkeypatch.setattr(int4, "DEQUANTIZE_CHUNK_BYTES", 64 * 256)  # one 64-row block, two 32-row ones
    for block in int4.BLOCKS:
        assert torch.equal(dequantize_int4(quantize_int4(w, 64, block)), whole[block])
    assert torch.equal(whole[32], whole[64])


def test_each_cpu_kinds_int4_layout_has_a_store_directory_of_its_own(tmp_path, monkeypatch):
    """Hosts of two CPU kinds sharing an offload dir each keep their own 4-bit store (each converts
    once, as each compression setting does); an uncompressed store does not depend on the layout."""
    from types import SimpleNamespace

    from flexgen_dist import Policy
    from flexgen_dist.storage.store import open_store
    model = SimpleNamespace(store_key="m", source=SimpleNamespace(fingerprint="test:dirs"))

    def root(block: int, compress: bool) -> str:
        monkeypatch.setattr(int4, "int4_cpu_block", lambda: block)
        return open_store(str(tmp_path), model, torch.float32, Policy(compress_weight=compress)).root
    packed = [root(block, True) for block in int4.BLOCKS]
    assert packed[0].endswith("-b64") and packed[1].endswith("-b32")
    assert root(64, False) == root(32, False)


def test_cuda_form_cannot_be_dequantized():
    w = quantize_int4(torch.randn(64, 64), 32)
    with pytest.raises(ValueError, match="cuda form"):
        dequantize_int4(Int4Weight(w.data, w.scales_zeros, w.shape, 32, w.dtype, form="cuda"))


@pytest.mark.parametrize("dtype, feed", [("bfloat16", "1"), ("float32", "bf16")])
def test_bf16_packed_run_matches_the_dequantized_run(opt_checkpoint, tmp_path, monkeypatch, dtype, feed):
    """With the kernel fed bf16 activations, in a bf16 model (where the int4 kernels are fast;
    tinygemm on a GPU takes nothing else) or a float32 one that --dtype auto chose (only auto
    allows the bf16 feed, the choice on an AVX2-only CPU),
    multiplying from the codes gives the logits dequantize + dense gives, to bf16 rounding, at
    every step of the same token sequence (the packed run is fed the dense run's tokens), and the
    same choice wherever the dense choice is not a near-tie (on an H200 one row of this tiny random
    model has its top two logits 0.008 apart); and the packed run really used the kernel for decode."""
    from conftest import PROMPTS, _force_int4, count_int4_products
    from flexgen_dist import Engine, Policy
    path, _ = opt_checkpoint
    tolerance = 0.05
    calls = count_int4_products(monkeypatch)
    fed = []
    original_mm = int4.int4_mm
    monkeypatch.setattr(int4, "int4_mm", lambda x, w: fed.append(w.scales_zeros.dtype) or original_mm(x, w))

    if dtype == "float32":  # auto, made to choose float32
        monkeypatch.setenv(probe.BF16_ENV, "0")

    def run(packed: bool, force=None):
        clear = _force_int4(monkeypatch, feed if packed else False)
        before = len(calls)
        engine = Engine.from_pretrained(path, policy=Policy(compress_weight=True, gpu_batch_size=5),
                                        offload_dir=tmp_path / str(packed),
                                        dtype="auto" if dtype == "float32" else dtype)
        try:
            assert engine.dtype == getattr(torch, dtype)
            if packed and not engine.executor.int4.use:
                pytest.skip(f"no int4 kernel fed bf16 for {dtype} on {engine.devices.compute}")
            ids, logits = engine.generate(PROMPTS, max_new_tokens=8, return_logits=True, force_tokens=force)
            return ids, logits, calls[before:]
        finally:
            engine.close()
            clear()
    dense_ids, dense_logits, dense_calls = run(False)
    width = dense_ids.shape[1] - len(dense_logits)
    _, packed_logits, packed_calls = run(True, force=dense_ids[:, width:])
    assert packed_calls and min(packed_calls) <= kernels.INT4_MAX_ROWS and not dense_calls
    assert set(fed) == {torch.bfloat16}
    for mine, theirs in zip(packed_logits, dense_logits):
        torch.testing.assert_close(mine, theirs, atol=tolerance, rtol=tolerance)
        top2 = theirs.float().topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * tolerance
        assert torch.equal(mine.argmax(-1)[clear], theirs.argmax(-1)[clear])


def test_rows_taken_from_the_packed_form_are_the_dequantized_rows():
    """What a tied embedding looks up in its packed weight: bit for bit the dense weight's rows,
    in any index shape, from every position in the 64-row blocks (both nibbles)."""
    w = quantize_int4(torch.randn(200, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16), 32)
    ids = torch.tensor([[0, 31, 32, 63], [64, 100, 199, 5]])
    got = kernels.embedding(ids, w)
    assert got.shape == (2, 4, 128) and got.dtype == torch.bfloat16
    assert torch.equal(got, dequantize_int4(w)[ids])
    with pytest.raises(ValueError, match="cuda form"):
        kernels.embedding(ids, Int4Weight(w.data, w.scales_zeros, w.shape, 32, w.dtype, form="cuda"))
