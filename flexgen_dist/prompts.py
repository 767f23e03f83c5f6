"""Reading prompts: text lines, JSONL with `prompt` or `input_ids`, or synthetic token prompts."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .errors import FlexGenError


@dataclass
class Prompt:
    index: int
    text: str | None = None
    ids: list[int] | None = None


def read_prompts(path: str) -> list[Prompt]:
    if not os.path.isfile(path):
        raise FlexGenError(f"prompts file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    filled = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not filled:
        raise FlexGenError(f"prompts file {path} has no prompts")
    if path.endswith(".jsonl") or filled[0][1].lstrip().startswith("{"):
        return [_jsonl_prompt(path, n, line, i) for i, (n, line) in enumerate(filled)]
    return [Prompt(i, text=line) for i, (_, line) in enumerate(filled)]


def _jsonl_prompt(path: str, line_no: int, line: str, index: int) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise FlexGenError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        return Prompt(index, text=obj["prompt"])
    ids = obj.get("input_ids") if isinstance(obj, dict) else None
    if isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return Prompt(index, ids=ids)
    raise FlexGenError(f"{path} line {line_no}: needs a 'prompt' string or a non-empty 'input_ids' list of integers")


def synthetic_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[Prompt]:
    """Random token prompts (the benchmark workload), reproducible from the seed."""
    if length < 1:
        raise FlexGenError(f"--prompt-len must be at least 1, got {length}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (count, length), generator=g)
    return [Prompt(i, ids=row.tolist()) for i, row in enumerate(ids)]


def tokenize(prompts: list[Prompt], tokenizer) -> list[list[int]]:
    if any(p.ids is None for p in prompts) and tokenizer is None:
        raise FlexGenError("text prompts need a tokenizer: the model directory has none; pass --tokenizer "
                           "DIR or give JSONL prompts with 'input_ids'")
    return [p.ids if p.ids is not None else tokenizer(p.text)["input_ids"] for p in prompts]
