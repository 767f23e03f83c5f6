"""The cache of routed experts in fast memory (`runtime/expertcache.py`): an expert read from disk
for one block is not read again while it is cached; the cache holds no more than its size;
tokens still equal transformers float32; its bytes are counted in the memory budget and the
planner sizes and prices it."""
import pytest
import torch
from conftest import PROMPTS, run_cli
from flexgen_dist import Engine, Policy
from flexgen_dist.core.types import GiB, Tier
from flexgen_dist.models import builtin_spec, family_of
from flexgen_dist.runtime import budget
from flexgen_dist.runtime.expertcache import ExpertCache
from flexgen_dist.storage.devices import Usage
from llama_checkpoints import reference_generate
from moe_checkpoints import make_moe_checkpoint

NEW_TOKENS = 6
DISK = [0, 0, 100, 0, 100, 0]


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    """(dir, spec-free reference tokens of PROMPTS[0], bytes of one expert in float32)."""
    path = tmp_path_factory.mktemp("olmoe")
    model = make_moe_checkpoint(path, "olmoe", seed=3)
    ref = reference_generate(model, [PROMPTS[0]], NEW_TOKENS)
    config = model.config
    return str(path), ref, 3 * config.hidden_size * config.intermediate_size * 4


def _expert_reads(monkeypatch) -> list[int]:
    """Bytes of each routed expert tensor read from the store from now on."""
    from flexgen_dist.storage.store import TensorStore
    reads, read = [], TensorStore.read

    def recording_read(self, name, alloc=None):
        if ".experts." in name:
            reads.append(self.file_bytes(name))
        return read(self, name, alloc)
    monkeypatch.setattr(TensorStore, "read", recording_read)
    return reads


def _engine(path, tmp_path, **policy):
    return Engine.from_pretrained(path, policy=Policy.from_percent(DISK, gpu_batch_size=1, **policy),
                                  offload_dir=tmp_path, dtype="float32")


@pytest.mark.parametrize("overlap", [True, False])
def test_experts_read_once_are_not_read_again(olmoe, tmp_path, monkeypatch, overlap):
    """Experts on disk, batch 1, the cache sized by the engine: the second generation of the same
    prompt routes to the same experts at every step and reads 0 expert bytes; tokens equal
    transformers'. With the cache off (0), the same run reads the routed experts at every step."""
    path, ref, _ = olmoe
    with _engine(path, tmp_path, overlap=overlap) as engine:
        assert engine.policy.expert_cache_gib > 0
        first = engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS)
        reads = _expert_reads(monkeypatch)
        second = engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS)
        assert engine.executor.expert_cache.hits > 0
    assert torch.equal(first, ref[0]) and torch.equal(second, ref[0])
    assert sum(reads) == 0
    with _engine(path, tmp_path / "off", overlap=overlap, expert_cache_gib=0) as engine:
        engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS)
        reads.clear()
        assert torch.equal(engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS), ref[0])
        assert engine.executor.expert_cache.used == 0
    assert sum(reads) > 0


def test_an_expert_is_computed_while_the_next_ones_are_still_read(olmoe, tmp_path, monkeypatch):
    """Experts on disk, no cache, a slow disk (each expert tensor's read takes 50 ms): in a layer
    the first routed expert's product starts before the layer's last expert read is done (the
    reads run in the background, each expert handed over as its own read ends); tokens equal
    transformers'."""
    import threading
    import time

    from flexgen_dist.models.moe import model as moe_model
    from flexgen_dist.storage.store import TensorStore
    events, lock, read, swiglu = [], threading.Lock(), TensorStore.read, moe_model.swiglu

    def slow_read(self, name, alloc=None):
        if ".experts." not in name:
            return read(self, name, alloc)
        time.sleep(0.05)
        t = read(self, name, alloc)
        with lock:
            events.append(("read", name.split(".experts.")[0]))
        return t

    def noted_swiglu(h, *weights):
        with lock:
            events.append(("product", None))
        return swiglu(h, *weights)
    path, ref, _ = olmoe
    with _engine(path, tmp_path, expert_cache_gib=0) as engine:
        monkeypatch.setattr(TensorStore, "read", slow_read)
        monkeypatch.setattr(moe_model, "swiglu", noted_swiglu)
        assert torch.equal(engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS), ref[0])
    layers = [i for i, (kind, _) in enumerate(events) if kind == "product"]
    assert layers, "no routed expert was computed"
    first = layers[0]
    first_layer = next(layer for kind, layer in events[:first] if kind == "read")
    next_reads = [layer for kind, layer in events[first:] if kind == "read"][:1]
    assert next_reads == [first_layer]  # the first product ran before its layer's last read ended


