"""Weight sources (a local Hugging Face directory, the hub, seeded dummy weights) and the engine's
own per-tensor store under the offload dir, converted once and checked on every later run."""
from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import pickle
import re
import shutil
import stat
import weakref
import zlib
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .budget import require_disk_space
from . import int4, probe
from .compression import CompressedTensor, CompressionConfig, compresses, quantize
from .memory import DamagedFile, StoreError, nbytes, padded, read_file, write_file
from .models import ModelError, ModelSpec, builtin_spec, family_of, spec_from_dir
from .models.base import WeightSpec

MANIFEST = "manifest.json"
# FLEXGEN_VERIFY_STORE=0 skips the checksum of each file's first read (measured cost: benchmark/RESULTS.md)
VERIFY_ENV = "FLEXGEN_VERIFY_STORE"
STORE_VERSION = 6  # 3: per-file XXH3 checksums in the manifest; 4: 4-bit weights in the int4 kernel layout;
# 5: a float32 store's 4-bit scales and zeros are bf16 values (int4._scales_zeros); 6: and stored as
# bf16, and the codes in the layout this CPU's int4 kernel reads (identity: int4_block)


class DummySource:
    """Seeded random weights for a named config: nothing is downloaded (benchmark mode). Each
    tensor is filled by its WeightSpec's `init` rule (norm scales ones, biases zeros, matmul
    weights N(0, 0.02^2)), so any family's dummy model computes with sane magnitudes."""

    INIT_VERSION = 2  # part of the fingerprint: stores filled by older rules are rebuilt

    def __init__(self, spec: ModelSpec, seed: int = 0):
        self.spec, self.seed = spec, seed
        self.fingerprint = f"dummy{self.INIT_VERSION}:{seed}:{json.dumps(spec.__dict__, sort_keys=True)}"
        self.inits = {w.name: w.init for layer in family_of(spec).build_layers(spec) for w in layer.weights}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        init = self.inits.get(name, "normal")
        if init == "ones":
            return torch.ones(shape, dtype=dtype)
        if init == "zeros":
            return torch.zeros(shape, dtype=dtype)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g, dtype=dtype) * 0.02


