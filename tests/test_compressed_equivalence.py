"""With compression on, every placement gives the tokens of an uncompressed run whose weights and
KV cache went through quantize -> dequantize once: compression is the only difference."""
import re

import pytest
import torch
from conftest import PROMPTS, count_int4_products
from flexgen_dist import Engine, Policy
from flexgen_dist.core.compression import CompressionConfig
from flexgen_dist.kernels import linear as kernels
from flexgen_dist.kernels.int4 import fake_quantize_weight
from flexgen_dist.kernels.quantize import fake_quantize
from flexgen_dist.storage.kvcache import KVCache
from test_equivalence import PLACEMENTS

NEW_TOKENS = 10
COMPRESSED = re.compile(r"(proj|fc1|fc2|project_in|project_out)\.weight$")
# the vocabulary tables, with --compress-embeddings (lm_head is tied to embed_tokens: quantize it
# too, or loading it would undo embed_tokens)
TABLES = re.compile(r"(embed_tokens|embed_positions|lm_head)\.weight$")


def fake_quantize_checkpoint(opt_checkpoint, out, tables: bool) -> str:
    """The same model with every compressed weight replaced by its quantize -> dequantize image in
    the layout the store keeps (the int4 kernel's where the shape fits it)."""
    path, model = opt_checkpoint
    weight_config = Policy(compress_weight=True).weight_compression()
    chosen = lambda k: COMPRESSED.search(k) or (tables and TABLES.search(k))  # noqa: E731
    state = {k: (fake_quantize_weight(v, weight_config) if chosen(k) else v) for k, v in model.state_dict().items()}
    clone = type(model)(model.config).eval()
    clone.load_state_dict(state)
    clone.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def fake_quantized_checkpoint(opt_checkpoint, tmp_path_factory):
    return fake_quantize_checkpoint(opt_checkpoint, tmp_path_factory.mktemp("fakeq"), tables=False)


def fake_quantized_cache(monkeypatch):
    """Make an uncompressed engine round-trip every stored KV row through 4-bit quantization (every
    cache staged, so that the executor stores each step's rows: an in-place one needs no store)."""
    original = KVCache.store
    monkeypatch.setattr(KVCache, "in_place", property(lambda self: False))

    def store(self, kv, start, end):
        config = CompressionConfig(4, min(64, self.head_dim), dim=-1)
        for buf in kv:
            buf[:, :, start:end] = fake_quantize(buf[:, :, start:end], config)
        original(self, kv, start, end)
    monkeypatch.setattr(KVCache, "store", store)


def generate(path, tmp_path, **policy):
    percent = policy.pop("percent", [100, 0, 100, 0, 100, 0])
    engine = Engine.from_pretrained(path, policy=Policy.from_percent(percent, **policy), offload_dir=tmp_path,
                                    dtype="float32")
    try:
        return engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def reference(opt_checkpoint, fake_quantized_checkpoint, tmp_path_factory):
    path, _ = opt_checkpoint
    with pytest.MonkeyPatch.context() as mp:
        both = generate(fake_quantized_checkpoint, tmp_path_factory.mktemp("o"), gpu_batch_size=5)
        fake_quantized_cache(mp)
        with_cache = generate(fake_quantized_checkpoint, tmp_path_factory.mktemp("o"), gpu_batch_size=5)
        cache_only = generate(path, tmp_path_factory.mktemp("o"), gpu_batch_size=5)
    return {"weights": both, "both": with_cache, "cache": cache_only}


def assert_same(run, ref):
    assert torch.equal(run[0], ref[0])
    for mine, theirs in zip(run[1], ref[1]):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def assert_int4_path(mode, calls):
    """The packed run multiplied decode steps from the codes (products of at most INT4_MAX_ROWS
    rows take the kernel); the dequantizing run never kept a weight packed."""
    if mode.startswith("packed"):
        assert calls and min(calls) <= kernels.INT4_MAX_ROWS
    else:
        assert not calls


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_compressed_placements_match_fake_quantized_reference(opt_checkpoint, reference, placement, tmp_path,
                                                              int4_mode, monkeypatch):
    path, _ = opt_checkpoint
    calls = count_int4_products(monkeypatch)
    run = generate(path, tmp_path, **PLACEMENTS[placement], compress_weight=True, compress_cache=True)
    assert_same(run, reference["both"])
    assert_int4_path(int4_mode, calls)


@pytest.mark.parametrize("which", ["weights", "cache"])
def test_weight_or_cache_compression_alone(opt_checkpoint, reference, which, tmp_path, int4_mode, monkeypatch):
    path, _ = opt_checkpoint
    calls = count_int4_products(monkeypatch)
    run = generate(path, tmp_path, percent=[30, 30, 40, 30, 100, 0], gpu_batch_size=2, num_gpu_batches=3,
                   compress_weight=which == "weights", compress_cache=which == "cache")
    assert_same(run, reference[which])
    assert_int4_path(int4_mode if which == "weights" else "dense", calls)


def test_compression_changes_the_output(opt_checkpoint, reference, tmp_path):
    """Guard against a reference that is compressed by accident: plain runs differ from it."""
    path, _ = opt_checkpoint
    plain = generate(path, tmp_path, gpu_batch_size=5)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(plain[1], reference["both"][1]))


def test_embeddings_are_compressed_on_request(opt_checkpoint, tmp_path, int4_mode, monkeypatch):
    """--compress-embeddings quantizes the vocabulary tables too (a CPU's tied embedding then stays
    packed: lookups take rows from the codes, the head multiplies from them), on every tier."""
    path, _ = opt_checkpoint
    reference = generate(fake_quantize_checkpoint(opt_checkpoint, tmp_path / "fakeq", tables=True),
                         tmp_path / "ref", gpu_batch_size=5)
    calls = count_int4_products(monkeypatch)
    for i, percent in enumerate(([100, 0, 100, 0, 100, 0], [30, 30, 40, 30, 100, 0])):
        run = generate(path, tmp_path / str(i), percent=percent, gpu_batch_size=5, compress_weight=True,
                       compress_embeddings=True)
        assert_same(run, reference)
    assert_int4_path(int4_mode, calls)
    plain = generate(path, tmp_path / "plain", gpu_batch_size=5, compress_weight=True)
    assert not torch.equal(plain[0], reference[0]) or not all(
        torch.allclose(a, b, atol=1e-4) for a, b in zip(plain[1], reference[1]))

