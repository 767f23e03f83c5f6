"""The engine's own per-tensor weight store under the offload dir: converted once from a model's
weight source (see `models/checkpoint.py`), checked on every later run, shared safely by jobs."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import weakref

import torch
from tqdm import tqdm

from ..core.compression import CompressionConfig, compresses
from ..core.errors import StoreError
from ..core.policy import Policy
from ..core.types import dtype_name
from ..kernels import int4
from ..kernels.int4 import int4_layout_block
from ..kernels.quantize import CompressedTensor, quantize
from ..models.base import WeightSpec
from ..models.checkpoint import ResolvedModel
from ..system.io import DamagedFile, padded, read_file, write_file
from ..system.limits import require_disk_space
from ..system.workdir import create_new, is_own_dir, open_lock, private_dir
from .devices import nbytes

MANIFEST = "manifest.json"


# FLEXGEN_VERIFY_STORE=0 skips the checksum of each file's first read (measured cost: benchmark/RESULTS.md)
VERIFY_ENV = "FLEXGEN_VERIFY_STORE"


STORE_VERSION = 6  # 3: per-file XXH3 checksums in the manifest; 4: 4-bit weights in the int4 kernel layout;


def stored_parts(spec: WeightSpec, dtype: torch.dtype, compression: CompressionConfig | None) -> list[int]:
    """Bytes of the files that hold `spec` in a store of `dtype` and `compression` (before padding):
    the raw tensor, or its codes and its scales where the store compresses it. Every count of a
    weight's stored bytes (the budget, the cost model, the planner, the store) is this one."""
    if not compresses(compression, spec.compressible):
        return [torch.Size(spec.shape).numel() * dtype.itemsize]
    return list(int4.weight_parts(spec.shape, dtype, compression))


def stored_as_int4(spec: WeightSpec, compression: CompressionConfig | None) -> bool:
    """Whether a store with `compression` keeps `spec` in the int4 kernel's layout (read back as
    an Int4Weight, which an int4 kernel multiplies from its codes)."""
    return compresses(compression, spec.compressible) and int4.fits(spec.shape, compression.num_bits,
                                                                     compression.group_size)


def stored_nbytes(spec: WeightSpec, dtype: torch.dtype, compression: CompressionConfig | None) -> int:
    return sum(stored_parts(spec, dtype, compression))


