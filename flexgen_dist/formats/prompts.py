"""Reading prompts: text lines, JSONL with `prompt`, `input_ids` or chat `messages`, or synthetic
token prompts."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..core.errors import FlexGenError


@dataclass
class Prompt:
    index: int
    text: str | None = None
    ids: list[int] | None = None
    messages: list[dict] | None = None  # chat turns ({role, content}), formatted by the tokenizer's template


def prompt_lines(path: str) -> tuple[list[tuple[int, str]], bool]:
    """The non-empty lines of a prompts file with their line numbers, and whether it is JSONL
    (a .jsonl name, or a first line that opens an object)."""
    if not os.path.isfile(path):
        raise FlexGenError(f"prompts file {path} does not exist")
    with open(path, "rb") as f:
        lines = _lines(path, f.read())
    filled = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not filled:
        raise FlexGenError(f"prompts file {path} has no prompts")
    return filled, path.endswith(".jsonl") or filled[0][1].lstrip().startswith("{")


def read_prompts(path: str) -> list[Prompt]:
    filled, jsonl = prompt_lines(path)
    if jsonl:
        return [_jsonl_prompt(path, n, line, i) for i, (n, line) in enumerate(filled)]
    return [Prompt(i, text=line) for i, (_, line) in enumerate(filled)]


def _lines(path: str, data: bytes) -> list[str]:
    """Lines split on "\\n" only (JSONL's rule: U+2028, form feeds and record separators are
    characters of a prompt, not line ends), a trailing "\\r" dropped, each decoded as UTF-8."""
    lines = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise FlexGenError(f"{path} line {n} is not UTF-8 (byte {e.start + 1}: {raw[e.start:e.start + 1]!r})") from None
    return lines


def _jsonl_prompt(path: str, line_no: int, line: str, index: int) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise FlexGenError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
    return prompt_from_object(path, line_no, obj, index)


def prompt_from_object(path: str, line_no: int, obj, index: int) -> Prompt:
    """The prompt of one parsed JSONL line: its `prompt` text, `input_ids` or chat `messages`."""
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        return Prompt(index, text=obj["prompt"])
    ids = obj.get("input_ids") if isinstance(obj, dict) else None
    if isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return Prompt(index, ids=ids)
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if messages is not None:
        return Prompt(index, messages=checked_messages(path, line_no, messages))
    raise FlexGenError(f"{path} line {line_no}: needs a 'prompt' string, a non-empty 'input_ids' list of integers "
                       "or a 'messages' list")


def checked_messages(path: str, line_no: int, messages) -> list[dict]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise FlexGenError(f"{path} line {line_no}: 'messages' must be a non-empty list of "
                           "{\"role\": ..., \"content\": ...} objects with string values")
    return messages


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
    return [p.ids if p.ids is not None else encode(p, tokenizer) for p in prompts]


def encode(prompt: Prompt, tokenizer) -> list[int]:
    if prompt.messages is None:
        return tokenizer(prompt.text)["input_ids"]
    return tokenizer(chat_text(prompt.messages, tokenizer), add_special_tokens=False)["input_ids"]


def chat_text(messages: list[dict], tokenizer) -> str:
    """The conversation as the model was trained to see it, ending where the assistant's reply
    starts. The template writes the special tokens itself, so encoding it must not add more."""
    if not getattr(tokenizer, "chat_template", None):
        raise FlexGenError("chat prompts ('messages') need a tokenizer with a chat template; this one has none "
                           "(give 'prompt' text instead)")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
