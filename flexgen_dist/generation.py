"""The public Engine: from_pretrained + generate, in the style of Hugging Face transformers."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .errors import FlexGenError
from .dist import DistContext
from .executor import LocalExecutor
from .memory import Devices, peak_rss_bytes
from .models import family_of
from .models.base import StepInputs
from .pipeline import Ring, partition_stages
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
    comm_wait: float = 0.0  # time this rank waited for its input from the ring

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
            "io_wait_s": self.io_wait, "comm_wait_s": self.comm_wait, "peak_bytes": self.peak_bytes, "peak_rss_bytes": self.peak_rss_bytes,
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
    """Offloaded generation over this rank's pipeline stage (the whole model on one rank).

    Create it with `Engine.from_pretrained`. Under mpirun every rank builds its own Engine and
    calls `generate` with the same prompts; rank 0 gets the token ids, the others get None."""

    def __init__(self, spec, executor: LocalExecutor, policy: Policy, devices: Devices, dtype, tokenizer_path,
                 ctx: DistContext, ring: Ring, micro_batches: int, stage: tuple[int, int]):
        self.spec, self.executor, self.policy, self.devices, self.dtype = spec, executor, policy, devices, dtype
        self.tokenizer_path, self.ctx, self.ring, self.micro_batches, self.stage = tokenizer_path, ctx, ring, micro_batches, stage
        self.last_stats = GenerationStats()
        self.progress = sys.stderr.isatty() and ctx.first

    @classmethod
    def from_pretrained(cls, name_or_path: str, policy: Policy | None = None,
                        offload_dir: str = "~/flexgen_offload_dir", dtype: str | torch.dtype | None = None,
                        dummy_weights: bool = False, seed: int = 0, dist: DistContext | None = None,
                        stage_layers: list[int] | None = None, micro_batches: int | None = None,
                        comm_timeout: float = 600.0) -> "Engine":
        """`dist` (from `flexgen_dist.dist.init`) makes this rank one pipeline stage; `stage_layers`
        overrides the cost-balanced split; `micro_batches` defaults to the number of stages."""
        ctx = dist or DistContext()
        policy = (policy or Policy()).validate()
        devices = Devices.detect(policy.pin_weight)
        if policy.cpu_cache_compute and devices.compute.type != "cpu":
            raise FlexGenError("--cpu-cache-compute is not implemented for CUDA compute devices yet")
        dtype = resolve_dtype(dtype, devices)
        offload_dir = prepare_offload_dir(offload_dir)
        model = resolve_model(name_or_path, dummy_weights=dummy_weights, seed=seed)
        family = family_of(model.spec)
        first, last = stage_range(model.spec, family, ctx, stage_layers)
        layers = family.build_layers(model.spec, first, last, with_embed=ctx.first, with_head=ctx.last,
                                     sep_layer=policy.sep_layer)
        compression = policy.weight_compression()
        suffix = f"-q{compression.num_bits}g{compression.group_size}" if compression else ""
        store_dir = os.path.join(offload_dir, "weights", f"{model.store_key}-{str(dtype).split('.')[-1]}{suffix}")
        store = TensorStore(store_dir, model.source.fingerprint, dtype, compression)
        store.ensure([w for layer in layers for w in layer.weights], model.source, progress=ctx.first)
        work_dir = os.path.join(offload_dir, "work")
        os.makedirs(work_dir, exist_ok=True)
        executor = LocalExecutor(layers, store, policy, devices, dtype, work_dir)
        ring = Ring(ctx, devices.compute, comm_timeout)
        return cls(model.spec, executor, policy, devices, dtype, model.tokenizer_path, ctx, ring,
                   micro_batches or ctx.world_size, (first, last))

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
                 return_logits: bool = False, force_tokens=None):
        """Token ids (N, longest prompt + new tokens), prompts left-padded as transformers returns
        them; with `return_logits`, also a list with one (N, vocab) float tensor per step.
        `force_tokens` (N, max_new_tokens) feeds given tokens instead of chosen ones (scoring)."""
        stop = [stop] if isinstance(stop, int) else list(stop or [])
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, stop=stop, seed=seed).validate()
        if return_logits and self.ctx.world_size > 1:
            raise FlexGenError("return_logits is only available on a single rank")
        prompts = normalize_prompts(input_ids, attention_mask)
        self._check_prompts(prompts, config.max_new_tokens)
        stats = GenerationStats(prompts=len(prompts), prompt_tokens=sum(map(len, prompts)))
        block = self.micro_batches * self.policy.block_size
        starts = range(0, len(prompts), block)
        bar = tqdm(total=len(starts) * config.max_new_tokens, unit="step", desc="generating",
                   disable=not self.progress)
        gens, logits = [], []
        for b0 in starts:
            chunk = prompts[b0:b0 + block]
            filled = chunk + [chunk[-1]] * (block - len(chunk))  # pad the last block; dropped below
            forced = None if force_tokens is None else torch.as_tensor(force_tokens)[b0:b0 + block]
            block_gens, block_logits = self._run_block(filled, b0, config, stats, bar, forced)
            if self.ctx.first:
                gens += list(block_gens[:len(chunk)])
                logits.append([lg[:len(chunk)] for lg in block_logits])
        bar.close()
        self.ring.flush()
        if not self.ctx.first:
            return None
        self._finish_stats(stats, gens, config.stop, len(prompts))
        ids = self._assemble(prompts, trim_after_stop(gens, config.stop))
        if not return_logits:
            return ids
        return ids, self._assemble_logits(logits, ids.shape[1] - max(map(len, prompts)))

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

    def _run_block(self, prompts, b0: int, config: GenerationConfig, stats: GenerationStats, bar, forced):
        """One block of `micro_batches` micro-batches through this rank's stage, every token step.

        Rank 0 feeds prompts (step 0) and the tokens that come back around the ring; the last rank
        samples. Returns (tokens (rows, steps), per-step logits) on rank 0."""
        ctx, ring, ex = self.ctx, self.ring, self.executor
        gbs, rows = self.policy.gpu_batch_size, self.policy.block_size
        device, steps = self.devices.compute, config.max_new_tokens
        micro = [left_pad(prompts[t * rows:(t + 1) * rows], self.spec.pad_token_id) for t in range(self.micro_batches)]
        masks = [mask for _, mask in micro]
        caches = [ex.allocate_caches([gbs] * self.policy.num_gpu_batches, ids.shape[1] + steps) for ids, _ in micro]
        chooser = TokenChooser(config, self.spec.pad_token_id, b0, rows, self.micro_batches, forced) if ctx.last else None
        self._expect_inputs(micro, steps)
        received = [[] for _ in micro]
        t0, prefill_end = time.perf_counter(), None
        try:
            for i in range(steps):
                for t, (ids, _) in enumerate(micro):
                    new = ids.shape[1] if i == 0 else 1
                    inputs = [step_inputs(m, new, self.dtype, device) for m in masks[t].split(gbs)]
                    x = ids if ctx.first and i == 0 else ring.receive()
                    if ctx.first and i > 0:  # the tokens chosen at step i - 1
                        received[t].append(x.cpu())
                        x = x[:, None]
                        prefill_end = prefill_end or (time.perf_counter() if t == len(micro) - 1 else None)
                    y = torch.cat(ex.forward_step([c.to(device) for c in x.split(gbs)], inputs, caches[t]))
                    ring.send(chooser.choose(y, t, i) if ctx.last else y)
                    masks[t] = torch.cat([masks[t], torch.ones((len(masks[t]), 1), dtype=torch.bool)], dim=1)
                bar.update(1)
                if ctx.world_size == 1 and chooser.all_stopped():
                    bar.update(steps - i - 1)
                    break
            if ctx.first:  # the last step's tokens are still on their way around the ring
                for t in range(len(micro)):
                    received[t].append(ring.receive().cpu())
        finally:
            ex.drain()
            for c in caches:
                ex.free_caches(c)
        end = time.perf_counter()
        prefill_end = prefill_end or end
        stats.prefill_time += prefill_end - t0
        stats.decode_time += end - prefill_end
        if not ctx.first:
            return None, []
        gens = torch.cat([torch.stack(r, dim=1) for r in received])
        logits = [torch.cat(step) for step in zip(*chooser.logits)] if ctx.world_size == 1 else []
        return gens, logits

    def _expect_inputs(self, micro, steps: int) -> None:
        """Tell the ring, in order, what this rank will receive during the block."""
        if self.ctx.first:
            for _ in range(steps):
                for ids, _ in micro:
                    self.ring.expect((len(ids),), torch.long)
            return
        for i in range(steps):
            for ids, _ in micro:
                self.ring.expect((len(ids), ids.shape[1] if i == 0 else 1, self.spec.hidden_size), self.dtype)

    def _assemble(self, prompts, gens) -> torch.Tensor:
        ids, _ = left_pad(prompts, self.spec.pad_token_id)
        width = max(len(g) for g in gens)
        out = torch.full((len(prompts), width), self.spec.pad_token_id, dtype=torch.long)
        for r, g in enumerate(gens):
            out[r, :len(g)] = g
        return torch.cat([ids, out], dim=1)

    @staticmethod
    def _assemble_logits(blocks, steps: int) -> list[torch.Tensor]:
        out = []
        for s in range(steps):
            parts = [lg[s] if s < len(lg) else torch.full_like(lg[0], float("nan")) for lg in blocks]
            out.append(torch.cat(parts))
        return out

    def _finish_stats(self, stats: GenerationStats, gens, stop: list[int], count: int) -> None:
        for g in gens[:count]:
            n = generated_length(g.tolist(), stop)
            stats.generated_tokens += n
            stats.decode_tokens += max(n - 1, 0)
        stats.peak_bytes = {t.value: self.devices.usage[t].peak for t in Tier}
        if self.devices.compute.type == "cuda":
            stats.peak_bytes["cuda_allocated"] = torch.cuda.max_memory_allocated()
        stats.peak_rss_bytes = peak_rss_bytes()
        stats.io_wait = self.executor.timers.io_wait
        stats.comm_wait = self.ring.idle
        self.last_stats = stats

    def close(self) -> None:
        self.executor.close()


class TokenChooser:
    """The last rank's sampling state for one block: generators, stop tracking, forced tokens."""

    def __init__(self, config: GenerationConfig, pad: int, b0: int, rows: int, micro: int, forced):
        self.config, self.pad, self.rows, self.forced = config, pad, rows, forced
        self.generators = [sequence_generators(config.seed, list(range(b0 + t * rows, b0 + (t + 1) * rows)))
                           if config.do_sample else None for t in range(micro)]
        self.stopped = [torch.zeros(rows, dtype=torch.bool) for _ in range(micro)]
        self.stop = torch.tensor(config.stop, dtype=torch.long)
        self.logits: list[list[torch.Tensor]] = [[] for _ in range(micro)]

    def choose(self, logits: torch.Tensor, t: int, step: int) -> torch.Tensor:
        logits = logits.float().cpu()
        self.logits[t].append(logits)
        if self.forced is not None:
            chosen = self.forced[t * self.rows:(t + 1) * self.rows, step]
        else:
            c = self.config
            chosen = choose_tokens(logits, c.do_sample, c.temperature, c.top_p, self.generators[t])
        chosen = chosen.masked_fill(self.stopped[t], self.pad)
        self.stopped[t] |= torch.isin(chosen, self.stop)
        return chosen

    def all_stopped(self) -> bool:
        return all(bool(s.all()) for s in self.stopped)


