"""The cost model and the planner as plain data: hand-written machine profiles, no model run."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from flexgen_dist.core.policy import Policy
from flexgen_dist.core.types import GiB
from flexgen_dist.models import builtin_spec, family_of
from flexgen_dist.planning.costmodel import (
    Machine,
    Placement,
    Step,
    Workload,
    layer_cost,
    pipeline_time,
    prefill_piece_time,
    stored_bytes,
)
from flexgen_dist.planning.optimizer import (
    Infeasible,
    Model,
    Options,
    Rank,
    exact_memory,
    plan,
    shortfall,
)
from flexgen_dist.planning.measure import DECODE_ROWS, PREFILL_ROWS, PREFILL_TOKENS
from flexgen_dist.planning.plan import predict
from flexgen_dist.planning.profile import (
    Budgets,
    HardwareProfile,
    disk_key,
    layer_key,
    overhead_key,
)

BF16 = torch.bfloat16
WORK = Workload(prompt_len=256, gen_len=32)


def machine(directory, spec, flops=1e12, mem_bw=20e9, disk_bw=1.5e9) -> Machine:
    """A CPU machine that computes at `flops`, reads memory at `mem_bw` and its disk at `disk_bw`."""
    shape = f"{spec.num_heads}/{spec.kv_heads}x{spec.head_dim}"
    rates = {"matmul bfloat16 any": flops, f"attention decode bfloat16 {shape}": mem_bw,
             f"attention prefill bfloat16 {shape}": flops, overhead_key(BF16, spec): 50e-6,
             "decompress bfloat16": mem_bw / 4, "compress bfloat16": mem_bw / 8, "copy to compute": mem_bw,
             "copy to host": mem_bw, disk_key(directory, "read"): disk_bw, disk_key(directory, "write"): disk_bw / 2}
    return Machine(HardwareProfile({}, rates), True, str(directory), spec)


def rank(directory, spec, host_gib, disk_gib=1000.0, **rates) -> Rank:
    host = int(host_gib * GiB)
    return Rank(machine(directory, spec, **rates), Budgets(host, host, int(disk_gib * GiB)))


def model(name="opt-1.3b") -> Model:
    spec = builtin_spec(name)
    return Model(spec, family_of(spec))


def options(**kw) -> Options:
    return Options(dtypes=(BF16,), max_block=64, **kw)


def fits(m: Model, ranks, p) -> bool:
    first = 0
    for s, (stage, r) in enumerate(zip(p.stages, ranks)):
        layers = m.layers(stage.first, stage.last, s == 0, s == len(ranks) - 1)
        memory = exact_memory(layers, stage.policy, p.dtype, p.micro_batches, p.workload, m.spec, True)
        if shortfall(memory, r.budgets, True) is not None:
            return False
        assert stage.first == first
        first = stage.last
    return first == m.spec.num_layers


@pytest.mark.parametrize("host_gib", [1.0, 1.5, 2.5, 4.0, 16.0])
def test_plans_respect_every_budget(tmp_path, host_gib):
    m = model()
    ranks = [rank(tmp_path, m.spec, host_gib)]
    p = plan(m, ranks, WORK, 64, options())
    assert fits(m, ranks, p)


def test_disk_budget_is_respected(tmp_path):
    """With little RAM and a small disk, the KV cache may not spill beyond the disk budget."""
    m = model()
    ranks = [rank(tmp_path, m.spec, 1.0, disk_gib=0.05)]
    p = plan(m, ranks, WORK, 64, options())
    assert fits(m, ranks, p)


def test_more_memory_never_lowers_predicted_throughput(tmp_path):
    m = model()
    speeds = [plan(m, [rank(tmp_path, m.spec, gib)], WORK, 64, options()).throughput
              for gib in (1.0, 1.2, 2.0, 3.0, 5.0, 8.0, 16.0)]
    assert all(b >= a * 0.999 for a, b in zip(speeds, speeds[1:])), speeds
    assert speeds[-1] > 2 * speeds[0]  # and memory matters: disk-bound at 1 GiB


def test_a_model_that_fits_gets_a_no_offload_plan(tmp_path):
    m = model("opt-125m")
    p = plan(m, [rank(tmp_path, m.spec, 16.0)], WORK, 64, options())
    policy = p.stages[0].policy
    assert policy.tier_percents("w") == (100, 0, 0) and policy.tier_percents("cache") == (100, 0, 0)


def test_a_tight_budget_offloads_weights_and_the_prediction_is_disk_bound(tmp_path):
    m = model()
    p = plan(m, [rank(tmp_path, m.spec, 1.0)], WORK, 64, options())
    assert p.stages[0].policy.w_gpu_percent < 50
    assert p.stages[0].bottleneck == "disk"


def test_infeasible_names_the_missing_bytes(tmp_path):
    m = model()
    with pytest.raises(Infeasible, match=r"needs \d+\.\d\d GiB more host memory"):
        plan(m, [rank(tmp_path, m.spec, 0.1)], WORK, 64, options())


def test_unequal_memory_gets_stages_proportional_to_what_each_rank_holds(tmp_path):
    """Rank 0 can hold a third of what rank 1 holds: in a bytes-balanced split rank 0 cannot hold
    its half and streams weights from the store on disk; the planner's split holds everything in
    memory (no disk for the KV cache at all) and is faster."""
    m = model()
    weights = 2.7  # GiB of OPT-1.3b in bf16
    small, big = weights * 0.3, weights * 0.9
    ranks = [rank(tmp_path, m.spec, small, disk_gib=0), rank(tmp_path, m.spec, big, disk_gib=0)]
    p = plan(m, ranks, Workload(64, 8), 8, options())
    assert fits(m, ranks, p)
    first, second = p.stage_layers
    assert first < second and first + second == m.spec.num_layers
    assert all(s.policy.w_gpu_percent == 100 for s in p.stages)
    balanced = plan(m, ranks, Workload(64, 8), 8, options(stage_layers=[12, 12]))
    assert balanced.stages[0].policy.w_gpu_percent < 100 and balanced.throughput < p.throughput


def test_a_slower_rank_gets_fewer_layers(tmp_path):
    m = model()
    ranks = [rank(tmp_path, m.spec, 16, flops=0.25e12, mem_bw=5e9), rank(tmp_path, m.spec, 16)]
    p = plan(m, ranks, WORK, 16, options())
    first, second = p.stage_layers
    assert first < second


def test_disk_weights_cost_their_bytes_over_disk_bandwidth(tmp_path):
    m = model()
    mach = machine(tmp_path, m.spec, disk_bw=1e9)
    layer = m.layers(0, 1, False, False)[1]  # an MLP layer
    policy = Policy(gpu_batch_size=1)
    step = Step(rows=1, new=1, context=10)
    on_disk = layer_cost(layer, step, policy, Placement((0, 0, 1)), BF16, mach, m.spec.num_heads, m.spec.hidden_size)
    resident = layer_cost(layer, step, policy, Placement(), BF16, mach, m.spec.num_heads, m.spec.hidden_size)
    weight_bytes = sum(torch.Size(w.shape).numel() * 2 for w in layer.weights)
    assert on_disk["disk"] == pytest.approx(weight_bytes / 1e9)
    assert resident["disk"] == 0 and resident["compute"] == pytest.approx(on_disk["compute"])


def test_cache_on_disk_reads_the_past_and_writes_the_new_tokens(tmp_path):
    m = model()
    mach = machine(tmp_path, m.spec, disk_bw=1e9)
    attn = m.layers(0, 1, False, False)[0]
    policy = Policy(gpu_batch_size=4, cache_gpu_percent=0)
    step = Step(rows=4, new=1, context=101)
    cost = layer_cost(attn, step, policy, Placement(cache=(0, 0, 1)), BF16, mach, m.spec.num_heads, m.spec.hidden_size)
    per_token = 2 * 4 * m.spec.kv_heads * m.spec.head_dim * 2
    assert cost["disk"] == pytest.approx(100 * per_token / 1e9 + per_token / 0.5e9)


def test_pipeline_time_fills_and_drains_prefill_and_decode_waits_for_the_ring():
    # two equal stages, four micro-batches: prefill 4 + 1 stage-times; decode bound by the slowest stage
    prefill, decode = pipeline_time([1.0, 1.0], [3.0, 3.0], 4, [0, 0], 1e18, 4)
    assert prefill == pytest.approx(5.0, rel=1e-3)
    assert decode == pytest.approx(3 * 4 * 1.0, rel=1e-3)
    # one micro-batch: every decode step goes around the ring
    _, decode = pipeline_time([1.0, 1.0], [3.0, 3.0], 1, [0, 0], 1e18, 4)
    assert decode == pytest.approx(3 * 2.0, rel=1e-3)


def test_prefill_pieces_shorten_fill_and_drain():
    # two equal stages, two micro-batches, each prompt in 4 pieces of a quarter of the time:
    # the slowest stage works 8 pieces and the other adds one piece, not a whole prompt
    prefill, _ = pipeline_time([0.25, 0.25], [3.0, 3.0], 2, [0, 0], 1e18, 4, pieces=4)
    assert prefill == pytest.approx(2.25, rel=1e-3)
    whole, _ = pipeline_time([1.0, 1.0], [3.0, 3.0], 2, [0, 0], 1e18, 4)
    assert whole == pytest.approx(3.0, rel=1e-3)


def test_a_pipeline_with_resident_weights_cuts_prompts_into_pieces_and_one_rank_does_not(tmp_path):
    m = model()
    two = plan(m, [rank(tmp_path, m.spec, 16), rank(tmp_path, m.spec, 16)], WORK, 64, options())
    assert all(s.policy.w_gpu_percent == 100 for s in two.stages) and two.prefill_chunks > 1
    unchunked = plan(m, [rank(tmp_path, m.spec, 16), rank(tmp_path, m.spec, 16)], WORK, 64,
                     options(prefill_chunks=1))
    assert unchunked.prefill_chunks == 1 and unchunked.prefill_s > two.prefill_s
    assert plan(m, [rank(tmp_path, m.spec, 16)], WORK, 64, options()).prefill_chunks == 1


def test_pieces_that_reread_weights_from_disk_cost_their_reads(tmp_path):
    """Each piece passes over the stage's weights: resident, the pieces cost about the whole
    prompt; from disk, every piece reads the stage's weights again."""
    m = model()
    mach = machine(tmp_path, m.spec, disk_bw=0.2e9)
    layers = m.layers(0, 12, True, False)
    for percent, extra in ((100, False), (0, True)):
        policy = Policy(gpu_batch_size=8, w_gpu_percent=percent, w_cpu_percent=0)
        whole = prefill_piece_time(layers, policy, BF16, mach, WORK, 1, m.spec.num_heads, m.spec.hidden_size)
        eight = 8 * prefill_piece_time(layers, policy, BF16, mach, WORK, 8, m.spec.num_heads, m.spec.hidden_size)
        if extra:
            reads = sum(stored_bytes(la, policy, BF16)[i] for la in layers for i in range(len(la.weights))) / 0.2e9
            assert eight > whole + 6 * reads  # seven more passes over the weights, most of each on disk
        else:
            assert eight == pytest.approx(whole, rel=0.25)


