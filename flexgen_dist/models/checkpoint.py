"""Where a model's weights come from: a local Hugging Face directory (safetensors or .bin, sharded
or not), the hub, or seeded dummy weights; and the model's spec, tokenizer and stop tokens."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import zlib
from dataclasses import dataclass

import torch

from .base import Derived, ModelError, ModelSpec
from .registry import BUILTIN, builtin_spec, family_of, spec_from_dir


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

    def __init__(self, path: str, keys: dict[str, tuple[str | Derived, ...]]):
        """`keys`: every weight the model needs -> the checkpoint keys it may be stored under (the
        family's map; a `Derived` entry needs all the keys it names). A weight the checkpoint lacks
        is refused here, in one line naming its key, before anything is converted."""
        self.path = path
        self._bin_cache: dict[str, dict] = {}
        files = checkpoint_files(path)
        self._found = {key: f for f in files for key in self._keys(f)}
        self._where: dict[str, str | Derived] = {}  # store name -> the checkpoint entry it is read from
        for name, candidates in keys.items():
            entry = next((k for k in candidates if all(n in self._found for n in _names_of(k))), None)
            if entry is None:
                lacking = next(n for n in _names_of(candidates[0]) if n not in self._found)
                raise ModelError(f"checkpoint {path} has no tensor {lacking}: the model's config needs it")
            self._where[name] = entry
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

    def _tensor(self, key: str, index: int | None = None) -> torch.Tensor:
        """Checkpoint tensor `key`, or only its slab `index` along the first dimension."""
        f = self._found[key]
        if not f.endswith(".safetensors"):
            t = self._load_bin(f)[key]
            return t if index is None else t[index]
        from safetensors import safe_open
        with safe_open(f, framework="pt") as st:
            return st.get_tensor(key) if index is None else st.get_slice(key)[index]

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if name not in self._where:
            raise ModelError(f"checkpoint {self.path} has no tensor for {name}")
        entry = self._where[name]
        if isinstance(entry, Derived):
            t, key = entry.cut(*(self._tensor(k, entry.index) for k in entry.keys)), f"{name} (from {entry.keys[0]})"
        else:
            t, key = self._tensor(entry), entry
        if tuple(t.shape) != tuple(shape):
            raise ModelError(f"checkpoint tensor {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t.to(dtype).contiguous()  # a cut may be a strided view


def _names_of(entry: str | Derived) -> tuple[str, ...]:
    return entry.keys if isinstance(entry, Derived) else (entry,)


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
    return ResolvedModel(spec, CheckpointSource(path, family.checkpoint_keys(spec)), tokenizer, key,
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
    return sorted(BUILTIN)
