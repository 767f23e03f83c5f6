"""The typed configuration: one set of dataclasses behind the command line, the Python API and the
JSON files in `configs/`. Each field's default and docstring are written once, here (or in
`Policy`); `--help` is generated from them.

- `EngineConfig`: how an `Engine` is built (`Engine.from_pretrained(..., **fields)`).
- `GenerationConfig`: how tokens are chosen (`Engine.generate(..., **fields)`); `RowParams`: the
  same for one sequence, as a request resolves it.
- `JobConfig`: what the command line runs (model, prompts, outputs).
- `Policy` (policy.py): placement, batching and compression.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Literal

from .errors import FlexGenError

DEFAULT_OFFLOAD_DIR = "~/flexgen_offload_dir"


@dataclass(kw_only=True)
class EngineConfig:
    """How the engine is built for one model on this rank."""

    offload_dir: str = DEFAULT_OFFLOAD_DIR
    """Where the converted weight store and disk-homed KV cache and activations live (private to
    you; may contain {rank} or {local_rank} to give each rank its own disk)."""
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    """Compute dtype. auto: bf16 or fp16 on CUDA; on a CPU bf16 only where a short probe finds
    it faster than fp32 (AMX, AVX-512 BF16), else fp32."""
    rebuild_store: bool = False
    """Convert the checkpoint into the weight store again (after a damaged store file is reported)."""
    dummy_weights: bool = False
    """Seeded random weights for a built-in model name or a config directory (benchmark mode)."""
    seed: int = 0
    """Seed of the dummy weights, the synthetic prompts and sampling."""
    stage_layers: list[int] | None = None
    """Transformer layers per pipeline rank, e.g. 6,6,7,5 (default: balanced by weight bytes)."""
    micro_batches: int | None = None
    """Blocks in flight through the pipeline (default: one per rank)."""
    prefill_chunks: int = 1
    """Pieces each micro-batch's prompts are cut into along their tokens for the prefill, each sent
    downstream once computed: more pieces shorten the pipeline's fill and drain, at the cost of one
    more pass over the stage's weights per piece (--policy auto chooses)."""
    comm_device: Literal["cpu", "gpu"] | None = None
    """Where pipeline stages exchange tensors: gpu = NCCL, cpu = gloo (default: gpu with CUDA)."""
    comm_timeout: float = 600.0
    """Seconds to wait for a peer rank before failing."""

    def validate(self, name=str) -> "EngineConfig":
        """Self, or a FlexGenError in one line naming the field as `name(field)` does."""
        for field_name in ("micro_batches", "prefill_chunks"):
            value = getattr(self, field_name)
            if value is not None and value < 1:
                raise FlexGenError(f"{name(field_name)} must be at least 1, got {value}")
        return self


@dataclass(kw_only=True)
class GenerationConfig:
    """How each next token is chosen and when a sequence ends."""

    max_new_tokens: int = 32
    """New tokens per prompt (at most; fewer where a stop token comes first)."""
    do_sample: bool = False
    """Sample with temperature and top-p instead of greedy choice."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability reaches this."""
    stop: list[int] = field(default_factory=list)
    """Stop tokens besides the model's end-of-sequence token (on the command line: an id, or text
    that is one token; repeatable). Later positions are filled with the pad token."""
    ignore_eos: bool = False
    """Do not stop at the model's end-of-sequence token: exactly max-new-tokens per prompt
    (benchmarks)."""
    seed: int = 0
    """Sampling seed; one generator per prompt, so a seed gives the same text whatever the batching."""

    def validate(self, name=str) -> "GenerationConfig":
        """Self, or a FlexGenError in one line naming the field as `name(field)` does."""
        if self.max_new_tokens < 1:
            raise FlexGenError(f"{name('max_new_tokens')} must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise FlexGenError(f"{name('temperature')} must be positive when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FlexGenError(f"{name('top_p')} must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class RowParams:
    """How one sequence is generated. Invariant: a row is finished after `max_tokens` tokens, or
    once it chose a token in `stop` or its tokens end with a sequence in `stop_sequences`."""

    max_tokens: int
    stop: list[int] = field(default_factory=list)
    stop_sequences: list[list[int]] = field(default_factory=list)  # multi-token stops (stop strings)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    key: int = 0  # the generator's key: the prompt's index in the input, whatever block it runs in


@dataclass(kw_only=True)
class JobConfig:
    """What one command-line run does."""

    model: str = "opt-125m"
    """Built-in name (opt-125m ... opt-175b), a local Hugging Face directory, or a hub id when online."""
    tokenizer: str | None = None
    """Tokenizer directory, when the model directory has none."""
    prompts: str | None = None
    """Text file (one prompt per line), JSONL with 'prompt' (text), 'input_ids' or chat 'messages'
    per line, or an OpenAI batch file (custom_id, method, url, body)."""
    prompt_len: int = 32
    """Without --prompts: length of the synthetic random-token prompts."""
    num_prompts: int | None = None
    """Without --prompts: how many synthetic prompts (default: one block)."""
    output: str | None = None
    """Write one JSON object per request to this JSONL file, in input order once the job is done;
    rows are journaled as blocks finish, and a rerun with the same output resumes the job."""
    strict: bool = False
    """Fail at the first bad request instead of writing an error record for it and going on."""
    fail_on_error: bool = False
    """Exit with status 3 when any request failed (each failed request's error record is written
    and the others still run); without it, status 3 only when no request succeeded."""
    bucket: bool = True
    """Group requests of similar prompt and requested length into blocks (less padding; same outputs)."""
    quiet: bool = False
    """No progress bar, plan or measuring lines (no bar anyway unless stderr, or under mpirun
    mpirun's stderr, is a terminal)."""
    log_file: str | None = None
    """Append one JSON line of metrics per run to this file."""
    verbose: bool = False
    """Tracebacks from every rank."""


@dataclass(kw_only=True)
class PlannerConfig:
    """How the placement is chosen: by the planner from a hardware profile, or as given."""

    policy: Literal["auto", "manual"] | None = None
    """auto: the planner chooses placement, batch sizes, dtype and (with ranks) stages and
    micro-batches, for these prompt and generation lengths; manual: the policy flags as given
    (default: auto unless --percent is given)."""
    gpu_mem: float | None = None
    """GiB of GPU memory a rank may plan for (default: what is free)."""
    cpu_mem: float | None = None
    """GiB of host memory this process may use in all (default: what the machine and its memory
    cgroup leave)."""
    disk_mem: float | None = None
    """GiB of disk the offload dir may take (default: its free space)."""
    rank_mem: list[float] | None = None
    """--cpu-mem for each rank of a pipeline, e.g. 2.5,6 (ranks on unequal machines)."""
    auto_compress: bool = False
    """Let the planner store weights and KV cache in 4 bits where that is faster (lossy: see the
    accuracy table in benchmark/RESULTS.md)."""
    reprofile: bool = False
    """Measure this machine again instead of using its cached hardware profile."""


def make(cls, values: dict, what: str):
    """`cls(**values)`, with an unknown name reported in one line."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise FlexGenError(f"{what}: unknown option {unknown[0]!r} (known: {', '.join(sorted(names))})")
    return cls(**values)


def pick(cls, namespace) -> dict:
    """The values of `cls`'s fields found as attributes of an argparse namespace."""
    return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body), one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)