def test_the_planner_keeps_what_the_user_fixed(tmp_path):
    m = model()
    fixed = options(gpu_batch_sizes=(3,), gpu_batches=(2,))
    p = plan(m, [rank(tmp_path, m.spec, 16)], WORK, 64, fixed)
    assert (p.stages[0].policy.gpu_batch_size, p.stages[0].policy.num_gpu_batches) == (3, 2)
    base = dataclasses.replace(Policy(), overlap=False)
    p = plan(m, [rank(tmp_path, m.spec, 16)], WORK, 64, options(base=base))
    assert p.stages[0].policy.overlap is False


def with_layers(r: Rank, spec, packed_over_plain: float) -> Rank:
    """`r` with measured block layers, plain and (`packed_over_plain` times as long) packed."""
    rates = dict(r.machine.profile.rates)
    sizes = [("decode", n, 1e-3 * (1 + n / 32)) for n in DECODE_ROWS]
    sizes += [("prefill", n * PREFILL_TOKENS, 2e-5 * n * PREFILL_TOKENS) for n in PREFILL_ROWS]
    for kind in ("attention", "mlp"):
        for phase, size, seconds in sizes:
            rates[layer_key(BF16, spec, kind, phase, size, False)] = seconds
            rates[layer_key(BF16, spec, kind, phase, size, True)] = seconds * packed_over_plain
    return Rank(dataclasses.replace(r.machine, profile=HardwareProfile({}, rates)), r.budgets)


