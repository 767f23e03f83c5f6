"""Measuring this machine for the cost model: matmuls, attention, whole block layers of the model,
the executor's own cost, conversions, copies and the offload dir's disk, each only where the
profile lacks it (`profile_model`). Every figure is the median of a few calls (`core.timing`).
All rates are per second: FLOP/s for matmuls and prefill attention, bytes/s for the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.compression import CompressionConfig
from ..core.config import RowParams
from ..core.policy import Policy
from ..core.timing import typical_time
from ..core.types import dtype_name
from ..kernels.attention import attend
from ..kernels.int4 import quantize_int4
from ..kernels.linear import can_pack, int4_for_device, linear, pack_linear_weight
from ..kernels.probe import int4_choice
from ..kernels.quantize import dequantize, quantize
from ..models.base import BLOCK
from ..runtime.block import step_inputs
from ..runtime.executor import LocalExecutor
from ..runtime.sampling import TokenChooser
from ..storage.devices import Devices
from ..system.io import aligned_empty, read_file, write_file
from ..system.limits import host_available
from .profile import (
    MATMUL_ROWS,
    HardwareProfile,
    choice_key,
    disk_key,
    layer_key,
    layer_kind,
    machine_threads,
    matmul_key,
    overhead_key,
)

MAX_FLOP_PER_CALL = 4e9  # bigger products are not timed beyond this size (the rate has saturated)


DISK_PROBE_BYTES = 256 << 20


MIN_DISK_PROBE_BYTES = 16 << 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object], at_least: int = 3) -> float:
    def call():
        fn()
        _sync(device)
    return typical_time(call, at_least=at_least)


def _timed_cycle(device: torch.device, cycle: Callable[[], object]) -> float:
    """A cycle over many copies already averages; three timed rounds after a warm-up suffice."""
    return typical_time(lambda: (cycle(), _sync(device)), budget_s=0.0, at_least=3)


# ----- the measurements ----------------------------------------------------------------------
def measure_matmuls(profile: HardwareProfile, device: torch.device, dtype: torch.dtype,
                    shapes: set[tuple[int, int]]) -> None:
    """FLOP/s of the engine's linear path for each (k, n) weight shape: plain, and packed where
    the device packs resident weights."""
    layouts = [False, True] if can_pack(device, dtype) else [False]
    for k, n in sorted(shapes):
        for packed in layouts:
            missing = [r for r in MATMUL_ROWS if matmul_key(dtype, r, k, n, packed) not in profile.rates]
            if not missing:
                continue
            # several copies, read from memory as a real run's weights are (not from the CPU's cache)
            plain = [torch.full((n, k), 0.01, dtype=dtype, device=device)
                     for _ in range(_copies(n * k * dtype.itemsize, device))]
            for rows in missing:
                weights = [pack_linear_weight(w, rows) for w in plain] if packed else plain
                profile.ensure(matmul_key(dtype, rows, k, n, packed), lambda: _matmul_rate(device, dtype, weights, rows, k, n))


def _matmul_rate(device: torch.device, dtype: torch.dtype, weights: list, rows: int, k: int, n: int) -> float:
    measured = min(rows, max(1, int(MAX_FLOP_PER_CALL / (2 * k * n))))
    x = torch.randn(measured, k, device=device).to(dtype)

    def cycle():
        for w in weights:
            linear(x, w)
    return 2.0 * measured * k * n * len(weights) / _timed_cycle(device, cycle)


def measure_attention(profile: HardwareProfile, device: torch.device, dtype: torch.dtype, heads: int,
                      kv_heads: int, head_dim: int) -> None:
    """Decode attention as bytes of KV read per second, prefill attention as FLOP/s."""
    shape = f"{heads}/{kv_heads}x{head_dim}"

    def decode() -> float:
        b, t = 8, 512
        q = torch.randn(b, heads, 1, head_dim, device=device).to(dtype)
        bias = torch.zeros(b, 1, 1, t, device=device, dtype=dtype)
        one = b * kv_heads * (t + CAPACITY_SLACK) * head_dim * dtype.itemsize
        ks = [torch.zeros(b, kv_heads, t + CAPACITY_SLACK, head_dim, device=device, dtype=dtype)[:, :, :t]
              for _ in range(_copies(2 * one, device))]  # read from memory, as a real run's caches are

        def cycle():
            for k in ks:
                attend(q, k, k, bias)
        return 2 * len(ks) * ks[0].numel() * dtype.itemsize / _timed_cycle(device, cycle)

    def prefill() -> float:
        b, s = 1, 256
        q = torch.randn(b, heads, s, head_dim, device=device).to(dtype)
        k = torch.randn(b, kv_heads, s, head_dim, device=device).to(dtype)
        bias = torch.zeros(b, 1, s, s, device=device, dtype=dtype)
        return 4.0 * b * heads * s * s * head_dim / _timed(device, lambda: attend(q, k, k, bias))

    profile.ensure(f"attention decode {dtype_name(dtype)} {shape}", decode)
    profile.ensure(f"attention prefill {dtype_name(dtype)} {shape}", prefill)


DECODE_ROWS = (1, 8, 32, 128)  # rows of a measured decode step of one block layer


DECODE_CONTEXT = 64  # tokens its attention reads (more are priced by the attention measurement)


PREFILL_ROWS = (1, 4, 16)  # rows of PREFILL_TOKENS each in a measured prefill step


PREFILL_TOKENS = 128


MAX_LAYER_FLOP = 8e10


CAPACITY_SLACK = 32  # KV buffer positions beyond the measured context, as in a real run


STREAM_BYTES = 1 << 30  # weights a decode measurement streams through per cycle  # a prefill measurement stops growing past this size (its rate has saturated)


def measure_layers(profile: HardwareProfile, device: torch.device, dtype: torch.dtype, spec, family,
                   int4: bool = False) -> None:
    """Seconds of one real block layer (attention, MLP) of this model: decode steps at a few row
    counts, prefill steps at a few token counts, with weights plain and (where the device packs
    resident weights) packed. Everything a layer does beyond its matmuls (norms, activations,
    reshapes, dispatch) is in these numbers, which is why they are measured on the model's own
    layers rather than summed from matmul rates. With `int4` (a plan that may compress weights),
    also with 4-bit weights multiplied from their codes, where the engine's int4 kernel would."""
    layouts = ["plain"] + (["packed"] if can_pack(device, dtype) else [])
    layouts += ["int4"] if int4 and int4_feed(device, dtype) else []
    for layer in family.build_layers(spec, 0, 1, with_embed=False, with_head=False, sep_layer=True):
        params = sum(torch.Size(w.shape).numel() for w in layer.weights)
        for layout in layouts:
            points = [("decode", rows, 1, DECODE_CONTEXT) for rows in DECODE_ROWS]
            points += [("prefill", rows, PREFILL_TOKENS, PREFILL_TOKENS) for rows in PREFILL_ROWS
                       if rows == 1 or 2 * params * rows * PREFILL_TOKENS <= MAX_LAYER_FLOP]
            for phase, rows, new, context in points:
                key = layer_key(dtype, spec, layer_kind(layer), phase, rows * new, layout)
                kv = 2 * rows * layer.kv_heads * (context + CAPACITY_SLACK) * layer.head_dim if layer.has_cache else 0
                flop_bound = max(1, int(MAX_LAYER_FLOP // (2 * params * rows * new)))  # prefill: a few big calls
                copies = _copies((params + kv) * dtype.itemsize, device, most=min(64, flop_bound))
                profile.ensure(key, lambda: _time_layer(layer, spec, dtype, device, layout, rows, new, context, copies))


def _copies(layer_bytes: int, device: torch.device, most: int = 64) -> int:
    """How many copies of a layer's weights a decode measurement cycles through: enough that
    they do not stay in the CPU's last-level cache (hundreds of MB on servers), as the model's
    many layers do not; bounded by an eighth of the memory there is (a memory cgroup's included)."""
    if device.type == "cuda":
        return 1
    room = min(STREAM_BYTES, host_available()[0] // 8)
    return max(1, min(room // max(layer_bytes, 1), most))


def int4_feed(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The activations' dtype of the int4 kernel a `dtype` run with --compress-weight multiplies
    with on `device` (the engine's own choice, `probe.int4_choice`, as --dtype auto makes it: a
    float32 run's kernel may be fed bf16 where that is faster; one asked for float32 explicitly is
    fed float32, and priced as the auto run), None where it dequantizes."""
    choice = int4_choice(device.type, dtype, True)
    return choice.activations if choice.use else None


def _weight_sets(layer, dtype: torch.dtype, device: torch.device, layout: str, rows: int, copies: int) -> list[dict]:
    """`copies` sets of the layer's weights, matmul weights held as the executor holds them in
    `layout`: "packed" as it packs resident weights for the batch's rows, "int4" as --compress-weight
    stores them in the kernel's form (quantized once; each copy its own codes, so copies stream)."""
    def held(w, quantized):
        t = _random_weight(w, dtype, device)
        if not w.linear or layout == "plain":
            return t
        if layout == "packed":
            return pack_linear_weight(t, rows)
        return dataclasses.replace(quantized[w.key], data=quantized[w.key].data.clone())

    quantized = {w.key: _int4_of(_random_weight(w, dtype, device), device)
                 for w in layer.weights if w.linear and layout == "int4"}
    return [{w.key: held(w, quantized) for w in layer.weights} for _ in range(copies)]


def _int4_of(w: torch.Tensor, device: torch.device):
    """`w` quantized as --compress-weight does, in the kernel's form."""
    config = Policy(compress_weight=True).weight_compression()
    return int4_for_device(quantize_int4(w, config.group_size), device, int4_feed(device, w.dtype))


def _time_layer(layer, spec, dtype, device, layout: str, rows: int, new: int, context: int, copies: int) -> float:
    inputs = step_inputs(torch.ones(rows, context, dtype=torch.bool), new, dtype, device)
    x = torch.randn(rows, new, spec.hidden_size, device=device).to(dtype)
    # the engine's buffers hold the whole generation: attention reads a slice, not all of it
    caches = [(tuple(torch.zeros(rows, layer.kv_heads, context + CAPACITY_SLACK, layer.head_dim, dtype=dtype,
                                 device=device) for _ in range(2)),) if layer.has_cache else () for _ in range(copies)]
    sets = _weight_sets(layer, dtype, device, layout, rows, copies)

    def cycle():
        for weights, extra in zip(sets, caches):
            layer.forward(weights, x, inputs, *extra)
    return _timed_cycle(device, cycle) / copies


def _random_weight(w, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Values do not change the speed; a constant is quick to make for a gigabyte of copies."""
    return torch.full(w.shape, 1.0 if w.init == "ones" else 0.01, dtype=dtype, device=device)


def measure_token_choice(profile: HardwareProfile, device: torch.device, vocab: int) -> None:
    """Seconds per logit of choosing the next tokens (the last rank's checks and greedy choice over
    float32 logits, every step), as logits per second."""

    def measure() -> float:
        rows = 64
        chooser = TokenChooser([RowParams(max_tokens=1 << 30)] * rows, 0, rows, 1)
        logits = torch.randn(rows, vocab, device=device)
        return rows * vocab / _timed(device, lambda: chooser.choose(logits, 0, 0))
    profile.ensure(choice_key(vocab), measure)


def measure_layer_overhead(profile: HardwareProfile, device: torch.device, dtype: torch.dtype, spec) -> None:
    """Seconds of fixed cost of a small schedule layer (the embedding): a lookup and a few ops."""
    def measure() -> float:
        table = torch.randn(1024, spec.hidden_size, device=device).to(dtype)
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        return _timed(device, lambda: (F.embedding(ids, table) * 1.0 + 0.0).contiguous())
    profile.ensure(overhead_key(dtype, spec), measure)


class _HeldWeights:
    """A `WeightSource` over tensors in memory (the executor measured without a store)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def nbytes(self, name: str) -> int:
        return self.tensors[name].numel() * self.tensors[name].element_size()

    file_bytes = nbytes

    def read(self, name: str, alloc=None) -> torch.Tensor:
        return self.tensors[name]


def measure_executor_overhead(profile: HardwareProfile, device: torch.device, dtype: torch.dtype, spec,
                              family, work_dir: str) -> None:
    """Seconds the block schedule adds per (layer, batch) job beyond the layer's own math (the
    loop, futures handed between threads, activations, the allocator trim): a decode step of a
    tiny copy of the model through the real executor, less its layers timed alone."""

    def measure() -> float:
        tiny = dataclasses.replace(spec, hidden_size=64, ffn_dim=128, num_heads=2, num_kv_heads=min(spec.kv_heads, 2)
                                   if spec.kv_heads < spec.num_heads else 0, head_size=32, num_layers=8)
        layers = family.build_layers(tiny, 0, tiny.num_layers, with_embed=False, with_head=False, sep_layer=True)
        tensors = {w.name: _random_weight(w, dtype, device) for la in layers for w in la.weights}
        rows, context = 4, DECODE_CONTEXT
        executor = LocalExecutor(layers, _HeldWeights(tensors), Policy(gpu_batch_size=rows), Devices.detect(), dtype,
                                 work_dir)
        try:
            caches = executor.allocate_caches([rows], context + CAPACITY_SLACK)
            inputs = [step_inputs(torch.ones(rows, context, dtype=torch.bool), 1, dtype, device)]
            x = torch.zeros(rows, 1, tiny.hidden_size, dtype=dtype, device=device)
            whole = _timed(device, lambda: executor.forward_step([x], inputs, caches))
            executor.free_caches(caches)
        finally:
            executor.close()
        alone = 0.0
        for layer in layers:
            weights = {w.key: tensors[w.name] for w in layer.weights}
            extra = ((tuple(torch.zeros(rows, layer.kv_heads, context + CAPACITY_SLACK, layer.head_dim, dtype=dtype,
                                        device=device) for _ in range(2)),) if layer.has_cache else ())
            alone += _timed(device, lambda: layer.forward(weights, x, inputs[0], *extra))
        return max(whole - alone, 0.0) / len(layers)
    profile.ensure(f"executor job {dtype_name(dtype)} {spec.family}", measure)


def profile_model(profile: HardwareProfile, device: torch.device, dtypes, spec, family, offload_dir: str,
                  int4: bool = False) -> None:
    """Every measurement the cost model needs for this model, on this machine, in these dtypes
    (only those not in the profile yet, nor measured meanwhile by another process: one measures at
    a time, with all the machine's cores), then the profile saved with a line of its history."""
    with profile.locked(), _all_cores(device):
        before = profile.measured_s
        _measure_model(profile, device, dtypes, spec, family, offload_dir, int4)
        if profile.measured_s > before:
            profile.history.append({"pid": os.getpid(), "threads": torch.get_num_threads(), "model": spec.family,
                                    "seconds": round(profile.measured_s - before, 2),
                                    "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
            profile.save()


@contextlib.contextmanager
def _all_cores(device: torch.device):
    """The machine's cores for the duration (a rank's share of them is derived, see `share`)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(machine_threads())
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _measure_model(profile: HardwareProfile, device: torch.device, dtypes, spec, family, offload_dir: str,
                   int4: bool) -> None:
    layers = family.build_layers(spec, 0, 1, with_embed=True, with_head=True, sep_layer=True)
    # block layers are measured whole (measure_layers); the head's product (and a projection
    # around the embedding, as OPT-350m has) are priced from their rates
    shapes = {(w.shape[1], w.shape[0]) for la in layers if la.part != BLOCK for w in la.weights if w.linear}
    for dtype in dtypes:
        measure_matmuls(profile, device, dtype, shapes)
        measure_attention(profile, device, dtype, spec.num_heads, spec.kv_heads, spec.head_dim)
        measure_layers(profile, device, dtype, spec, family, int4)
        measure_layer_overhead(profile, device, dtype, spec)
        measure_executor_overhead(profile, device, dtype, spec, family, offload_dir)
        measure_conversions(profile, device, dtype)
    measure_token_choice(profile, device, spec.vocab_size)
    measure_disk(profile, offload_dir)


def measure_conversions(profile: HardwareProfile, device: torch.device, dtype: torch.dtype) -> None:
    """Dense bytes per second out of 4-bit dequantization (weights and cache) and into quantization
    (the cache's new tokens), and host-to-compute copies (memcpy on a CPU, pinned H2D on a GPU)."""
    name = dtype_name(dtype)
    w = torch.randn(2048, 2048, device=device).to(dtype)
    dense = w.numel() * w.element_size()
    config = CompressionConfig(4, 64, 0)
    packed = quantize(w, config)
    profile.ensure(f"decompress {name}", lambda: dense / _timed(device, lambda: dequantize(packed)))
    profile.ensure(f"compress {name}", lambda: dense / _timed(device, lambda: quantize(w, config)))
    src = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=device.type == "cuda")
    if device.type == "cuda":
        dst = torch.empty_like(src, device=device)
        profile.ensure("copy to compute", lambda: src.numel() / _timed(device, lambda: dst.copy_(src, non_blocking=True)))
        profile.ensure("copy to host", lambda: src.numel() / _timed(device, lambda: src.copy_(dst, non_blocking=True)))
    else:
        dst = torch.empty_like(src)
        profile.ensure("copy to compute", lambda: src.numel() / _timed(device, lambda: dst.copy_(src)))
        profile.ensure("copy to host", lambda: profile.rates["copy to compute"])


def measure_disk(profile: HardwareProfile, directory: str) -> None:
    """Read and write bytes/s of the filesystem under `directory`, as the engine does them:
    writes fsynced and dropped from the page cache, reads with O_DIRECT, four requests at once."""
    if disk_key(directory, "read") in profile.rates:
        return
    t0 = time.perf_counter()
    os.makedirs(directory, exist_ok=True)
    # its data and read buffer (twice `size`) stay within a quarter of the memory there is
    room = min(shutil.disk_usage(directory).free, host_available()[0] // 2) // 4
    size = min(DISK_PROBE_BYTES, room) // (4 << 20) * (4 << 20)
    if size < MIN_DISK_PROBE_BYTES:  # an (almost) full disk: nothing to measure, nothing to put there
        return
    profile.about_to_measure()
    probe_dir = tempfile.mkdtemp(prefix=".disk-probe-", dir=directory)
    try:
        parts = [torch.randint(0, 255, (size // 4,), dtype=torch.uint8) for _ in range(4)]
        paths = [os.path.join(probe_dir, f"part{i}") for i in range(4)]
        start = time.perf_counter()
        for path, data in zip(paths, parts):
            write_file(path, data)
        write_s = time.perf_counter() - start
        buf = aligned_empty(size)
        chunk = size // 4
        start = time.perf_counter()
        for i, path in enumerate(paths):
            read_file(path, chunk, alloc=lambda size, i=i: buf[i * chunk:i * chunk + size])
        read_s = time.perf_counter() - start
    except OSError:  # e.g. the disk filled up meanwhile: leave it unmeasured (priced conservatively)
        return
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    profile.rates[disk_key(directory, "write")] = size / write_s
    profile.rates[disk_key(directory, "read")] = size / read_s
    profile._points.clear()
    profile.measured_s += time.perf_counter() - t0