class CheckpointSource:
    """Tensors of a local Hugging Face checkpoint: safetensors or pytorch .bin, sharded (with an
    index file naming the shards) or not. Pickled .bin files are loaded with `weights_only`: a
    file that needs anything but tensors and plain containers to unpickle is refused, unrun."""

    def __init__(self, path: str, key_to_name):
        self.path = path
        self._bin_cache: dict[str, dict] = {}
        files = checkpoint_files(path)
        self._where: dict[str, tuple[str, str]] = {}  # store name -> (file, checkpoint key)
        for f in files:
            for key in self._keys(f):
                name = key_to_name(key)
                if name is not None:
                    self._where[name] = (f, key)
        stats = [(os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
        self.fingerprint = "checkpoint:" + hashlib.sha256(repr(stats).encode()).hexdigest()[:16]

    def _keys(self, f: str) -> list[str]:
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(f, framework="pt") as st:
                return list(st.keys())
        return list(self._load_bin(f).keys())

    def _load_bin(self, f: str) -> dict:
        if f not in self._bin_cache:
            self._bin_cache[f] = load_bin(f)
        return self._bin_cache[f]

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if name not in self._where:
            raise ModelError(f"checkpoint {self.path} has no tensor for {name}")
        f, key = self._where[name]
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(f, framework="pt") as st:
                t = st.get_tensor(key)
        else:
            t = self._load_bin(f)[key]
        if tuple(t.shape) != tuple(shape):
            raise ModelError(f"checkpoint tensor {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t.to(dtype)


def checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory: the shards its index names, else every
    *.safetensors file, else every pytorch_model*.bin (safetensors preferred, as transformers does)."""
    for index, pattern in (("model.safetensors.index.json", "*.safetensors"),
                           ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ModelError(f"{index_path} is not a valid checkpoint index (no 'weight_map')") from None
            missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if missing:
                raise ModelError(f"{index_path} names shard {missing[0]}, which is missing")
            return [os.path.join(path, s) for s in shards]
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return files
    raise ModelError(f"{path} has no *.safetensors or pytorch_model*.bin weight files")


def load_bin(f: str) -> dict:
    """A pickled state dict, tensors only (`weights_only`), memory-mapped where the format allows."""
    try:
        try:  # mmap: tensors are read only when touched
            state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(f, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        what = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if str(e) else "refused"
        raise ModelError(f"{f} needs more than tensors to unpickle ({what}); refused: only weights are "
                         "loaded from .bin files (convert it to safetensors if you trust it)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"{f} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise ModelError(f"{f} holds a {type(state).__name__}, not a state dict of tensors")
    return state


@dataclass
class ResolvedModel:
    spec: ModelSpec
    source: object
    tokenizer_path: str | None
    store_key: str
    eos_token_ids: list[int]  # where generation stops by default, as transformers' generate would


def _looks_like_hub_id(name: str) -> bool:
    """`facebook/opt-125m` or `gpt2`: no leading ./ / ~, at most one slash."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1


def _download(name: str) -> str:
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin", "*.txt"])
    except Exception as e:  # offline, unknown repo, auth: one line is enough
        raise ModelError(f"model {name!r} is not a local directory and could not be fetched from "
                         f"the Hugging Face hub ({type(e).__name__})") from None


def resolve_model(name_or_path: str, dummy_weights: bool = False, seed: int = 0) -> ResolvedModel:
    """Find the spec and the weights for a model name, a local directory or a hub id."""
    if dummy_weights:
        spec = builtin_spec(name_or_path) or (spec_from_dir(name_or_path) if os.path.isdir(name_or_path) else None)
        if spec is None:
            raise ModelError(f"--dummy-weights needs a built-in model name ({', '.join(_names())}) "
                             f"or a model directory; got {name_or_path!r}")
        return ResolvedModel(spec, DummySource(spec, seed), None, f"{spec.name}-dummy{seed}",
                             default_eos(name_or_path, spec) if os.path.isdir(name_or_path) else list(spec.eos_token_ids))
    path = os.path.expanduser(name_or_path)
    if not os.path.isdir(path):
        if os.path.exists(path) or not _looks_like_hub_id(name_or_path):
            raise ModelError(f"model path {name_or_path} does not exist or is not a directory")
        path = _download(name_or_path)
    spec = spec_from_dir(path)
    family = family_of(spec)
    tokenizer = path if glob.glob(os.path.join(path, "tokenizer*.json")) or \
        os.path.exists(os.path.join(path, "vocab.json")) else None
    key = f"{spec.name}-{hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]}"
    return ResolvedModel(spec, CheckpointSource(path, family.checkpoint_key_to_name), tokenizer, key,
                         default_eos(path, spec))


def default_eos(path: str, spec: ModelSpec) -> list[int]:
    """The end-of-sequence ids `generate` would stop at: generation_config.json's when the
    directory has one (even if it sets none), else the model config's."""
    config_path = os.path.join(path, "generation_config.json")
    if not os.path.isfile(config_path):
        return list(spec.eos_token_ids)
    try:
        with open(config_path) as f:
            eos = json.load(f).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise ModelError(f"{config_path} is not a valid JSON object") from None
    eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not (isinstance(eos, list) and all(isinstance(t, int) for t in eos)):
        raise ModelError(f"{config_path}: eos_token_id must be an id or a list of ids")
    return eos


def _names() -> list[str]:
    from .models import BUILTIN
    return sorted(BUILTIN)


def int4_layout_block(compression: CompressionConfig | None) -> int | None:
    """Rows per block of the CPU layout a store with `compression` writes its int4 weights in (the
    one this CPU's kernel reads), or None if it writes none."""
    if compression is None or compression.num_bits != 4 or compression.group_size not in int4.GROUP_SIZES:
        return None
    return probe.int4_store_block()


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
        elem = torch.empty((), dtype=self.dtype).element_size()
        if not compresses(self.compression, spec.compressible):
            return [padded(torch.Size(spec.shape).numel() * elem)]
        return [padded(n) for n in int4.weight_parts(spec.shape, self.dtype, self.compression)]

    def _check_free_space(self, missing: list[WeightSpec]) -> None:
        require_disk_space(sum(sum(self.file_sizes(s)) for s in missing), self.root, "converting the weight store")

    def _convert(self, spec: WeightSpec, t: torch.Tensor) -> dict:
        """Write one tensor's files; its manifest entry records their XXH3 checksums."""
        entry = {"shape": list(spec.shape), "nbytes": t.numel() * t.element_size()}
        if not compresses(self.compression, spec.compressible):
            entry["xxh3"] = {"raw": write_file(os.path.join(self.root, spec.name + ".bin"), t)}
            return entry
        config = self.compression
        if int4.fits(spec.shape, config.num_bits, config.group_size):
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
PRIVATE_DIR_MODE = 0o700  # directories the engine creates: nobody else may list or plant files there
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
        if path == keep or not _is_own_dir(path):
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


def _is_own_dir(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def _user(uid: int) -> str:
    try:
        import pwd
        return f"user {pwd.getpwuid(uid).pw_name}"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _refuse(path: str, what: str, st: os.stat_result) -> StoreError | None:
    """Why the engine must not use `path` (a symlink it did not make, another user's file), if so."""
    fix = "remove it or choose another --offload-dir"
    if stat.S_ISLNK(st.st_mode):
        return StoreError(f"{what} {path} is a symbolic link, which the engine does not follow; {fix}")
    if st.st_uid != os.geteuid():
        return StoreError(f"{what} {path} belongs to {_user(st.st_uid)}, not to you ({_user(os.geteuid())}); "
                          f"refusing to use it: {fix}")
    return None


def private_dir(path: str, what: str, follow: bool = False) -> str:
    """`path` as a directory of this user: created mode 0700 (with missing parents) if absent,
    else one this user owns. A symlink (unless `follow`: the user's own offload dir may be one),
    a non-directory or another user's directory is refused with a StoreError naming it; failing
    to create it raises the OSError."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent != path and not os.path.isdir(parent):
            private_dir(parent, what, follow=True)
        try:
            os.mkdir(path, PRIVATE_DIR_MODE)
        except FileExistsError:  # another rank or job made it meanwhile: check it as any other
            pass
        st = os.stat(path) if follow else os.lstat(path)
    error = _refuse(path, what, st)
    if error is None and not stat.S_ISDIR(st.st_mode):
        error = StoreError(f"{what} {path} is not a directory; remove it or choose another --offload-dir")
    if error is not None:
        raise error
    return path


def open_lock(path: str) -> int:
    """A lock file's descriptor: created mode 0600 if absent, never truncated, never through a
    symlink (another local user's link would otherwise point the engine at a file of theirs or
    yours). Another user's file is refused with a StoreError naming it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:  # ELOOP for a symlink; some kernels answer EACCES in a sticky directory
        if e.errno not in (errno.ELOOP, errno.EACCES, errno.EPERM):
            raise
        error = _refuse(path, "lock file", os.lstat(path))
        raise error or StoreError(f"lock file {path} cannot be opened ({e.strerror}); remove it or choose "
                                  "another --offload-dir") from None
    st = os.fstat(fd)
    error = _refuse(path, "lock file", st) or (None if stat.S_ISREG(st.st_mode) else
                                               StoreError(f"lock file {path} is not a regular file; remove it"))
    if error is not None:
        os.close(fd)
        raise error
    return fd


def create_new(path: str) -> int:
    """A new file's descriptor, mode 0600, opened for writing: created here (O_EXCL), so never
    another user's file nor a symlink's target. A leftover of a crashed run is removed first."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)  # the directory is private, so the leftover is our own
        return os.open(path, flags, 0o600)