@pytest.mark.parametrize("host_gib", [16.0, 2.0])
def test_a_cpu_whose_packed_layout_is_slower_keeps_weights_plain_in_host_memory(tmp_path, host_gib):
    """On a CPU, host-homed weights take the same memory as resident ones and are used plain:
    where the plain layout measured faster, the planner homes them there (with all of them in
    memory, and with part of them on disk), and where packing is faster it keeps them resident."""
    m = model()
    slow_packing = with_layers(rank(tmp_path, m.spec, host_gib), m.spec, packed_over_plain=3.0)
    chosen = plan(m, [slow_packing], WORK, 64, options())
    w_compute, w_host, w_disk = chosen.stages[0].policy.tier_percents("w")
    assert w_compute == 0 and w_host > 0 and (w_disk > 0) == (host_gib < 4)
    assert fits(m, [slow_packing], chosen)
    packed = dataclasses.replace(chosen.stages[0].policy, w_gpu_percent=w_host, w_cpu_percent=0)
    spec = m.spec
    as_resident = predict(spec, [slow_packing], [packed], [spec.num_layers], 1, BF16, WORK, 64)
    assert chosen.throughput > 1.1 * as_resident.throughput  # (disk-bound at 2 GiB: less to gain)
    fast_packing = with_layers(rank(tmp_path, m.spec, host_gib), m.spec, packed_over_plain=1 / 3)
    assert plan(m, [fast_packing], WORK, 64, options()).stages[0].policy.w_cpu_percent == 0