def test_cache_never_exceeds_its_size(olmoe, tmp_path, monkeypatch):
    """A cache of three experts' bytes: it never holds more, it evicts (experts are read again in a
    second run) and the tokens are still transformers'."""
    path, ref, expert = olmoe
    held = []
    put = ExpertCache.put

    def recording_put(self, name, value, nbytes):
        kept = put(self, name, value, nbytes)
        held.append(self.used)
        return kept
    monkeypatch.setattr(ExpertCache, "put", recording_put)
    with _engine(path, tmp_path, expert_cache_gib=3 * expert / GiB) as engine:
        capacity = engine.executor.expert_cache.capacity
        assert torch.equal(engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS), ref[0])
        reads = _expert_reads(monkeypatch)
        assert torch.equal(engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS), ref[0])
        assert engine.devices.usage[Tier.COMPUTE].current >= engine.executor.expert_cache.used
    assert capacity == 3 * expert
    assert max(held) <= capacity and max(held) > 2 * expert
    assert sum(reads) > 0


def test_the_most_used_experts_stay():
    """A newcomer displaces the least used entry (the least recently used among equals) only if
    it was used more; a scan of once-used experts leaves the cache as it was."""
    usage = Usage()
    cache = ExpertCache(30, usage)
    for name in "abc":
        assert cache.get(name) is None and cache.put(name, name, 10)
    assert cache.get("a") == "a" and cache.get("c") == "c"  # b is now the least used
    for name in "xyz":  # a scan: used once each, no more than anything cached
        assert cache.get(name) is None and not cache.put(name, name, 10)
    assert sorted(cache.entries) == ["a", "b", "c"]
    assert cache.get("x") is None  # x's second use: now used more than b
    assert cache.put("x", "x", 10)
    assert sorted(cache.entries) == ["a", "c", "x"] and cache.used == 30 == usage.current
    assert not cache.put("huge", "h", 31)
    cache.shrink(10)
    assert cache.capacity == 10 and cache.used == 10 == usage.current
    assert list(cache.entries) == ["x"]  # a, c and x were used twice each: x most recently


def test_a_layer_does_not_evict_its_own_experts():
    """Experts of the layer being loaded may still be held by its use: a newcomer of that layer
    never displaces them (they would stay in memory, no longer counted)."""
    cache = ExpertCache(20, Usage())
    for name in ("layers.1.mlp.experts.0.up", "layers.2.mlp.experts.0.up"):
        cache.get(name)
        assert cache.put(name, name, 10)
    for _ in range(3):
        cache.get("layers.2.mlp.experts.1.up")
    assert cache.put("layers.2.mlp.experts.1.up", "new", 10)
    assert sorted(cache.entries) == ["layers.2.mlp.experts.0.up", "layers.2.mlp.experts.1.up"]
    cache.get("layers.2.mlp.experts.2.up")
    for _ in range(5):
        cache.get("layers.2.mlp.experts.3.up")
    assert not cache.put("layers.2.mlp.experts.3.up", "x", 10)  # only layer 2's own are left


def _qwen3_layers():
    spec = builtin_spec("qwen3-30b-a3b")
    return family_of(spec).build_layers(spec, 0, 2, with_embed=False, with_head=False)


