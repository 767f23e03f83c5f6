"""Tensor files on disk: padded for O_DIRECT, read bypassing the page cache in parallel chunks, each
chunk checked against the XXH3 digest recorded when it was written."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import xxhash

from ..core.errors import StoreError
from .workdir import partial_file

ALIGN = 4096


READ_CHUNK = 8 << 20  # large reads are split into chunks of this size, read in parallel


_READERS = ThreadPoolExecutor(4, thread_name_prefix="flexgen-read")


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
