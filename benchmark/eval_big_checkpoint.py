"""Checkpoints larger than a memory cgroup with SmolLM2's vocabulary and tokenizer, for scoring
through lm-eval (benchmark/RESULTS.md, issue 27); seeded dummy weights in bf16, written by
`bench_llama.write_checkpoint`.

    python benchmark/eval_big_checkpoint.py SMOLLM2_DIR OUT_DIR [--shape dense-1b | qwen3-moe] [--layers N]

dense-1b: a 1.07 B-parameter Llama shape (hidden 2048, 16 layers, 32 query / 8 KV heads, FFN 8192,
tied embeddings; 2.1 GB). qwen3-moe: Qwen3-30B-A3B's blocks (128 experts of FFN 768, top 8, 32
query / 4 KV heads of 128) for the first `--layers` of its 48 (default 8), with SmolLM2's 49152-token vocabulary
in place of Qwen's (8 layers: 5.0 B parameters, 10 GB).
SMOLLM2_DIR: a converted SmolLM2 (`python -m flexgen_dist.models.fetch smollm2-135m-instruct DIR`),
whose tokenizer files are copied."""
import argparse
import dataclasses
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_llama

from flexgen_dist import models


def shape(name: str):
    """The spec a shape name stands for, with SmolLM2's vocabulary and special tokens."""
    tokens = models.builtin_spec("smollm2-135m")
    vocab = {f: getattr(tokens, f) for f in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id",
                                             "eos_token_ids")}
    if name == "dense-1b":
        return dataclasses.replace(tokens, name="smollm2-shape-1b", hidden_size=2048, ffn_dim=8192, num_layers=16,
                                   num_heads=32, num_kv_heads=8, head_size=64, max_positions=2048)
    return dataclasses.replace(models.builtin_spec("qwen3-30b-a3b"), name="qwen3-moe-smollm2-vocab", **vocab)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tokenizer_dir")
    p.add_argument("out")
    p.add_argument("--shape", choices=("dense-1b", "qwen3-moe"), default="dense-1b")
    p.add_argument("--layers", type=int, help="only the first N blocks (default: all of dense-1b's, 8 of qwen3-moe's)")
    args = p.parse_args()
    if args.layers is None:
        args.layers = 8 if args.shape == "qwen3-moe" else 0
    big = shape(args.shape)
    builtin = models.builtin_spec
    models.builtin_spec = lambda name: big if name == big.name else builtin(name)
    try:
        bench_llama.write_checkpoint(big.name, args.out, layers=args.layers)
    finally:
        models.builtin_spec = builtin
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.tokenizer_dir, name), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