class TensorStore:
    """One file per tensor (padded for O_DIRECT) plus a manifest; the manifest is written last, so a
    conversion that died leaves tensors the manifest does not list, and they are converted again.
    With `compression`, matmul weights are stored packed: codes in `NAME.q.bin`, the per-group
    scales in `NAME.s.bin`; 4-bit weights that fit it in the layout this CPU's int4 kernel reads
    (`int4.py`, read back as an Int4Weight, no repack: the layout is part of the store's identity
    and directory, so another CPU kind converts a store of its own), others as a CompressedTensor
    (min and step per group)."""

    def __init__(self, root: str, fingerprint: str, dtype: torch.dtype,
                 compression: CompressionConfig | None = None, rebuild: bool = False):
        self.root, self.fingerprint, self.dtype, self.compression = root, fingerprint, dtype, compression
        self.rebuild = rebuild  # convert every tensor again (after damage), even if the manifest lists it
        self.int4_block = int4_layout_block(compression)
        self.tensors: dict[str, dict] = {}
        self._verified: set[str] = set()  # tensors whose files were checked in this process

    def files(self, name: str) -> dict[str, str]:
        """Role -> path of the files holding `name` ("raw", or "codes" and "scales")."""
        if "packed" in self.tensors.get(name, {}):
            return {"codes": os.path.join(self.root, name + ".q.bin"),
                    "scales": os.path.join(self.root, name + ".s.bin")}
        return {"raw": os.path.join(self.root, name + ".bin")}

    def nbytes(self, name: str) -> int:
        entry = self.tensors[name]
        return sum(entry["packed"]["nbytes"]) if "packed" in entry else entry["nbytes"]

    def ensure(self, specs: list[WeightSpec], source, progress: bool = False) -> None:
        """Make every tensor in `specs` available, converting what is missing, and hold the store
        version it lives in for reading until `close` (or process exit).

        The store `root` (named by open_store) is the name of a family of version directories
        `root.IDENTITY.GEN` (see `store_versions`). Invariants:
        - files of a version that a live reader holds (a shared flock on its READERS file) are
          never removed or rewritten: a changed checkpoint, dtype or compression, a damaged
          manifest or --rebuild-store gets a new version directory beside the old one;
        - readers take that lock, and unused versions are removed, only under the store's
          convert lock (`root.lock`), so no reader can start on a version being removed;
        - pipeline ranks sharing an offload dir take turns under that lock, each adding its own
          stage's tensors to the same version."""
        self.base = getattr(self, "base", self.root)  # self.root becomes the version directory
        private_dir(os.path.dirname(self.base), "weight store directory")
        lock = open_lock(self.base + ".lock")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.root = self._pick_version()
            self._ensure_locked(specs, source, progress)
            self._hold(self.root)
            remove_unused_versions(self.base, keep=self.root)
        finally:
            os.close(lock)  # releases the convert lock

    def _pick_version(self) -> str:
        """The version directory to use: the newest one of this identity, or a new one (first use
        of the identity, or a rebuild: the old one may be in use by another job)."""
        ident = identity_hash(self._identity())
        versions = store_versions(self.base)
        mine = [gen for h, gen, _ in versions if h == ident]
        if not mine:
            if versions:
                print(f"note: weight store {self.base}: checkpoint, dtype or compression changed; converting "
                      "a new version beside the old one, which is removed once no job reads it")
            return private_dir(version_path(self.base, ident, 0), "weight store")
        generation = max(mine) + (1 if getattr(self, "rebuild", False) else 0)
        return private_dir(version_path(self.base, ident, generation), "weight store")

    def _hold(self, version: str) -> None:
        """Take a shared lock on `version` for as long as this store reads it."""
        if getattr(self, "_held", None) == version:
            return
        self.close()
        fd = open_lock(os.path.join(version, READERS))
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._held, self._release = version, weakref.finalize(self, os.close, fd)  # also on garbage collection

    def close(self) -> None:
        """Stop reading this store: a later job may then remove its version once it is stale."""
        release = getattr(self, "_release", None)
        if release is not None:
            release()
        self._held = self._release = None

    def _ensure_locked(self, specs: list[WeightSpec], source, progress: bool) -> None:
        self._open_or_reset()
        if self.rebuild:  # every wanted tensor is converted again, whatever the manifest says
            self.tensors = {}
            self.rebuild = False
        wanted = {s.name: s for s in specs}
        for name in wanted.keys() & self.tensors.keys():
            self._check(name, wanted[name])
        missing = [wanted[n] for n in wanted if n not in self.tensors]
        if not missing:
            return
        self._check_free_space(missing)
        try:
            for s in tqdm(missing, desc=f"converting weights into {self.root}", unit="tensor",
                          disable=not progress):
                self.tensors[s.name] = self._convert(s, source.get(s.name, s.shape, self.dtype))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise StoreError(f"disk full in {self.root} while converting the weight store (the partial file "
                             "was removed); free some space or use --offload-dir on a larger disk") from None
        finally:
            self._write_manifest()  # what was converted stays usable: a rerun converts only the rest

    def file_sizes(self, spec: WeightSpec) -> list[int]:
        """Bytes on disk of `spec`'s files once converted (padded for O_DIRECT)."""
        return [padded(n) for n in stored_parts(spec, self.dtype, self.compression)]

    def _check_free_space(self, missing: list[WeightSpec]) -> None:
        require_disk_space(sum(sum(self.file_sizes(s)) for s in missing), self.root, "converting the weight store")

    def _convert(self, spec: WeightSpec, t: torch.Tensor) -> dict:
        """Write one tensor's files; its manifest entry records their XXH3 checksums."""
        entry = {"shape": list(spec.shape), "nbytes": t.numel() * t.element_size()}
        if not compresses(self.compression, spec.compressible):
            entry["xxh3"] = {"raw": write_file(os.path.join(self.root, spec.name + ".bin"), t)}
            return entry
        config = self.compression
        if stored_as_int4(spec, config):
            q = int4.quantize_int4(t, config.group_size, self.int4_block)
            codes, scales, layout = q.data, q.scales_zeros, "int4"
        else:
            c = quantize(t, config)
            codes, scales, layout = c.data, torch.stack([c.mins, c.steps]), "groups"
        entry["xxh3"] = {"codes": write_file(os.path.join(self.root, spec.name + ".q.bin"), codes),
                          "scales": write_file(os.path.join(self.root, spec.name + ".s.bin"), scales)}
        entry["packed"] = {"codes": list(codes.shape), "scales": list(scales.shape), "layout": layout,
                           "nbytes": [nbytes(codes), nbytes(scales)]}
        return entry

    def _open_or_reset(self) -> None:
        """Load the manifest of the version directory `self.root`. A damaged manifest (or one of
        another identity) is not repaired in place, where another job may be reading: conversion
        starts over in the next version directory."""
        try:
            with open(os.path.join(self.root, MANIFEST)) as f:
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        expected = self._identity()
        if data is None or (data and {k: data.get(k) for k in expected} != expected):
            self.root = private_dir(next_version(self.root), "weight store")
            print(f"note: weight store manifest damaged; converting again into {self.root}")
            data = {}
        self.tensors = data.get("tensors", {})

    def _identity(self) -> dict:
        return {"version": STORE_VERSION, "source": self.fingerprint, "dtype": str(self.dtype),
                "compression": None if self.compression is None else vars(self.compression),
                "int4_block": self.int4_block}

    def _check(self, name: str, spec: WeightSpec) -> None:
        entry = self.tensors[name]
        if entry["shape"] != list(spec.shape):
            raise StoreError(f"weight store {self.root}: {name} has shape {entry['shape']}, expected "
                             f"{list(spec.shape)}; delete the store to rebuild it")
        sizes = entry["packed"]["nbytes"] if "packed" in entry else [entry["nbytes"]]
        for path, n in zip(self.files(name).values(), sizes):
            if not os.path.exists(path):
                raise StoreError(f"weight store {self.root}: tensor file {path} is missing; "
                                 "delete the store to rebuild it")
            size, want = os.path.getsize(path), padded(n)
            if size < want:
                raise StoreError(f"weight store {self.root}: tensor file {path} is truncated "
                                 f"({size} of {want} bytes); delete the store to rebuild it")

    def _write_manifest(self) -> None:
        """Replace the manifest atomically: readers see the old one or the new one, whole."""
        data = {**self._identity(), "tensors": self.tensors}
        tmp = os.path.join(self.root, MANIFEST + ".tmp")
        with os.fdopen(create_new(tmp), "w") as f:
            json.dump(data, f)
        os.replace(tmp, os.path.join(self.root, MANIFEST))

    def file_bytes(self, name: str) -> int:
        """What reading `name` takes in buffers: its files' padded sizes."""
        entry = self.tensors[name]
        return sum(map(padded, entry["packed"]["nbytes"] if "packed" in entry else [entry["nbytes"]]))

    def read(self, name: str, alloc=None):
        """One stored tensor from disk (bypassing the page cache): a tensor, or a CompressedTensor.
        `alloc` gives the read buffers (see memory.read_file). The first read of each tensor in
        this process is checked against its recorded checksums, so a damaged file is reported
        before any token depends on it; later reads of the same file trust it."""
        entry, files = self.tensors[name], self.files(name)
        verify = name not in self._verified and os.environ.get(VERIFY_ENV, "1") != "0"
        digests = entry["xxh3"] if verify else {}
        try:
            if "packed" not in entry:
                raw = read_file(files["raw"], entry["nbytes"], alloc, digests.get("raw"))
                value = raw.view(self.dtype).view(entry["shape"])
            else:
                packed = entry["packed"]
                codes = read_file(files["codes"], packed["nbytes"][0], alloc, digests.get("codes")).view(packed["codes"])
                scales = read_file(files["scales"], packed["nbytes"][1], alloc, digests.get("scales"))
                shape = tuple(entry["shape"])
                if packed["layout"] == "int4":
                    scales = scales.view(int4.scale_dtype(self.dtype)).view(packed["scales"])
                    value = int4.Int4Weight(codes, scales, shape, self.compression.group_size, dtype=self.dtype,
                                            block_n=self.int4_block)
                else:
                    scales = scales.view(self.dtype).view(packed["scales"])
                    value = CompressedTensor(codes, scales[0], scales[1], shape, self.compression)
        except DamagedFile as e:
            raise StoreError(f"{e}; rerun with --rebuild-store, or delete {self.root}") from None
        self._verified.add(name)
        return value


