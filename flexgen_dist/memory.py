"""Tiers: the compute device, host memory and disk, with byte accounting and the one copy path.

Disk reads of weights bypass the page cache (O_DIRECT) so a disk-homed weight costs no RAM between
uses; files are padded to the alignment O_DIRECT needs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import xxhash

from .errors import FlexGenError
from .policy import Tier
from .workdir import partial_file

ALIGN = 4096
READ_CHUNK = 8 << 20  # large reads are split into chunks of this size, read in parallel
_READERS = ThreadPoolExecutor(4, thread_name_prefix="flexgen-read")


class StoreError(FlexGenError):
    pass


@dataclass
class Usage:
    """Bytes held on one tier now, and the most ever held."""

    current: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def sub(self, nbytes: int) -> None:
        with self.lock:
            self.current -= nbytes


@dataclass
class Devices:
    """The torch devices behind the tiers, and what each tier holds."""

    compute: torch.device
    host: torch.device = torch.device("cpu")
    pin_host: bool = False
    usage: dict[Tier, Usage] = field(default_factory=lambda: {t: Usage() for t in Tier})

    @classmethod
    def detect(cls, pin_weight: bool = True) -> "Devices":
        if torch.cuda.is_available():
            return cls(torch.device("cuda", torch.cuda.current_device()), pin_host=pin_weight)
        return cls(torch.device("cpu"))

    @property
    def host_is_compute(self) -> bool:
        """True on a CPU-only machine: host tensors are usable by the math without a copy."""
        return self.compute == self.host

    def device_of(self, tier: Tier) -> torch.device:
        return self.compute if tier is Tier.COMPUTE else self.host


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_empty(n: int) -> torch.Tensor:
    """A uint8 tensor of `n` bytes whose address is ALIGN-aligned (as O_DIRECT requires)."""
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % ALIGN
    return raw[offset:offset + n]


def _open_direct(path: str) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), True
    except OSError:  # filesystems such as tmpfs refuse O_DIRECT
        return os.open(path, os.O_RDONLY), False


class DamagedFile(StoreError):
    """A file's bytes differ from the checksums recorded when it was written."""


def _pread_range(fd: int, view: memoryview, offset: int, path: str, digest: int | None = None) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise StoreError(f"tensor file {path} is truncated ({offset + done} bytes readable, "
                             f"{offset + len(view)} expected)")
        done += n
    if digest is not None and xxhash.xxh3_64_intdigest(view) != digest:
        raise DamagedFile(f"tensor file {path} is damaged (checksum mismatch in bytes "
                          f"{offset}-{offset + len(view)})")


def pread_all(fd: int, buf: torch.Tensor, offset: int, path: str, digests: list[int] | None = None) -> None:
    """Fill the uint8 tensor `buf` from `fd` at `offset`. Large reads are split into chunks read in
    parallel: an SSD needs several requests in flight to reach its sequential bandwidth. With
    `digests` (one per READ_CHUNK of the file, see `chunk_digests`), each chunk is verified as it lands."""
    view = memoryview(buf.numpy())
    chunks = [(view[i:i + READ_CHUNK], offset + i, None if digests is None else digests[k])
              for k, i in enumerate(range(0, len(view), READ_CHUNK))]
    if len(chunks) == 1:
        _pread_range(fd, view, offset, path, chunks[0][2])
        return
    list(_READERS.map(lambda c: _pread_range(fd, c[0], c[1], path, c[2]), chunks))


def chunk_digests(data: bytes | memoryview) -> list[int]:
    """The 64-bit XXH3 hash of each READ_CHUNK of a (padded) file's bytes: chunks verify in
    parallel as they are read. XXH3 rather than CRC-32: ~5x faster here (8.7 against 1.8 GB/s),
    which keeps the check off a disk-bound run's critical path (benchmark/RESULTS.md)."""
    view = memoryview(data)
    return [xxhash.xxh3_64_intdigest(view[i:i + READ_CHUNK]) for i in range(0, max(len(view), 1), READ_CHUNK)]


def peak_rss_bytes() -> int:
    """This process's peak resident set. Linux's VmHWM starts afresh at exec; getrusage's
    ru_maxrss does not (a child of a large process starts at its parent's size), so it is only
    the fallback."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: its allocator needs none of this
        return None


_GLIBC = _glibc()
_M_ARENA_MAX = -8


def share_one_allocator_arena() -> None:
    """Tensors are allocated on I/O threads (reads, decompression) and freed on the compute
    thread. With glibc's per-thread arenas each thread keeps its own pile of freed blocks, which
    other threads cannot reuse: hundreds of MB more at peak, under a memory limit a smaller batch.
    One shared arena lets every block be reused; its lock is taken a few hundred times a step."""
    if _GLIBC is not None:
        _GLIBC.mallopt(_M_ARENA_MAX, 1)


def trim_allocator() -> None:
    """Give freed heap memory back to the OS (between steps: the pages are faulted in again)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


