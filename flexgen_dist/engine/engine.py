"""The public Engine: from_pretrained + generate, in the style of Hugging Face transformers."""
from __future__ import annotations

import os
import sys

import torch
from tqdm import tqdm

from ..core.config import EngineConfig, GenerationConfig, RowParams, make
from ..core.errors import FlexGenError
from ..core.policy import Policy
from ..core.types import Tier, dtype_name
from ..dist.group import DistContext, broadcast, launcher_stderr_is_terminal
from ..dist.ring import Ring
from ..kernels.linear import describe, describe_int4
from ..kernels.probe import DtypeChoice, choose_int4, resolve_dtype
from ..models import family_of
from ..models.checkpoint import ResolvedModel, resolve_model
from ..runtime.block import BlockRun, left_pad
from ..runtime.budget import (
    Plan,
    block_plan,
    check_disk,
    check_memory,
    memory_left,
    weight_plan,
    with_expert_cache,
    within,
)
from ..runtime.executor import LocalExecutor
from ..runtime.sampling import generated_length, trim_after_stop
from ..runtime.stages import stage_range
from ..runtime.stats import GenerationStats
from ..storage.devices import Devices
from ..storage.store import TensorStore, open_store
from ..system.limits import peak_rss_bytes
from ..system.workdir import open_work_dir, prepare_offload_dir, remove_work_dir
from . import scoring
from .batch import generate_batch


def watched(ctx: DistContext) -> bool:
    """Whether someone watches this rank live (it then shows progress bars on stderr): rank 0 with
    stderr on a terminal, or rank 0 of an MPI job whose launcher's stderr is one. mpirun hands a
    rank's stderr on through a pipe (and gives its stdout a terminal of its own whatever mpirun's
    is), so neither of the rank's own streams says whether a person is watching."""
    return ctx.first and (sys.stderr.isatty() or (ctx.mpi is not None and launcher_stderr_is_terminal()))