def test_cache_is_counted_in_the_memory_budget(monkeypatch):
    """The expert cache is compute-tier bytes of the weight plan, at most what it could hold (the
    experts homed on disk); a cache the memory cannot take is refused in one line naming it."""
    layers = _qwen3_layers()
    disk = Policy(w_gpu_percent=0, w_cpu_percent=0)
    cacheable = budget.cacheable_expert_bytes(layers, disk, torch.bfloat16, True)
    experts = sum(torch.Size(w.shape).numel() * 2 for la in layers for w in la.weights if w.expert is not None)
    assert cacheable == experts
    assert budget.cacheable_expert_bytes(layers, Policy(w_gpu_percent=0, w_cpu_percent=100), torch.bfloat16, True) == 0
    plan = budget.weight_plan(layers, Policy(w_gpu_percent=0, w_cpu_percent=0, expert_cache_gib=0.5),
                              torch.bfloat16, True)
    assert plan.bytes[Tier.COMPUTE]["expert cache"] == GiB // 2
    huge = budget.weight_plan(layers, Policy(w_gpu_percent=0, w_cpu_percent=0, expert_cache_gib=1000),
                              torch.bfloat16, True)
    assert huge.bytes[Tier.COMPUTE]["expert cache"] == cacheable
    without = budget.weight_plan(layers, disk, torch.bfloat16, True)
    fits = int((without.total(Tier.COMPUTE) + without.total(Tier.HOST)) * 1.2)  # a CPU: both are its RAM
    monkeypatch.setattr(budget, "host_available", lambda: (fits, "test"))
    budget.check_memory(without, torch.device("cpu"), "the weights")
    with pytest.raises(budget.NotEnoughMemory, match="expert cache 0.50"):
        budget.check_memory(plan, torch.device("cpu"), "the weights")
    sized = budget.with_expert_cache(disk, layers, torch.bfloat16, True, left=GiB // 4)
    assert sized.expert_cache_gib == 0.25 * budget.CACHE_SHARE
    assert budget.with_expert_cache(disk, layers, torch.bfloat16, True, left=-5).expert_cache_gib == 0


def test_4bit_experts_multiplied_from_codes_are_not_counted_dense_in_flight():
    """Weights an int4 kernel multiplies from their codes are never dequantized whole: the budget
    counts no dense copy of a layer's routed experts in flight (on a CPU they are used where they
    are read; for a GPU they are copied packed), so that memory goes to the expert cache. (With
    each batch on its own, a layer's experts are all in flight; run together, the read-ahead's.)"""
    layers = _qwen3_layers()
    per_batch = dict(act_gpu_percent=0, act_cpu_percent=100)
    policy = Policy(w_gpu_percent=0, w_cpu_percent=0, compress_weight=True, **per_batch)
    dense_experts = sum(torch.Size(w.shape).numel() * 2 for w in layers[1].weights if w.expert is not None)
    packed_experts = sum(budget.stored_nbytes(w, torch.bfloat16, policy.weight_compression())
                         for w in layers[1].weights if w.expert is not None)

    def in_flight(cpu: bool, kernel: bool, pol=policy) -> int:
        return budget.weight_plan(layers, pol, torch.bfloat16, cpu, kernel).bytes[Tier.COMPUTE]["weights in flight"]
    assert in_flight(True, False) >= 2 * dense_experts  # dequantized whole for each use
    assert in_flight(True, True) < packed_experts / 2  # at most their scales turned to the feed's dtype
    host = Policy(w_gpu_percent=0, w_cpu_percent=100, compress_weight=True, **per_batch)
    assert 2 * packed_experts <= in_flight(False, True, host) < 2 * dense_experts / 3  # copied packed
    together = Policy(w_gpu_percent=0, w_cpu_percent=0, compress_weight=True)
    one_expert = dense_experts // layers[1].num_experts
    assert in_flight(True, False, together) == 2 * (budget.EXPERT_READ_AHEAD + 1) * one_expert


def test_the_engine_budgets_4bit_experts_as_its_int4_choice_multiplies_them(olmoe, tmp_path, monkeypatch):
    """The plan the engine sizes its expert cache from counts a layer's 4-bit experts dense in
    flight only when no int4 kernel multiplies them (FLEXGEN_INT4=0)."""
    from flexgen_dist.engine import engine as engine_module
    from flexgen_dist.kernels import probe
    path, ref, expert = olmoe
    seen, real, kernel = {}, engine_module.memory_left, {}
    for forced in ("1", "0"):
        monkeypatch.setenv("FLEXGEN_INT4", forced)
        probe.int4_choice.cache_clear()
        monkeypatch.setattr(engine_module, "memory_left", lambda plan, compute, forced=forced: seen.setdefault(
            forced, plan.bytes[Tier.COMPUTE]["weights in flight"]) and real(plan, compute))
        with _engine(path, tmp_path, compress_weight=True, compress_group_size=32) as engine:
            kernel[forced] = engine.executor.int4.use
            assert engine.memory_plan(8, NEW_TOKENS).bytes[Tier.COMPUTE]["weights in flight"] == seen[forced]
    probe.int4_choice.cache_clear()
    assert seen["0"] >= 2 * 8 * expert  # olmoe's 8 experts of a layer, dequantized for each use
    assert not kernel["0"]
    if not kernel["1"]:
        pytest.skip("no int4 kernel for float32 on this CPU")
    assert seen["1"] < 8 * expert


def test_a_block_shrinks_the_cache_to_the_memory_it_leaves(olmoe, tmp_path, monkeypatch):
    """The engine sizes the cache from the memory the weights leave; a block admitted later leaves
    the cache only what the block does not need."""
    path, ref, expert = olmoe
    with _engine(path, tmp_path) as engine:
        cache = engine.executor.expert_cache
        assert cache.capacity > 0
        from flexgen_dist.engine import engine as engine_module
        monkeypatch.setattr(engine_module, "memory_left", lambda plan, compute: expert)
        assert torch.equal(engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS), ref[0])
        assert cache.capacity == expert and cache.used <= expert


