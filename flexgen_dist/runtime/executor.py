"""The block schedule for one rank's contiguous range of layers.

For every token step: each layer's weights are loaded once and used by all `num_gpu_batches`
batches; while batch k computes, the next (layer, batch)'s KV cache and the next layer's weights
load on I/O threads, and batch k's new KV is stored in the background. A layer with routed experts
runs every batch at once where the activations live on the compute device (`budget.runs_together`):
its experts are read a window ahead of the math and each used once. `overlap=False` runs the same
schedule with every load and store done inline.
"""
from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass

import torch

from ..core.policy import Policy, split_rows, weight_homes
from ..core.types import Tier
from ..kernels.int4 import Int4Weight
from ..kernels.linear import (
    can_pack,
    int4_for_device,
    pack_linear_weight,
    release_dense_buffers,
)
from ..kernels.probe import Int4Choice
from ..kernels.quantize import CompressedTensor
from ..models.base import Layer, StepInputs, only_multiplied, positions_as_one, split_positions
from ..storage.activations import ActivationStore
from ..storage.devices import Devices, to_device
from ..storage.homes import WeightHome, WeightSource, reaches_math_packed
from ..storage.kvcache import KVCache
from ..system.io import ReadSlab
from ..system.limits import share_one_allocator_arena, trim_allocator
from .budget import EXPERT_READ_AHEAD, SCRATCH_CACHE, runs_together, tensors_per_expert
from .expertcache import ExpertCache

IO_THREADS = 4


_WEIGHT_READERS = ThreadPoolExecutor(4, thread_name_prefix="flexgen-weights")