def generated_length(tokens: list[int], stop: list[int]) -> int:
    """Tokens really generated: up to and including the first stop token."""
    for i, t in enumerate(tokens):
        if t in stop:
            return i + 1
    return len(tokens)


def trim_after_stop(gens: list[torch.Tensor], stop: list[int]) -> list[torch.Tensor]:
    """Drop trailing steps in which every sequence had already stopped (as transformers does)."""
    width = max(generated_length(g.tolist(), stop) for g in gens)
    return [g[:width] for g in gens]


def stage_range(spec, family, ctx: DistContext, stage_layers: list[int] | None) -> tuple[int, int]:
    """This rank's transformer layers [first, last), balanced by weight bytes unless given."""
    if ctx.world_size == 1:
        return 0, spec.num_layers
    if stage_layers is None:
        layers = family.build_layers(spec)
        size = lambda layer: sum(torch.Size(w.shape).numel() for w in layer.weights)  # noqa: E731
        blocks = [size(layer) for layer in layers[1:-1]]
        per_block = len(blocks) // spec.num_layers
        costs = [sum(blocks[i * per_block:(i + 1) * per_block]) for i in range(spec.num_layers)]
        stage_layers = partition_stages(costs, size(layers[0]), size(layers[-1]), ctx.world_size)
    first = sum(stage_layers[:ctx.rank])
    return first, first + stage_layers[ctx.rank]


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