def with_int4_layers(r: Rank, spec, int4_over_plain: float) -> Rank:
    """`r` with its block layers also measured with 4-bit weights multiplied from their codes."""
    rates = dict(r.machine.profile.rates)
    for key, seconds in list(rates.items()):
        if key.startswith("layer ") and not key.endswith(" packed"):
            rates[key + " int4"] = seconds * int4_over_plain
    return Rank(dataclasses.replace(r.machine, profile=HardwareProfile({}, rates)), r.budgets)


def test_a_measured_int4_kernel_prices_4bit_weights_by_its_own_speed(tmp_path):
    """Where the profile measured the model's layers with 4-bit weights multiplied from their codes
    (an int4 kernel), compressed weights cost that measured time and no dequantization: a kernel
    faster than the 16-bit layers makes the plan compress with memory to spare, a slower one does
    not (before, 4-bit weights were priced as dequantized on every use and never chosen here)."""
    m = model()
    measured = with_layers(rank(tmp_path, m.spec, 16.0), m.spec, packed_over_plain=1.0)
    allow = options(compression=((False, False), (True, False)))
    assert not plan(m, [measured], WORK, 64, allow).stages[0].policy.compress_weight  # no int4 measurement
    fast = with_int4_layers(measured, m.spec, int4_over_plain=0.4)
    chosen = plan(m, [fast], WORK, 64, allow)
    assert chosen.stages[0].policy.compress_weight
    assert not plan(m, [with_int4_layers(measured, m.spec, int4_over_plain=3.0)], WORK, 64, allow).stages[0].policy.compress_weight
    layer = m.layers(0, 1, False, False)[1]
    policy = Policy(gpu_batch_size=8, compress_weight=True)
    step = Step(rows=8, new=1, context=10)
    cost = layer_cost(layer, step, policy, Placement((1, 0, 0)), BF16, fast.machine, m.spec.num_heads,
                      m.spec.hidden_size)
    plain = layer_cost(layer, step, dataclasses.replace(policy, compress_weight=False), Placement((1, 0, 0)), BF16,
                       fast.machine, m.spec.num_heads, m.spec.hidden_size)
    assert cost["compute"] == pytest.approx(plain["compute"] * 0.4, rel=0.05)


def test_moe_disk_reads_count_the_experts_a_block_touches(tmp_path):
    """A MoE layer on disk reads its dense weights and the experts its block's tokens are expected
    to touch, E(1 - (1 - k/E)^tokens): k experts for one token, nearly all for a large block."""
    from flexgen_dist.planning.costmodel import experts_touched
    m = model("qwen3-30b-a3b")
    mach = machine(tmp_path, m.spec, disk_bw=1e9)
    layer = m.layers(0, 1, False, False)[1]
    experts, k = m.spec.num_experts, m.spec.experts_per_tok
    assert layer.num_experts == experts and layer.top_k == k
    expert_bytes = sum(torch.Size(w.shape).numel() * 2 for w in layer.weights if w.expert == 0)
    dense_bytes = sum(torch.Size(w.shape).numel() * 2 for w in layer.weights if w.expert is None)
    for rows, touched in ((1, k), (4, experts_touched(experts, k, 4)), (512, experts_touched(experts, k, 512))):
        policy = Policy(gpu_batch_size=rows)
        cost = layer_cost(layer, Step(rows=rows, new=1, context=10), policy, Placement((0, 0, 1)), BF16, mach,
                          m.spec.num_heads, m.spec.hidden_size)
        assert cost["disk"] == pytest.approx((dense_bytes + touched * expert_bytes) / 1e9)
    assert experts_touched(experts, k, 1) == pytest.approx(k)
    assert experts_touched(experts, k, 4) < 4 * k and experts_touched(experts, k, 512) > 0.99 * experts