class ReadSlab:
    """One reusable aligned host buffer that a layer's disk reads are carved from. Streaming
    weights then allocates nothing per step: fresh buffers, allocated on I/O threads and freed on
    the compute thread, left the C allocator holding hundreds of MB it never gave back."""

    def __init__(self, size: int):
        self.buf = aligned_empty(size)
        self.used = 0
        self._lock = threading.Lock()  # a layer's tensors are read in parallel

    def reset(self) -> None:
        self.used = 0

    def take(self, size: int) -> torch.Tensor:
        with self._lock:
            start = self.used
            self.used = end = start + size
        if end > len(self.buf):  # a sizing bug, not a user error
            raise RuntimeError(f"read slab of {len(self.buf)} bytes overflowed")
        return self.buf[start:end]


def read_file(path: str, nbytes_: int, alloc=None, digests: list[int] | None = None) -> torch.Tensor:
    """Read the first `nbytes_` bytes of a padded tensor file, bypassing the page cache, into a
    new buffer or one from `alloc(padded size)` (an ALIGN-aligned uint8 tensor, e.g. ReadSlab.take),
    verifying the padded bytes against `digests` when given."""
    size = padded(nbytes_)
    buf = alloc(size) if alloc else aligned_empty(size)
    try:
        fd, direct = _open_direct(path)
    except FileNotFoundError:
        raise StoreError(f"tensor file {path} is missing") from None
    try:
        pread_all(fd, buf, 0, path, digests)
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return buf[:nbytes_]


def write_file(path: str, tensor: torch.Tensor) -> list[int]:
    """Write a tensor's bytes padded to ALIGN (so O_DIRECT can read it back whole); returns the
    padded file's `chunk_digests`. A write that fails (e.g. a full disk) leaves no partial file."""
    data = memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())
    padding = b"\0" * (padded(len(data)) - len(data))
    with partial_file(path), open(path, "wb") as f:
        f.write(data)
        f.write(padding)
        f.flush()
        os.fsync(f.fileno())
    if hasattr(os, "posix_fadvise"):  # the page cache must not hold what we promise to keep on disk
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    digests = chunk_digests(data)
    if padding:  # the padding belongs to the last chunk (a padded file is a whole number of pages)
        start = (len(data) - 1) // READ_CHUNK * READ_CHUNK if len(data) else 0
        last = xxhash.xxh3_64(data[start:])
        last.update(padding)
        digests[-1] = last.intdigest()
    return digests


def to_device(t: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """The one copy path between tiers (non-blocking from pinned memory on a GPU)."""
    if t.device == device:
        return t
    if device.type == "cpu" and pin:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t)
        return out
    return t.to(device, non_blocking=t.is_pinned())


@dataclass
class WeightHome:
    """One weight tensor at its home tier: resident (plain or compressed), or read from the store
    on every use. `nbytes` is what it really occupies there (packed size when compressed)."""

    name: str
    tier: Tier
    nbytes: int
    store: object  # the TensorStore it comes from
    value: object = None  # resident tensor, CompressedTensor or Int4Weight
    keep_int4: bool = False  # an Int4Weight reaches the math packed (only for linear-only weights)

    def load(self, devices: Devices, alloc=None):
        """This weight on the compute device: decompressed there if it is stored compressed, except
        an Int4Weight with `keep_int4`, which stays packed; disk reads land in buffers from `alloc`
        when given (see ReadSlab)."""
        value = self.store.read(self.name, alloc) if self.tier is Tier.DISK else self.value
        return materialize(value, devices.compute, self.keep_int4)


def materialize(value, device: torch.device, keep_int4: bool = False):
    """A plain tensor on `device` from a tensor, a CompressedTensor or an Int4Weight (decompressed
    on `device`); with `keep_int4`, an Int4Weight in the form `device`'s int4 kernel reads."""
    from .compression import CompressedTensor, dequantize
    from .int4 import Int4Weight, dequantize_int4
    from .kernels import int4_for_device
    if isinstance(value, Int4Weight):
        if keep_int4:
            return int4_for_device(value, device)
        return dequantize_int4(value.to(device, non_blocking=value.data.is_pinned()))
    if isinstance(value, CompressedTensor):
        return dequantize(value.to(device, non_blocking=value.data.is_pinned()))
    return to_device(value, device)