def normalize_prompts(input_ids, attention_mask=None) -> list[list[int]]:
    """A list of id lists, or a (N, L) tensor with an optional mask, to a list of id lists."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        return [row[m].tolist() for row, m in zip(input_ids, mask)]
    return [list(map(int, p)) for p in input_ids]


def _size_expert_cache(policy: Policy, layers, dtype: torch.dtype, devices: Devices, ctx: DistContext,
                       int4_kernel: bool) -> Policy:
    """The policy with its expert cache sized (unless given): the memory the weights leave, shared
    with the other ranks on this machine; a block that needs it later shrinks it (`_check_block_fits`)."""
    left = memory_left(weight_plan(layers, policy, dtype, devices.host_is_compute, int4_kernel), devices.compute)
    shared = ctx.local_size if devices.compute.type == "cpu" else 1  # one GPU per rank, one host for all
    return with_expert_cache(policy, layers, dtype, devices.host_is_compute, left // shared)


class Engine:
    """Offloaded generation over this rank's pipeline stage (the whole model on one rank).

    Create it with `Engine.from_pretrained`. Under mpirun every rank builds its own Engine and
    calls `generate` with the same prompts; rank 0 gets the token ids, the others get None."""

    def __init__(self, *, spec, executor: LocalExecutor, store: TensorStore, policy: Policy, devices: Devices,
                 dtype: DtypeChoice, model: ResolvedModel, ctx: DistContext, ring: Ring, micro_batches: int,
                 stage: tuple[int, int], prefill_chunks: int = 1):
        self.spec, self.executor, self.store, self.policy, self.devices = spec, executor, store, policy, devices
        self.dtype, self.dtype_choice = dtype.dtype, dtype
        self.tokenizer_path, self.eos_token_ids = model.tokenizer_path, model.eos_token_ids
        self.weights_id = model.source.fingerprint  # what a batch job's manifest records
        self.ctx, self.ring, self.micro_batches, self.stage = ctx, ring, micro_batches, stage
        self.prefill_chunks = prefill_chunks
        self.kernels = {"dtype": dtype_name(self.dtype), "dtype_reason": dtype.reason,
                        "linear": describe(devices.compute, self.dtype)}
        if policy.compress_weight:
            self.kernels["compressed_linear"] = describe_int4(devices.compute, executor.int4)
        self.last_stats = GenerationStats()
        self.last_stop: list[int] = []
        self.last_batch = None  # what the last generate_batch did (batch.BatchInfo)
        self.progress = watched(ctx)
        self.closed = False
        self.admitted = Plan()  # a block's bytes admitted before (freed when it ended: this process's to reuse)

    @classmethod
    def from_pretrained(cls, name_or_path: str, policy: Policy | None = None, config: EngineConfig | None = None,
                        dist: DistContext | None = None, **options) -> "Engine":
        """Build the engine for this rank. `options` are `EngineConfig` fields (offload_dir, dtype,
        dummy_weights, seed, stage_layers, micro_batches, prefill_chunks, comm_device, comm_timeout) and override
        `config`. `dist` (from `flexgen_dist.dist.group.init`) makes this rank one pipeline stage."""
        config = make(EngineConfig, {**vars(config or EngineConfig()), **options}, "Engine.from_pretrained").validate()
        ctx = dist or DistContext()
        policy = (policy or Policy()).validate()
        devices = Devices.detect(policy.pin_weight)
        if policy.cpu_cache_compute and devices.compute.type != "cpu":
            raise FlexGenError("--cpu-cache-compute is not implemented for CUDA compute devices yet")
        model = resolve_model(name_or_path, dummy_weights=config.dummy_weights, seed=config.seed)
        # every stage must compute in one dtype: rank 0 probes (or reads the request), the others follow
        choice = resolve_dtype(config.dtype, devices.compute, model.spec.hidden_size) if ctx.first else None
        choice = broadcast(ctx, choice)
        offload_dir = prepare_offload_dir(config.offload_dir)
        family = family_of(model.spec)
        first, last = stage_range(model.spec, family, ctx, config.stage_layers)
        layers = family.build_layers(model.spec, first, last, with_embed=ctx.first, with_head=ctx.last,
                                     sep_layer=policy.sep_layer)
        int4 = choose_int4(devices.compute, choice) if policy.compress_weight else None  # once per engine
        int4_kernel = int4 is not None and int4.use
        check_memory(weight_plan(layers, policy, choice.dtype, devices.host_is_compute, int4_kernel), devices.compute,
                     "the weights")
        policy = _size_expert_cache(policy, layers, choice.dtype, devices, ctx, int4_kernel)  # from what that check left
        store = open_store(offload_dir, model, choice.dtype, policy, config.rebuild_store)
        store.ensure([w for layer in layers for w in layer.weights], model.source, progress=watched(ctx))
        work_dir = open_work_dir(os.path.join(offload_dir, "work"))
        try:
            executor = LocalExecutor(layers, store, policy, devices, choice.dtype, work_dir, int4)
        except BaseException:
            remove_work_dir(work_dir)
            store.close()
            raise
        return cls(spec=model.spec, executor=executor, store=store, policy=policy, devices=devices, dtype=choice,
                   model=model, ctx=ctx, ring=Ring(ctx, devices.compute, config.comm_timeout),
                   micro_batches=config.micro_batches or ctx.world_size, prefill_chunks=config.prefill_chunks,
                   stage=(first, last))

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        if self.tokenizer_path is None:
            return None
        if not hasattr(self, "_tokenizer"):
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    def generate(self, input_ids, attention_mask=None, *, return_logits: bool = False,
                 new_tokens_only: bool = False, force_tokens=None, **options):
        """Token ids (N, longest prompt + new tokens), prompts left-padded as transformers returns
        them, with the pad token after a stop; or, with `new_tokens_only`, one list per prompt of
        its new tokens (up to and including its stop token). `options` are `GenerationConfig`
        fields (max_new_tokens, do_sample, temperature, top_p, stop, ignore_eos, seed).
        With `return_logits`, also a list with one (N, vocab) float tensor per step.
        `force_tokens` (N, max_new_tokens) feeds given tokens instead of chosen ones (scoring)."""
        if self.closed:
            raise FlexGenError("this Engine is closed; make a new one with Engine.from_pretrained")
        stop = options.get("stop")
        options["stop"] = [stop] if isinstance(stop, int) else list(stop or [])
        config = make(GenerationConfig, options, "generate").validate()
        config.stop = self.last_stop = self.stop_tokens(config)
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
            if forced is not None and len(forced) < block:
                forced = torch.cat([forced, forced[-1:].expand(block - len(forced), -1)])
            params = [self.row_params(config, b0 + r) for r in range(len(chunk))]
            params += [RowParams(max_tokens=1, key=-1)] * (block - len(chunk))  # fillers end at once
            block_gens, block_logits = BlockRun(self, filled, params, forced, return_logits).run(stats, bar)
            if self.ctx.first:
                gens += list(block_gens[:len(chunk)])
                logits.append([lg[:len(chunk)] for lg in block_logits])
        bar.close()
        self.ring.flush()
        if not self.ctx.first:
            return None
        self._finish_stats(stats, gens, config.stop, len(prompts))
        if new_tokens_only:
            return [g[:generated_length(g.tolist(), config.stop)].tolist() for g in gens]
        ids = self._assemble(prompts, trim_after_stop(gens, config.stop))
        if not return_logits:
            return ids
        return ids, self._assemble_logits(logits, ids.shape[1] - max(map(len, prompts)))

    @staticmethod
    def row_params(config: GenerationConfig, index: int) -> RowParams:
        """One prompt's parameters under `config` (whose `stop` already holds the EOS tokens)."""
        return RowParams(max_tokens=config.max_new_tokens, stop=list(config.stop), do_sample=config.do_sample,
                         temperature=config.temperature, top_p=config.top_p, seed=config.seed, key=index)

    def score(self, requests, pack: bool = True) -> list[tuple[float, bool]] | None:
        """Per (context ids, continuation ids) pair: the continuation's summed log-probability
        given the context and whether greedy decoding would produce it (lm-eval's
        `loglikelihood`). Rank 0 gets the list, the others None. Unless `pack` is False, a
        context shared by several requests is computed once and short requests share a row
        instead of padding. See `scoring.score`."""
        return scoring.score(self, requests, pack)

    def score_rolling(self, docs, prefix_token: int | None = None) -> list[float] | None:
        """Per document (token ids): its summed log-likelihood over windows of the model's context
        as lm-eval's `loglikelihood_rolling` cuts them. See `scoring.score_rolling`."""
        return scoring.score_rolling(self, docs, prefix_token)

    def generate_batch(self, requests, **options):
        """The library form of the file job: see `flexgen_dist.batch.generate_batch`."""
        return generate_batch(self, requests, **options)

    def stop_tokens(self, config: GenerationConfig) -> list[int]:
        """The tokens that end a sequence: the requested ones and, unless ignored, the model's EOS."""
        eos = [] if config.ignore_eos else [t for t in self.eos_token_ids if t not in config.stop]
        return list(config.stop) + eos

    def _check_prompts(self, prompts: list[list[int]], new: int) -> None:
        if not prompts:
            raise FlexGenError("no prompts given")
        for i, p in enumerate(prompts):
            if not p:
                raise FlexGenError(f"prompt {i} is empty")
            if len(p) + new > self.spec.max_positions:
                window = getattr(self.spec, "sliding_window", None)
                limit = (f"the model's sliding window is {window} (sliding-window attention is not supported)"
                         if window else f"the model has {self.spec.max_positions}")
                raise FlexGenError(f"prompt {i} has {len(p)} tokens; with {new} new tokens it needs "
                                   f"{len(p) + new} positions but {limit}")
            bad = [t for t in p if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise FlexGenError(f"prompt {i} has token id {bad[0]} outside the vocabulary (0-{self.spec.vocab_size - 1})")

    def memory_plan(self, prompt_len: int, max_new_tokens: int) -> Plan:
        """The bytes this rank's policy places on each tier for a block of prompts this long."""
        ex = self.executor
        int4_kernel = ex.int4 is not None and ex.int4.use
        return weight_plan(ex.layers, self.policy, self.dtype, self.devices.host_is_compute, int4_kernel) + \
            block_plan(ex.layers, self.policy, self.dtype, self.micro_batches, prompt_len,
                       prompt_len + max_new_tokens, self.spec.hidden_size, self.spec.vocab_size, self.spec.num_heads)

    def _check_block_fits(self, prompt_len: int, steps: int, scored: int | None = None) -> None:
        """Before a block allocates its KV cache: the memory still free and the disk must take it
        (the weights are already loaded, so only the block's own bytes are compared). What an
        earlier block held was freed when it ended and is this process's to reuse (its allocator
        may keep it, so the memory free now does not show it): a block no larger on any tier than one
        admitted before is admitted again; a larger one is checked whole against what is free now."""
        plan = block_plan(self.executor.layers, self.policy, self.dtype, self.micro_batches, prompt_len,
                          prompt_len + steps, self.spec.hidden_size, self.spec.vocab_size, self.spec.num_heads,
                          scored)
        if not within(plan, self.admitted):
            check_memory(plan, self.devices.compute, "the KV cache and activations")
            cache = self.executor.expert_cache  # it may still grow to its capacity: only into what the block leaves
            if cache.capacity > cache.used:  # (no expert cache, or a full one: nothing to ask the host again)
                cache.shrink(cache.used + max(memory_left(plan, self.devices.compute), 0))
            self.admitted = plan
        check_disk(plan, self.executor.work_dir, "the KV cache and activations")

    def _assemble(self, prompts, gens) -> torch.Tensor:
        ids, _ = left_pad(prompts, self.spec.pad_id)
        width = max(len(g) for g in gens)
        out = torch.full((len(prompts), width), self.spec.pad_id, dtype=torch.long)
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
        if not self.closed:
            self.closed = True
            try:
                self.executor.close()
            finally:
                remove_work_dir(self.executor.work_dir)
                self.store.close()  # a later job may now remove this store version if it is stale
