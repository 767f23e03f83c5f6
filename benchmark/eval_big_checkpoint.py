"""A 1.07 B-parameter Llama-shape checkpoint with SmolLM2's vocabulary and tokenizer, for scoring
through lm-eval with the model larger than a memory cgroup (benchmark/RESULTS.md, issue 27):
hidden 2048, 16 layers, 32 query / 8 KV heads, FFN 8192, tied embeddings, seeded dummy weights
(bf16, 2.1 GB), written by `bench_llama.write_checkpoint`.

    python benchmark/eval_big_checkpoint.py SMOLLM2_DIR OUT_DIR

SMOLLM2_DIR: a converted SmolLM2 (`python -m flexgen_dist.models.fetch smollm2-135m-instruct DIR`),
whose tokenizer files are copied."""
import dataclasses
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_llama

from flexgen_dist import models


def main(tokenizer_dir: str, out: str) -> None:
    base = models.builtin_spec("smollm2-135m")
    big = dataclasses.replace(base, name="smollm2-shape-1b", hidden_size=2048, ffn_dim=8192, num_layers=16,
                              num_heads=32, num_kv_heads=8, head_size=64, max_positions=2048)
    builtin = models.builtin_spec
    models.builtin_spec = lambda name: big if name == big.name else builtin(name)
    try:
        bench_llama.write_checkpoint(big.name, out)
    finally:
        models.builtin_spec = builtin
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), out)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
