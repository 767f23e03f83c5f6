"""Accuracy of compression on a small trained model (make it with train_small_opt.py, or convert
SmolLM2-135M-Instruct with `python -m flexgen_dist.models.fetch smollm2-135m-instruct DIR`).

    python benchmark/bench_accuracy.py --model ~/small-opt [--sequences 8 --length 256]

The held-out text is the model directory's heldout.pt (token ids) when it has one, else the
held-out part of the Python standard library's sources (stdlib_corpus.py) in the model's tokenizer.

Every variant scores the same held-out text through the engine, token by token (teacher forcing:
the true token is fed back each step), so the KV cache is written and read exactly as in
generation. Reports held-out perplexity per variant, and greedy agreement: the share of positions
where the variant's most likely next token equals the bf16 engine's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F

from flexgen_dist import Engine, Policy
from flexgen_dist.kernels import int4
from flexgen_dist.core.compression import CompressionConfig

VARIANTS = {
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "bf16 + 4-bit weights": dict(dtype="bfloat16", compress_weight=True),
    "bf16 + 4-bit weights and embeddings": dict(dtype="bfloat16", compress_weight=True, compress_embeddings=True),
    "bf16 + 4-bit weights, FlexGen grouping": dict(dtype="bfloat16", compress_weight=True, compress_embeddings=True,
                                                   flexgen_grouping_=True),
    "bf16 + 4-bit cache": dict(dtype="bfloat16", compress_cache=True),
    "bf16 + 4-bit weights + cache": dict(dtype="bfloat16", compress_weight=True, compress_cache=True),
}


def flexgen_grouping():
    """The engine's weight compression as FlexGen (and this project before the int4 kernels) did
    it: groups along output channels (dim 0), min and step per group, dequantized before use, the
    vocabulary tables compressed too."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(int4, "fits", lambda *args: False))
    stack.enter_context(mock.patch.object(Policy, "weight_compression", lambda self: CompressionConfig(
        self.compress_bits, self.compress_group_size, dim=0, tables=self.compress_embeddings)
        if self.compress_weight else None))
    return stack


def score(model: str, sequences: torch.Tensor, offload: str, dtype: str, flexgen_grouping_: bool = False,
          **policy) -> torch.Tensor:
    """Per-position logits (N, T-1, vocab) for predicting tokens 1..T-1 of each sequence."""
    with flexgen_grouping() if flexgen_grouping_ else contextlib.nullcontext():
        engine = Engine.from_pretrained(model, policy=Policy(gpu_batch_size=len(sequences), **policy),
                                        offload_dir=offload, dtype=dtype)
    try:
        _, logits = engine.generate(sequences[:, :1].tolist(), max_new_tokens=sequences.shape[1] - 1,
                                    force_tokens=sequences[:, 1:], return_logits=True)
    finally:
        engine.close()
    return torch.stack(logits, dim=1)


def heldout_ids(model: str, tokens: int) -> torch.Tensor:
    path = os.path.join(model, "heldout.pt")
    if os.path.exists(path):
        return torch.load(path)
    from transformers import AutoTokenizer
    from stdlib_corpus import corpus  # benchmark/ is on sys.path when run as a script
    _, held = corpus(tokens * 6)  # about 3-4 characters per token of code
    return torch.tensor(AutoTokenizer.from_pretrained(model)(held)["input_ids"][:tokens])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--length", type=int, default=257, help="tokens per sequence (the first is the prompt)")
    p.add_argument("--offload-dir", default=os.path.expanduser("~/flexgen_offload_dir"))
    p.add_argument("--json", help="append the results here as one JSON line")
    p.add_argument("--group-size", type=int, default=64, choices=int4.GROUP_SIZES,
                   help="values per compression group (policy compress_group_size)")
    p.add_argument("--variants", help="comma-separated variant names to run (default all; bf16, the "
                   "baseline, always runs; a comma followed by a space is part of a name)")
    args = p.parse_args()
    chosen = re.split(r",(?! )", args.variants) if args.variants else list(VARIANTS)
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    variants = {name: options for name, options in VARIANTS.items() if name in chosen or name == "bf16"}
    held = heldout_ids(args.model, args.sequences * args.length * 2)
    stride = (len(held) - args.length) // args.sequences
    sequences = torch.stack([held[i * stride:i * stride + args.length] for i in range(args.sequences)])
    targets = sequences[:, 1:]
    results, greedy = {}, {}
    for name, options in variants.items():
        logits = score(args.model, sequences, args.offload_dir, compress_group_size=args.group_size, **options)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()
        greedy[name] = logits.argmax(-1)
        results[name] = {"perplexity": math.exp(nll)}
    base = results["bf16"]["perplexity"]
    for name in variants:
        results[name]["vs_bf16"] = results[name]["perplexity"] / base - 1
        results[name]["greedy_agreement"] = (greedy[name] == greedy["bf16"]).float().mean().item()
    positions = targets.numel()
    print(f"{positions} held-out positions ({args.sequences} sequences x {args.length - 1})")
    print(f"{'variant':32s} {'perplexity':>10s} {'vs bf16':>8s} {'agreement':>10s}")
    for name, r in results.items():
        print(f"{name:32s} {r['perplexity']:10.3f} {r['vs_bf16']:+8.2%} {r['greedy_agreement']:10.2%}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"model": args.model, "positions": positions, "group_size": args.group_size,
                                "results": results}) + "\n")


if __name__ == "__main__":
    main()