# ----- store versions, locks and private directories ----------------------------------------------
READERS = ".readers"  # in each version directory: readers hold a shared flock on it


_VERSION = r"\.([0-9a-f]{16})\.(\d+)"  # root.IDENTITY.GEN


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def version_path(base: str, ident: str, generation: int) -> str:
    return f"{base}.{ident}.{generation}"


def store_versions(base: str) -> list[tuple[str, int, str]]:
    """(identity hash, generation, path) of every version directory of the store named `base`."""
    parent, name = os.path.split(base)
    pattern = re.compile(re.escape(name) + _VERSION)
    found = [(m, os.path.join(parent, e)) for e in os.listdir(parent) if (m := pattern.fullmatch(e))]
    return [(m[1], int(m[2]), path) for m, path in found]


def next_version(version: str) -> str:
    """The path of the version after `version` (and after any other of its identity)."""
    stem, _ = version.rsplit(".", 1)
    base, ident = stem.rsplit(".", 1)
    return version_path(base, ident, 1 + max(g for h, g, _ in store_versions(base) if h == ident))


def remove_unused_versions(base: str, keep: str) -> None:
    """Delete the versions of store `base` other than `keep` that no job reads. The caller holds
    the store's convert lock, so no reader can take a version while it is being removed."""
    for _, _, path in store_versions(base):
        if path == keep or not is_own_dir(path):
            continue
        try:
            fd = open_lock(os.path.join(path, READERS))
        except (OSError, StoreError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live job reads it
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def open_store(offload_dir: str, model: ResolvedModel, dtype: torch.dtype, policy: Policy,
               rebuild: bool = False) -> TensorStore:
    """The converted weight store for this model, dtype and weight compression."""
    compression = policy.weight_compression()
    suffix, block = "", int4_layout_block(compression)
    if compression:  # each setting its own directory, so switching between them converts each once
        suffix = f"-q{compression.num_bits}g{compression.group_size}" + ("t" if compression.tables else "")
    if block:  # so does each CPU kind's int4 layout (hosts of two kinds may share an offload dir)
        suffix += f"-b{block}"
    store_dir = os.path.join(offload_dir, "weights", f"{model.store_key}-{dtype_name(dtype)}{suffix}")
    return TensorStore(store_dir, model.source.fingerprint, dtype, compression, rebuild)
