"""The public Engine: from_pretrained + generate, in the style of Hugging Face transformers."""
from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .errors import FlexGenError
from .executor import LocalExecutor
from .memory import Devices
from .models import family_of
from .models.base import StepInputs
from .policy import Policy, Tier
from .sampling import choose_tokens, sequence_generators
from .weights import TensorStore, resolve_model

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(kw_only=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[int] = field(default_factory=list)
    """Token ids that end a sequence; later positions are filled with the pad token."""
    seed: int = 0

    def validate(self) -> "GenerationConfig":
        if self.max_new_tokens < 1:
            raise FlexGenError(f"gen-len / max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise FlexGenError(f"temperature must be positive when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FlexGenError(f"top-p must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class GenerationStats:
    prefill_time: float = 0.0
    decode_time: float = 0.0
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_tokens: int = 0  # generated after the first token (the prefill produces one)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    io_wait: float = 0.0

    @property
    def total_throughput(self) -> float:
        return self.generated_tokens / max(self.prefill_time + self.decode_time, 1e-9)

    def as_dict(self) -> dict:
        t = self.prefill_time + self.decode_time
        return {
            "prompts": self.prompts, "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_latency_s": self.prefill_time,
            "prefill_throughput": self.prompt_tokens / max(self.prefill_time, 1e-9),
            "decode_latency_s": self.decode_time,
            "decode_throughput": self.decode_tokens / max(self.decode_time, 1e-9),
            "total_latency_s": t, "total_throughput": self.total_throughput,
            "io_wait_s": self.io_wait, "peak_bytes": self.peak_bytes, "peak_rss_bytes": self.peak_rss_bytes,
        }


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = True
    return ids, mask


def step_inputs(mask: torch.Tensor, new: int, dtype: torch.dtype, device) -> StepInputs:
    """Positions and the additive attention bias for the last `new` columns of `mask`."""
    total = mask.shape[1]
    start = total - new
    positions = ((mask.long().cumsum(1) - 1) * mask)[:, start:]
    causal = torch.arange(total)[None, :] <= torch.arange(start, total)[:, None]  # (new, total)
    visible = causal[None, None] & mask[:, None, None, :]
    bias = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return StepInputs(positions.to(device), bias.to(device), start)


def normalize_prompts(input_ids, attention_mask=None) -> list[list[int]]:
    """A list of id lists, or a (N, L) tensor with an optional mask, to a list of id lists."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        return [row[m].tolist() for row, m in zip(input_ids, mask)]
    return [list(map(int, p)) for p in input_ids]


class Engine:
    """Offloaded generation on one rank. Create it with `Engine.from_pretrained`."""

    def __init__(self, spec, executor: LocalExecutor, policy: Policy, devices: Devices, dtype, tokenizer_path):
        self.spec, self.executor, self.policy, self.devices, self.dtype = spec, executor, policy, devices, dtype
        self.tokenizer_path = tokenizer_path
        self.last_stats = GenerationStats()
        self.progress = sys.stderr.isatty()

    @classmethod
    def from_pretrained(cls, name_or_path: str, policy: Policy | None = None,
                        offload_dir: str = "~/flexgen_offload_dir", dtype: str | torch.dtype | None = None,
                        dummy_weights: bool = False, seed: int = 0) -> "Engine":
        policy = (policy or Policy()).validate()
        devices = Devices.detect(policy.pin_weight)
        if policy.cpu_cache_compute and devices.compute.type != "cpu":
            raise FlexGenError("--cpu-cache-compute is not implemented for CUDA compute devices yet")
        dtype = resolve_dtype(dtype, devices)
        offload_dir = prepare_offload_dir(offload_dir)
        model = resolve_model(name_or_path, dummy_weights=dummy_weights, seed=seed)
        layers = family_of(model.spec).build_layers(model.spec, sep_layer=policy.sep_layer)
        compression = policy.weight_compression()
        suffix = f"-q{compression.num_bits}g{compression.group_size}" if compression else ""
        store_dir = os.path.join(offload_dir, "weights", f"{model.store_key}-{str(dtype).split('.')[-1]}{suffix}")
        store = TensorStore(store_dir, model.source.fingerprint, dtype, compression)
        store.ensure([w for layer in layers for w in layer.weights], model.source)
        work_dir = os.path.join(offload_dir, "work")
        os.makedirs(work_dir, exist_ok=True)
        executor = LocalExecutor(layers, store, policy, devices, dtype, work_dir)
        return cls(model.spec, executor, policy, devices, dtype, model.tokenizer_path)

    @property
    def tokenizer(self):
        if self.tokenizer_path is None:
            return None
        if not hasattr(self, "_tokenizer"):
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop=None, seed: int = 0,
                 return_logits: bool = False):
        """Token ids (N, longest prompt + new tokens), prompts left-padded as transformers returns
        them; with `return_logits`, also a list with one (N, vocab) float tensor per step."""
        stop = [stop] if isinstance(stop, int) else list(stop or [])
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, stop=stop, seed=seed).validate()
        prompts = normalize_prompts(input_ids, attention_mask)
        self._check_prompts(prompts, config.max_new_tokens)
        stats = GenerationStats(prompts=len(prompts), prompt_tokens=sum(map(len, prompts)))
        block = self.policy.block_size
        starts = range(0, len(prompts), block)
        bar = tqdm(total=len(starts) * config.max_new_tokens, unit="step", desc="generating",
                   disable=not self.progress)
        results = []
        for b0 in starts:
            chunk = prompts[b0:b0 + block]
            filled = chunk + [chunk[-1]] * (block - len(chunk))  # pad the last block; dropped below
            gens, logits = self._generate_block(filled, list(range(b0, b0 + block)), config, stats, bar)
            results.append((gens[:len(chunk)], [lg[:len(chunk)] for lg in logits]))
        bar.close()
        self._finish_stats(stats)
        ids = self._assemble(prompts, [g for gens, _ in results for g in gens])
        if not return_logits:
            return ids
        return ids, self._assemble_logits(results, ids.shape[1] - max(map(len, prompts)))

    def _check_prompts(self, prompts: list[list[int]], new: int) -> None:
        if not prompts:
            raise FlexGenError("no prompts given")
        for i, p in enumerate(prompts):
            if not p:
                raise FlexGenError(f"prompt {i} is empty")
            if len(p) + new > self.spec.max_positions:
                raise FlexGenError(f"prompt {i} has {len(p)} tokens; with {new} new tokens it needs "
                                   f"{len(p) + new} positions but the model has {self.spec.max_positions}")
            bad = [t for t in p if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise FlexGenError(f"prompt {i} has token id {bad[0]} outside the vocabulary (0-{self.spec.vocab_size - 1})")

    def _generate_block(self, prompts, indices, config: GenerationConfig, stats: GenerationStats, bar):
        gbs, device = self.policy.gpu_batch_size, self.devices.compute
        ids, mask = left_pad(prompts, self.spec.pad_token_id)
        caches = self.executor.allocate_caches([gbs] * self.policy.num_gpu_batches,
                                               ids.shape[1] + config.max_new_tokens)
        generators = sequence_generators(config.seed, indices) if config.do_sample else None
        stop = torch.tensor(config.stop, dtype=torch.long)
        stopped = torch.zeros(len(prompts), dtype=torch.bool)
        tokens, steps, logits_per_step = ids, [], []
        try:
            for step in range(config.max_new_tokens):
                t0 = time.perf_counter()
                new = tokens.shape[1]
                inputs = [step_inputs(m, new, self.dtype, device) for m in mask.split(gbs)]
                xs = [t.to(device) for t in tokens.split(gbs)]
                logits = torch.cat(self.executor.forward_step(xs, inputs, caches)).float().cpu()
                chosen = choose_tokens(logits, config.do_sample, config.temperature, config.top_p, generators)
                chosen = chosen.masked_fill(stopped, self.spec.pad_token_id)
                live = ~stopped
                stopped |= torch.isin(chosen, stop)
                steps.append((chosen, live))
                logits_per_step.append(logits)
                elapsed = time.perf_counter() - t0
                if step == 0:
                    stats.prefill_time += elapsed
                else:
                    stats.decode_time += elapsed
                bar.update(1)
                if bool(stopped.all()):
                    bar.update(config.max_new_tokens - step - 1)
                    break
                tokens = chosen[:, None]
                mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.bool)], dim=1)
        finally:
            self.executor.free_caches(caches)
        real = min(len(prompts), stats.prompts - indices[0])
        for step, (_, live) in enumerate(steps):
            n = int(live[:real].sum())
            stats.generated_tokens += n
            stats.decode_tokens += n if step else 0
        gens = torch.stack([c for c, _ in steps], dim=1)
        return list(gens), logits_per_step

    def _assemble(self, prompts, gens) -> torch.Tensor:
        ids, _ = left_pad(prompts, self.spec.pad_token_id)
        width = max(len(g) for g in gens)
        out = torch.full((len(prompts), width), self.spec.pad_token_id, dtype=torch.long)
        for r, g in enumerate(gens):
            out[r, :len(g)] = g
        return torch.cat([ids, out], dim=1)

    @staticmethod
    def _assemble_logits(results, steps: int) -> list[torch.Tensor]:
        out = []
        for s in range(steps):
            parts = [lg[s] if s < len(lg) else torch.full_like(lg[0], float("nan")) for _, lg in results]
            out.append(torch.cat(parts))
        return out

    def _finish_stats(self, stats: GenerationStats) -> None:
        stats.peak_bytes = {t.value: self.devices.usage[t].peak for t in Tier}
        if self.devices.compute.type == "cuda":
            stats.peak_bytes["cuda_allocated"] = torch.cuda.max_memory_allocated()
        stats.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stats.io_wait = self.executor.timers.io_wait
        self.last_stats = stats

    def close(self) -> None:
        self.executor.close()


def resolve_dtype(dtype, devices: Devices) -> torch.dtype:
    if dtype is None:
        return torch.float16 if devices.compute.type == "cuda" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise FlexGenError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def prepare_offload_dir(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise FlexGenError(f"offload dir {path} is not writable ({e.strerror})") from None
    return path
