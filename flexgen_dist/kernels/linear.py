"""Device-specific fast paths the layer math can use without knowing where it runs.

On a CPU, oneDNN's bf16 matmul re-lays out ("packs") the weight on every call; for the few rows
of a decode step that costs more than the product itself. Weights that stay resident are packed
once at placement, where the probe found the packing op works on this CPU, and `linear`
dispatches on whether it got a packed weight.

Compressed matmul weights arrive as `Int4Weight`s where the probe found an int4 kernel that works
and pays here, fed the model's dtype unless --dtype auto allows a lower one (`probe.int4_choice`,
decided once per engine): a decode step multiplies from the 4-bit codes, never
materialising the dense weight; a step with many rows (prefill) dequantizes and multiplies dense,
which is faster there (benchmark/RESULTS.md, "Packed int4 weights").
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from . import compiled, int4, probe
from .int4 import Int4Weight, dequantize_int4, take_rows, with_scales_in

# above this many rows a CPU product dequantizes and multiplies dense: measured on AMX and AVX-512
# CPUs, PyTorch's int4 kernel's time grows with the rows while a dense bf16 product's hardly does
INT4_MAX_ROWS = 32


# the compiled kernel decodes each weight once per tile: measured on an AVX-512 BF16 CPU, it stays
# ahead of dequantize + dense up to 128 rows and behind from 256 (benchmark/RESULTS.md)
COMPILED_MAX_ROWS = 128


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and probe.pack_supported()


def pack_linear_weight(w: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """`w` (out, in) in oneDNN's blocked layout, tuned for about `rows_hint` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)


def int4_for_device(w: Int4Weight, device: torch.device, fed: torch.dtype) -> Int4Weight:
    """`w` moved to `device`, in the form its int4 kernel reads, converted here once per placement
    or load: the CPU layout of this CPU's kernel (already the store's), tinygemm's form on a
    GPU; scales and zeros in `fed`, the dtype of the activations the kernel is fed (the engine's
    `Int4Choice.activations`: a float32 model's are bf16 only where --dtype auto chose that)."""
    if int4_ready(w, device, fed):
        return w  # already there: the resident weight itself, so the executor counts no copy
    w = with_scales_in(w.to(device, non_blocking=w.data.is_pinned()), fed)
    return int4.int4_to_cuda_form(w) if device.type == "cuda" else int4.int4_to_cpu_form(w)


def int4_ready(w: Int4Weight, device: torch.device, fed: torch.dtype) -> bool:
    """Whether `w` is already on `device` in the form its int4 kernel reads when fed `fed`."""
    cpu_ready = device.type == "cpu" and w.block_n == int4.int4_store_block()
    return w.device == device and w.scales_zeros.dtype == fed and (cpu_ready or w.form == "cuda")


_scratch = threading.local()  # per thread: dtype -> the buffer weights are dequantized into for one product


def _dense_buffer(w: Int4Weight) -> torch.Tensor:
    """A buffer for `w` dequantized, reused by every product of this thread that dequantizes: as
    large as the largest such weight so far, which the memory budget counts among the weights in
    flight; freed when the engine closes (`release_dense_buffers`)."""
    shape = (w.data.shape[0], w.shape[1])
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(w.dtype)
    if buf is None or buf.numel() < shape[0] * shape[1] or buf.device != w.device:
        buf = buffers[w.dtype] = torch.empty(shape[0] * shape[1], dtype=w.dtype, device=w.device)
    return buf[:shape[0] * shape[1]].view(shape)


def release_dense_buffers() -> None:
    """Free this thread's dequantize buffers (an engine closing: the next one budgets its own)."""
    _scratch.__dict__.pop("buffers", None)


def max_kernel_rows(w: Int4Weight, rows: int) -> int:
    """Rows up to which a CPU product of `rows` rows multiplies from the codes: any number on the
    AMX path (its tile products keep pace with oneDNN's dense ones, and the weight is decoded once
    per block, cheaper than dequantizing it whole)."""
    chosen = int4.compiled_path(w, rows)
    if chosen is None:
        return INT4_MAX_ROWS
    return rows if chosen[1] == compiled.AMX_BF16 else COMPILED_MAX_ROWS


def int4_linear(x: torch.Tensor, w: Int4Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) in x's dtype, from the packed codes; dense after dequantizing (into a reused
    buffer) for many rows on a CPU."""
    n, k = w.shape
    rows = x.numel() // k
    if w.form == "cpu" and rows > max_kernel_rows(w, rows):
        return F.linear(x, dequantize_int4(w, out=_dense_buffer(w)), b)
    y = int4.int4_mm(x.reshape(rows, k).contiguous(), w)
    y = (y if y.shape[1] == n else y[:, :n]).reshape(*x.shape[:-1], n)
    return y if b is None else y + b


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, for plain, packed (same results, bit for bit, in bf16) or int4 weights."""
    if isinstance(w, Int4Weight):
        return int4_linear(x, w, b)
    if w.is_mkldnn:
        return probe.linear_packed(x, w, b)
    return F.linear(x, w, b)


def embedding(ids: torch.Tensor, w) -> torch.Tensor:
    """F.embedding, also for a 4-bit weight kept packed (a CPU's tied embedding and output head):
    only the looked-up rows are dequantized."""
    if isinstance(w, Int4Weight):
        return take_rows(w, ids)
    return F.embedding(ids, w)


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """The matmul path resident linear weights take, for the run report."""
    if can_pack(device, dtype):
        return "oneDNN prepacked bf16"
    return "F.linear"


def describe_int4(device: torch.device, choice: probe.Int4Choice | None) -> str:
    """What compressed linear weights do under the engine's `choice`, for the run report."""
    if choice is None:
        return "dequantize + dense"
    if not choice.use:
        return f"dequantize + dense ({choice.reason})"
    if device.type != "cpu":
        return f"packed int4 matmul ({choice.reason})"
    block = int4.int4_store_block()
    said = f"packed int4 matmul ({choice.reason}), {int4.kernel_name(choice.activations, block)}"
    if not int4.uses_compiled(choice.activations, block):
        return f"{said}, dequantize + dense above {INT4_MAX_ROWS} rows"
    if compiled.kernel().path_for(choice.activations, COMPILED_MAX_ROWS + 1, block) == compiled.AMX_BF16:
        return said  # the AMX path takes any number of rows
    return f"{said}, dequantize + dense above {COMPILED_MAX_ROWS} rows"