def test_planner_sizes_the_cache_from_memory_left_and_prices_its_hits(tmp_path):
    """olmoe-1b-7b (13 GiB in bf16) planned for 4 GiB of RAM: the experts go to disk and the cache
    gets the memory the rest of the plan leaves (the plan still fits; the printed plan shows its
    size). A policy with the experts on disk and the rest in memory: the unsized cache takes what
    is left, and the predicted disk time falls by the share of expert uses it serves."""
    from dataclasses import replace

    from flexgen_dist.planning.costmodel import expert_hit_rate
    from flexgen_dist.planning.optimizer import Model, evaluate_stage, plan, shortfall
    from flexgen_dist.planning.report import describe
    from test_planner import WORK, options, rank
    spec = builtin_spec("olmoe-1b-7b")
    model, ranks = Model(spec, family_of(spec)), [rank(tmp_path, spec, 4)]
    planned = plan(model, ranks, WORK, 16, options())
    stage = planned.stages[0]
    assert stage.policy.expert_cache_gib > 0
    assert shortfall(stage.memory, ranks[0].budgets, True) is None
    assert stage.memory.bytes[Tier.COMPUTE]["expert cache"] == int(stage.policy.expert_cache_gib * GiB)
    line = next(line for line in describe(planned, ranks, model).splitlines() if "expert cache:" in line)
    assert f"{stage.policy.expert_cache_gib:.2f} GiB" in line, line

    layers, bf16 = model.layers(0, spec.num_layers, True, True), planned.dtype
    experts_disk = Policy(gpu_batch_size=1, num_gpu_batches=1, experts_gpu_percent=0, experts_cpu_percent=0)
    sized = evaluate_stage(layers, 0, spec.num_layers, experts_disk, bf16, ranks[0], 1, WORK, spec)
    assert shortfall(sized.memory, ranks[0].budgets, True) is None
    rest = ranks[0].budgets.host - sized.memory.total(Tier.COMPUTE) - sized.memory.total(Tier.HOST)
    cache = sized.memory.bytes[Tier.COMPUTE]["expert cache"]
    assert cache > 0 and abs(cache - rest * budget.CACHE_SHARE / (1 - budget.CACHE_SHARE)) < 2**21
    hits = expert_hit_rate(layers, sized.policy, bf16, True)
    assert 0.05 < hits < 0.5
    off = evaluate_stage(layers, 0, spec.num_layers, replace(experts_disk, expert_cache_gib=0), bf16, ranks[0], 1,
                         WORK, spec)
    assert sized.resources["disk"] == pytest.approx(off.resources["disk"] * (1 - hits), rel=0.02)


def test_a_negative_cache_size_is_one_line_error(olmoe, tmp_path):
    code, _, err = run_cli("--model", olmoe[0], "--offload-dir", tmp_path, "--expert-cache-gib", "-1")
    assert code != 0 and err.strip().splitlines() == ["error: --expert-cache-gib must be 0 or more GiB, got -1.0"]