class Inline:
    """A stand-in for a thread pool that runs each job at once (the `--overlap 0` schedule)."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


@dataclass
class LoadedWeights:
    tensors: LayerWeights
    eager_moved: int  # bytes the up-front load materialised on the compute tier for this use only

    def release(self) -> int:
        """End this use: the bytes it still holds on the compute tier (routed experts' included),
        for the caller to give back; expert loads still running are waited for, those not started
        are dropped."""
        return self.eager_moved + self.tensors.release()


class LayerWeights(Mapping):
    """A layer's weights for one use (every batch of a block), by layer-local key: dense weights
    loaded up front; routed experts' (`WeightSpec.expert`) loaded the first time the math asks for
    them (`models.base.take`, after routing), so an expert no token of the block uses is never read.
    Experts asked for together are read in the background, and each is handed over as soon as its
    own read is done: the math computes the first expert while the next ones are still read.

    `read_ahead` (a layer whose batches run together: each expert is asked for once): an expert's
    tensors are handed over and not kept, and at most `read_ahead` loads are in flight or waiting to
    be taken, so the layer's experts are never all in memory at once. An expert's tensors are taken
    together and used before the next expert's are asked for, so its bytes are given back
    (`release_bytes`) when a tensor of another expert is taken."""

    def __init__(self, tensors: dict, lazy: dict[str, WeightHome], load, experts: dict[str, int] | None = None,
                 read_ahead: int | None = None, release_bytes=None):
        """`load(homes)` -> one future per home of (tensor, bytes it moved onto the compute tier);
        `experts`: the expert each lazy key belongs to (needed with `read_ahead`)."""
        self.tensors, self.lazy, self._load = tensors, lazy, load
        self.experts, self.read_ahead, self._release_bytes = experts or {}, read_ahead, release_bytes
        self.pending: dict[str, Future] = {}
        self.queued: list[str] = []  # asked for, not started yet (beyond the read-ahead)
        self._moved = 0  # moved bytes kept by this use (without read-ahead)
        self._in_hand = (None, 0)  # with read-ahead: (expert, moved bytes) of the tensors handed over last

    def __getitem__(self, key: str):
        if key in self.tensors:
            return self.tensors[key]
        if key not in self.lazy:
            raise KeyError(key)
        if key not in self.pending:
            if key in self.queued:
                self.queued.remove(key)
            self.pending[key] = self._load([self.lazy[key]])[0]
        tensor, moved = self.pending.pop(key).result()
        if self.read_ahead is None:
            self.tensors[key] = tensor
            self._moved += moved
        else:
            self._hand_over(self.experts[key], moved)
            self._start_queued()
        return tensor

    def _hand_over(self, expert: int, moved: int) -> None:
        held_by, held = self._in_hand
        if held_by != expert:  # the expert handed over before is used up
            self._release_bytes(held)
            held = 0
        self._in_hand = (expert, held + moved)

    def __iter__(self):
        return iter(dict.fromkeys([*self.tensors, *self.lazy]))

    def __len__(self) -> int:
        return len(dict.fromkeys([*self.tensors, *self.lazy]))

    def prefetch(self, keys: list[str]) -> None:
        """Start loading every key of `keys` not loaded or loading yet, in that order (within the
        read-ahead: the rest as earlier ones are taken)."""
        waiting = {*self.tensors, *self.pending, *self.queued}
        self.queued += [k for k in dict.fromkeys(keys) if k in self.lazy and k not in waiting]
        self._start_queued()

    def _start_queued(self) -> None:
        room = len(self.queued) if self.read_ahead is None else max(self.read_ahead - len(self.pending), 0)
        start, self.queued = self.queued[:room], self.queued[room:]
        if start:
            self.pending.update(zip(start, self._load([self.lazy[k] for k in start])))

    def release(self) -> int:
        """End this use: loads not started are dropped, those running waited for (a failed one
        counts nothing: it moved nothing), and the moved bytes this use still holds returned, so
        none is left running or uncounted after the layer's use. Called once."""
        self.queued.clear()
        for future in self.pending.values():
            if future.exception() is None:
                self._moved += future.result()[1]
        self.pending.clear()
        held = self._in_hand[1]
        self._in_hand = (None, 0)
        return self._moved + held


@dataclass(frozen=True)
class RoutedExperts:
    """A layer's routed-expert tensors, by layer-local key: where each rests, which expert it is
    of, and the loads a use of the layer runs ahead of the math (`LayerWeights`)."""

    homes: dict[str, WeightHome]
    experts: dict[str, int]
    read_ahead: int | None


class KvLoads:
    """A step's KV-cache loads in schedule order: the first starts at once, each next one when the
    one before it is taken, so one load runs ahead of the math."""

    def __init__(self, jobs: list[tuple[int, int]], submit):
        """`jobs`: the (layer, batch) pairs with a cache, in order; `submit(job)` -> its load's future."""
        self.jobs, self.submit = jobs, submit
        self.loads = {jobs[0]: submit(jobs[0])} if jobs else {}

    def wait(self) -> None:
        """Wait for the load started ahead and not taken (a step that ended early), whatever its outcome."""
        futures_wait(list(self.loads.values()))
        self.loads.clear()

    def take(self, job: tuple[int, int]) -> Future:
        future = self.loads.pop(job)
        following = self.jobs.index(job) + 1
        if following < len(self.jobs):
            self.loads[self.jobs[following]] = self.submit(self.jobs[following])
        return future


@dataclass
class Timers:
    io_wait: float = 0.0  # time compute sat waiting for a load
    compute: float = 0.0


class LocalExecutor:
    """`int4`: how compressed linear weights are multiplied (the engine's one decision, see
    `probe.choose_int4`); None (or not `use`): dequantized, then dense."""

    def __init__(self, layers: list[Layer], store: WeightSource, policy: Policy, devices: Devices,
                 dtype: torch.dtype, work_dir: str, int4: Int4Choice | None = None):
        self.layers, self.policy, self.devices, self.dtype, self.work_dir = layers, policy, devices, dtype, work_dir
        self.int4 = int4
        share_one_allocator_arena()
        self.homes = self._place_weights(store)
        self._together = [runs_together(layer, policy) for layer in layers]
        self._routed = [self._routed_experts(j) for j in range(len(layers))]
        self._ready_layers = [all(self.homes[w.name].used_as_is(devices) for w in layer.weights if w.expert is None)
                              for layer in layers]
        self._slabs = self._read_slabs(store)
        self._loads = itertools.count()
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="flexgen-io") if policy.overlap else Inline()
        self.acts = ActivationStore(devices, policy.act_tier, work_dir)
        self.timers = Timers()
        self._pending_stores: dict[KVCache, Future] = {}
        self._next_weights: Future | None = None
        self._allocations = itertools.count()  # each micro-batch's caches get their own files
        cache_bytes = int((policy.expert_cache_gib or 0) * 2**30)
        self.expert_cache = ExpertCache(cache_bytes, devices.usage[Tier.COMPUTE])

    # ----- placement -------------------------------------------------------------------------
    def _place_weights(self, store: WeightSource) -> dict[str, WeightHome]:
        """Home every weight by FlexGen's rule, on the bytes it really takes (packed if compressed)."""
        only_linear = only_multiplied(self.layers)
        tiers = weight_homes(self.layers, self.policy, lambda w: store.nbytes(w.name))
        return {name: self._home(store, name, tier, only_linear[name]) for name, tier in tiers.items()}

    def _read_slabs(self, store: WeightSource) -> list[ReadSlab]:
        """Two buffers for disk-homed weights, each the size of the largest layer's reads: the layer
        being computed and the one being prefetched take turns (loads happen strictly in order)."""
        need = max((sum(store.file_bytes(w.name) for w in layer.weights
                        if self.homes[w.name].tier is Tier.DISK and w.expert is None)
                    for layer in self.layers), default=0)
        return [ReadSlab(need), ReadSlab(need)] if need else []

    def _home(self, store: WeightSource, name: str, tier: Tier, only_linear: bool) -> WeightHome:
        home = WeightHome(name, tier, store.nbytes(name), store)
        packed = self.policy.compress_weight and reaches_math_packed(
            only_linear, self.devices.compute.type == "cpu", self.int4 is not None and self.int4.use)
        home.int4_feed = self.int4.activations if packed else None
        if tier is not Tier.DISK:
            value = store.read(name)
            device = self.devices.device_of(tier)
            if isinstance(value, Int4Weight) and home.int4_feed is not None and device == self.devices.compute:
                home.value = int4_for_device(value, device, home.int4_feed)  # in the kernel's form once, not per step
                home.nbytes = home.value.nbytes  # a float32 feed doubles the stored bf16 scales
            elif isinstance(value, (CompressedTensor, Int4Weight)):
                home.value = value.to(device)
            elif only_linear and device == self.devices.compute and can_pack(device, self.dtype):
                home.value = pack_linear_weight(value, self.policy.gpu_batch_size)
            else:
                home.value = to_device(value, device, pin=tier is Tier.HOST and self.devices.pin_host)
        self.devices.usage[tier].add(home.nbytes)
        return home

    def _routed_experts(self, j: int) -> RoutedExperts:
        """Layer j's routed experts as each use of it loads them (the same every step)."""
        routed = [w for w in self.layers[j].weights if w.expert is not None]
        read_ahead = EXPERT_READ_AHEAD * tensors_per_expert(self.layers[j]) if self._together[j] else None
        return RoutedExperts({w.key: self.homes[w.name] for w in routed}, {w.key: w.expert for w in routed},
                             read_ahead)

    def weight_bytes(self) -> dict[Tier, int]:
        out = {t: 0 for t in Tier}
        for home in self.homes.values():
            out[home.tier] += home.nbytes
        return out

    # ----- KV cache ----------------------------------------------------------------------------
    def allocate_caches(self, batch_rows: list[int], capacity: int,
                        scratch: bool = False) -> dict[tuple[int, int], KVCache]:
        """KV caches by the policy; `scratch` (a scoring block, read only by its own prefill): all
        on the compute device, uncompressed, so nothing is written to a slower tier."""
        percents = SCRATCH_CACHE if scratch else self.policy.tier_percents("cache")
        compression = None if scratch else self.policy.cache_compression()
        prefix = os.path.join(self.work_dir, f"kv.{os.getpid()}.{next(self._allocations)}")
        return {(j, k): KVCache(self.devices, split_rows(rows, percents), layer.kv_heads, layer.head_dim,
                                capacity, self.dtype, f"{prefix}.{j}.{k}", compression)
                for j, layer in enumerate(self.layers) if layer.has_cache
                for k, rows in enumerate(batch_rows)}

    def free_caches(self, caches: dict[tuple[int, int], KVCache]) -> None:
        self.drain()
        for cache in caches.values():
            cache.free()

    def _load_kv(self, cache: KVCache, start: int, new: int):
        pending = self._pending_stores.pop(cache, None)
        if pending is not None:
            pending.result()  # last step's rows must be home before we read them
        return cache.load(start, new)

    # ----- weights -----------------------------------------------------------------------------
    def _load_weights(self, j: int) -> LoadedWeights:
        """Layer j's dense weights now (reads into a slab); its experts when the math asks for them."""
        specs = [w for w in self.layers[j].weights if w.expert is None]
        homes = [self.homes[w.name] for w in specs]
        alloc = None
        if self._slabs:  # the slab two loads ago held weights whose layer has finished since
            slab = self._slabs[next(self._loads) % len(self._slabs)]
            slab.reset()
            alloc = slab.take
        if self._ready_layers[j]:
            loaded = [home.value for home in homes]
        else:  # all of a layer's disk reads in flight at once: one request at a time leaves the SSD idle
            loaded = list(_WEIGHT_READERS.map(lambda home: home.load(self.devices, alloc), homes))
        tensors = {w.key: t for w, t in zip(specs, loaded)}
        # what this use materialised on the compute device: copied or decompressed tensors, and
        # reads unless they are used where they landed (a CPU's read slab, counted once as such)
        slab_memory = slab.buf.untyped_storage().data_ptr() if alloc is not None else None

        def in_slab(t) -> bool:
            return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == slab_memory
        moved = sum(t.nbytes for t, home in zip(loaded, homes) if t is not home.value and not in_slab(t))
        self.devices.usage[Tier.COMPUTE].add(moved)
        routed = self._routed[j]
        return LoadedWeights(LayerWeights(tensors, routed.homes, self._load_experts, routed.experts,
                                          routed.read_ahead, self.devices.usage[Tier.COMPUTE].sub), moved)

    def _load_experts(self, homes: list[WeightHome]) -> list[Future]:
        """Experts' tensors on the compute device, one future each of (tensor, bytes moved onto the
        compute tier for this use only): from the expert cache where it holds them (no read), the
        others read in parallel into buffers of their own, in the order asked for, and kept in the
        cache when they come from a slower tier."""
        futures = []
        for home in homes:
            cached = self.expert_cache.get(home.name) if self._cacheable(home) else None
            if cached is None:
                futures.append(_WEIGHT_READERS.submit(self._load_expert, home))
            else:
                futures.append(Future())
                futures[-1].set_result((cached, 0))
        return futures

    def _load_expert(self, home: WeightHome) -> tuple[object, int]:
        t = home.load(self.devices)
        kept = self._cacheable(home) and self.expert_cache.put(home.name, t, t.nbytes)
        moved = t.nbytes if t is not home.value and not kept else 0
        self.devices.usage[Tier.COMPUTE].add(moved)
        return t, moved

    def _cacheable(self, home: WeightHome) -> bool:
        """Whether a use of this expert reads it from a slower tier (what the expert cache saves)."""
        return home.tier is Tier.DISK or (home.tier is Tier.HOST and not self.devices.host_is_compute)

    def _wait(self, future: Future):
        t0 = time.perf_counter()
        result = future.result()
        self.timers.io_wait += time.perf_counter() - t0
        return result

    # ----- the schedule ------------------------------------------------------------------------
    def forward_step(self, xs: list[torch.Tensor], inputs: list[StepInputs],
                     caches: dict[tuple[int, int], KVCache]) -> list[torch.Tensor]:
        """Run every layer of this rank over every batch for one token step."""
        n, num_layers = len(xs), len(self.layers)
        for k, x in enumerate(xs):
            self.acts.put(k, x)
        jobs = [(j, k) for j in range(num_layers) for k in range(n)]
        kv_loads = KvLoads([job for job in jobs if job in caches], lambda job: self._submit_kv_load(job, inputs, caches))
        try:
            for j in range(num_layers):
                self._compute_layer(j, inputs, caches, kv_loads)
            return [self.acts.get(k) for k in range(n)]
        finally:  # a failed step too: no KV load left running into caches about to be freed, no states kept
            kv_loads.wait()
            for k in range(n):
                self.acts.drop(k)
            trim_allocator()

    def _compute_layer(self, j: int, inputs: list[StepInputs], caches: dict[tuple[int, int], KVCache],
                       kv_loads: KvLoads) -> None:
        """Layer j over every batch of the step, its weights loaded (and the next layer's started)."""
        weights = self._wait(self._next_weights or self._submit_weights(j))
        self._next_weights = None
        try:
            if self.policy.overlap:  # the next layer's weights (layer 0 of the next step at the end)
                self._next_weights = self._submit_weights((j + 1) % len(self.layers))
            if self._together[j]:
                self._compute_together(j, weights.tensors, inputs)
            else:
                for k in range(len(inputs)):
                    self._compute_batch(j, k, weights.tensors, inputs, caches, kv_loads)
        finally:  # (a failed step leaves no expert read running)
            self.devices.usage[Tier.COMPUTE].sub(weights.release())

    def _compute_batch(self, j: int, k: int, weights: LayerWeights, inputs: list[StepInputs],
                       caches: dict[tuple[int, int], KVCache], kv_loads: KvLoads) -> None:
        """Layer j over batch k: its KV cache waited for (and the next one's load started), the
        new keys and values stored in the background."""
        kv = self._wait(kv_loads.take((j, k))) if (j, k) in caches else None
        t0 = time.perf_counter()
        args = (weights, self.acts.get(k), inputs[k]) + ((kv,) if kv is not None else ())
        self.acts.put(k, self.layers[j].forward(*args))
        self.timers.compute += time.perf_counter() - t0
        if kv is not None:
            start, end = inputs[k].start, inputs[k].start + inputs[k].positions.shape[1]
            cache = caches[(j, k)]  # keyed by the cache: every micro-batch has its own
            if not cache.in_place:  # (an in-place cache was written by the layer itself)
                self._pending_stores[cache] = self.io.submit(cache.store, kv, start, end)

    def _compute_together(self, j: int, weights: LayerWeights, inputs: list[StepInputs]) -> None:
        """Layer j over every batch's positions in one call (`budget.runs_together`)."""
        xs = [self.acts.get(k) for k in range(len(inputs))]
        t0 = time.perf_counter()
        x, merged = positions_as_one(xs, inputs)
        parts = split_positions(self.layers[j].forward(weights, x, merged), xs)
        self.timers.compute += time.perf_counter() - t0
        for k, part in enumerate(parts):
            self.acts.put(k, part)

    def _submit_kv_load(self, job, inputs, caches) -> Future:
        _, k = job
        cache = caches[job]
        # a cache that lives where the math runs is its own buffer: nothing to hand to a thread
        pool = Inline() if cache.in_place else self.io
        return pool.submit(self._load_kv, cache, inputs[k].start, inputs[k].positions.shape[1])

    def _submit_weights(self, j: int) -> Future:
        """Layer j's load, on an I/O thread unless every dense weight of it is used as it rests
        (resident on the compute device in its final form): a hand-off would cost more than the
        load (at batch 1 the per-layer hand-offs were a large share of a decode step)."""
        pool = Inline() if self._ready_layers[j] else self.io
        return pool.submit(self._load_weights, j)

    def drain(self) -> None:
        """Wait for every background store and the speculative weight prefetch."""
        for future in self._pending_stores.values():
            future.result()
        self._pending_stores.clear()
        if self._next_weights is not None:
            moved = self._next_weights.result().release()
            self.devices.usage[Tier.COMPUTE].sub(moved)
            self._next_weights = None

    def close(self) -> None:
        self.drain()
        self.expert_cache.clear()
        self.io.shutdown(wait=True)
        release_dense_buffers()
