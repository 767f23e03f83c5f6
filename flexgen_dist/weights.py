"""Weight sources (a local Hugging Face directory, the hub, seeded dummy weights) and the engine's
own per-tensor store under the offload dir, converted once and checked on every later run."""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .compression import CompressedTensor, CompressionConfig, quantize
from .memory import StoreError, nbytes, padded, read_file, write_file
from .models import ModelError, ModelSpec, builtin_spec, family_of, spec_from_dir
from .models.base import WeightSpec

MANIFEST = "manifest.json"
STORE_VERSION = 1


class DummySource:
    """Seeded random weights for a named config: nothing is downloaded (benchmark mode)."""

    def __init__(self, spec: ModelSpec, seed: int = 0):
        self.spec, self.seed = spec, seed
        self.fingerprint = f"dummy:{seed}:{json.dumps(spec.__dict__, sort_keys=True)}"

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if name.endswith("layer_norm.weight"):
            return torch.ones(shape, dtype=dtype)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g, dtype=dtype) * 0.02


class CheckpointSource:
    """Tensors of a local Hugging Face checkpoint: safetensors or pytorch .bin, sharded or not."""

    def __init__(self, path: str, key_to_name):
        self.path = path
        files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or \
            sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
        if not files:
            raise ModelError(f"{path} has no *.safetensors or pytorch_model*.bin weight files")
        self._where: dict[str, tuple[str, str]] = {}  # store name -> (file, checkpoint key)
        for f in files:
            for key in self._keys(f):
                name = key_to_name(key)
                if name is not None:
                    self._where[name] = (f, key)
        stats = [(os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
        self.fingerprint = "checkpoint:" + hashlib.sha256(repr(stats).encode()).hexdigest()[:16]
        self._bin_cache: dict[str, dict] = {}

    def _keys(self, f: str) -> list[str]:
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(f, framework="pt") as st:
                return list(st.keys())
        return list(self._load_bin(f).keys())

    def _load_bin(self, f: str) -> dict:
        if f not in self._bin_cache:  # mmap: tensors are read only when touched
            self._bin_cache[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
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


@dataclass
class ResolvedModel:
    spec: ModelSpec
    source: object
    tokenizer_path: str | None
    store_key: str


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
        return ResolvedModel(spec, DummySource(spec, seed), None, f"{spec.name}-dummy{seed}")
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
    return ResolvedModel(spec, CheckpointSource(path, family.checkpoint_key_to_name), tokenizer, key)


def _names() -> list[str]:
    from .models import BUILTIN
    return sorted(BUILTIN)


class TensorStore:
    """One file per tensor (padded for O_DIRECT) plus a manifest; the manifest is written last, so a
    conversion that died leaves tensors the manifest does not list, and they are converted again.
    With `compression`, matmul weights are stored packed: codes in `NAME.q.bin`, the per-group
    minimum and step in `NAME.s.bin`."""

    def __init__(self, root: str, fingerprint: str, dtype: torch.dtype,
                 compression: CompressionConfig | None = None):
        self.root, self.fingerprint, self.dtype, self.compression = root, fingerprint, dtype, compression
        self.tensors: dict[str, dict] = {}

    def files(self, name: str) -> dict[str, str]:
        """Role -> path of the files holding `name` ("raw", or "codes" and "scales")."""
        if "packed" in self.tensors.get(name, {}):
            return {"codes": os.path.join(self.root, name + ".q.bin"),
                    "scales": os.path.join(self.root, name + ".s.bin")}
        return {"raw": os.path.join(self.root, name + ".bin")}

    def nbytes(self, name: str) -> int:
        entry = self.tensors[name]
        return sum(entry["packed"]["nbytes"]) if "packed" in entry else entry["nbytes"]

    def ensure(self, specs: list[WeightSpec], source, progress: bool = True) -> None:
        """Make every tensor in `specs` available, converting what is missing. Pipeline ranks that
        share an offload dir take turns (a file lock), each adding its own stage's tensors."""
        os.makedirs(os.path.dirname(self.root), exist_ok=True)
        with open(self.root + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._ensure_locked(specs, source, progress)

    def _ensure_locked(self, specs: list[WeightSpec], source, progress: bool) -> None:
        self._open_or_reset()
        wanted = {s.name: s for s in specs}
        for name in wanted.keys() & self.tensors.keys():
            self._check(name, wanted[name])
        missing = [wanted[n] for n in wanted if n not in self.tensors]
        if not missing:
            return
        for s in tqdm(missing, desc=f"converting weights into {self.root}", unit="tensor",
                      disable=None if progress else True):
            self.tensors[s.name] = self._convert(s, source.get(s.name, s.shape, self.dtype))
        self._write_manifest()

    def _convert(self, spec: WeightSpec, t: torch.Tensor) -> dict:
        entry = {"shape": list(spec.shape), "nbytes": t.numel() * t.element_size()}
        if self.compression is None or not spec.compressible:
            write_file(os.path.join(self.root, spec.name + ".bin"), t)
            return entry
        c = quantize(t, self.compression)
        scales = torch.stack([c.mins, c.steps])
        write_file(os.path.join(self.root, spec.name + ".q.bin"), c.data)
        write_file(os.path.join(self.root, spec.name + ".s.bin"), scales)
        entry["packed"] = {"codes": list(c.data.shape), "scales": list(scales.shape),
                           "nbytes": [nbytes(c.data), nbytes(scales)]}
        return entry

    def _open_or_reset(self) -> None:
        manifest = os.path.join(self.root, MANIFEST)
        try:
            with open(manifest) as f:
                data = json.load(f)
        except FileNotFoundError:
            data = None
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}
        expected = self._identity()
        if data is not None and {k: data.get(k) for k in expected} != expected:
            print(f"note: weight store {self.root} is stale (checkpoint, dtype or compression changed); rebuilding")
            shutil.rmtree(self.root)
            data = None
        self.tensors = (data or {}).get("tensors", {})
        os.makedirs(self.root, exist_ok=True)

    def _identity(self) -> dict:
        return {"version": STORE_VERSION, "source": self.fingerprint, "dtype": str(self.dtype),
                "compression": None if self.compression is None else vars(self.compression)}

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
        data = {**self._identity(), "tensors": self.tensors}
        tmp = os.path.join(self.root, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, os.path.join(self.root, MANIFEST))

    def file_bytes(self, name: str) -> int:
        """What reading `name` takes in buffers: its files' padded sizes."""
        entry = self.tensors[name]
        return sum(map(padded, entry["packed"]["nbytes"] if "packed" in entry else [entry["nbytes"]]))

    def read(self, name: str, alloc=None):
        """One stored tensor from disk (bypassing the page cache): a tensor, or a CompressedTensor.
        `alloc` gives the read buffers (see memory.read_file)."""
        entry, files = self.tensors[name], self.files(name)
        if "packed" not in entry:
            return read_file(files["raw"], entry["nbytes"], alloc).view(self.dtype).view(entry["shape"])
        packed = entry["packed"]
        codes = read_file(files["codes"], packed["nbytes"][0], alloc).view(packed["codes"])
        scales = read_file(files["scales"], packed["nbytes"][1], alloc).view(self.dtype).view(packed["scales"])
        return CompressedTensor(codes, scales[0], scales[1], tuple(entry["shape"]), self.compression)
