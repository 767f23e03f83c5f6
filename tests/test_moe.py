"""Mixture-of-experts families (Mixtral, Qwen2-MoE with a shared expert and a dense layer,
Qwen3-MoE, OLMoE): greedy tokens identical to transformers' float32 generate and logits within
atol = rtol = 1e-4 on the placement matrix, on 1 and 2 pipeline ranks, and with 4-bit weights on
the grid; bad MoE checkpoints refused in one line."""
import json
import os
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
from conftest import PROMPTS, run_cli
from flexgen_dist import Engine, Policy
from flexgen_dist.core.errors import FlexGenError
from flexgen_dist.kernels.int4 import fake_quantize_weight
from flexgen_dist.models import builtin_spec, family_of, flops_per_token, spec_from_dir, weight_bytes
from llama_checkpoints import reference_generate
from moe_checkpoints import VARIANTS, make_moe_checkpoint
from test_equivalence import PLACEMENTS
from test_pipeline import MPIRUN, run_pipeline_job

NEW_TOKENS = 8
SUBSET = ["all-compute", "weights-3-tiers", "cache-disk", "act-disk", "merged-layers", "all-disk-no-overlap"]
# experts apart from the dense weights: split over three tiers, or all on disk under resident dense weights
PLACEMENTS = {**PLACEMENTS,
              "experts-3-tiers": dict(percent=[100, 0, 100, 0, 100, 0], experts_gpu_percent=30, experts_cpu_percent=30,
                                      gpu_batch_size=2, num_gpu_batches=2),
              "experts-disk": dict(percent=[50, 50, 100, 0, 100, 0], experts_gpu_percent=0, experts_cpu_percent=0,
                                   gpu_batch_size=3, compress_weight=True)}
SUBSET += ["experts-3-tiers"]
# every placement for Qwen2-MoE (shared expert, a dense layer among sparse ones); a cross-section for the others
CASES = [("qwen2_moe", p) for p in PLACEMENTS if p != "experts-disk"] + \
    [(v, p) for v in VARIANTS if v != "qwen2_moe" for p in SUBSET]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (dir, transformers model, reference sequences and logits)."""
    out = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        model = make_moe_checkpoint(path, variant, seed=len(out))
        out[variant] = (str(path), model, reference_generate(model, PROMPTS, NEW_TOKENS))
    return out


def run_engine(path, tmp_path, percent=(100, 0, 100, 0, 100, 0), prompts=PROMPTS, **policy):
    engine = Engine.from_pretrained(path, policy=Policy.from_percent(list(percent), **policy),
                                    offload_dir=tmp_path, dtype="float32")
    try:
        return engine.generate(prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    finally:
        engine.close()


def assert_matches(run, ref):
    ids, logits = run
    assert torch.equal(ids, ref[0])
    assert len(logits) == NEW_TOKENS
    for step, (mine, theirs) in enumerate(zip(logits, ref[1])):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("variant,placement", CASES)
def test_greedy_matches_transformers(checkpoints, variant, placement, tmp_path):
    path, _, ref = checkpoints[variant]
    options = dict(PLACEMENTS[placement])
    assert_matches(run_engine(path, tmp_path, options.pop("percent"), **options), ref)


def test_prompts_spread_over_experts(checkpoints):
    """The fixtures exercise routing: in every sparse layer the prompts use several experts, in
    unequal numbers of tokens (so grouping by expert is tested, not a single shared path)."""
    from conftest import left_padded
    for variant, (_, model, _) in checkpoints.items():
        ids, mask = left_padded(PROMPTS, pad=2)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_router_logits=True)
        for logits in out.router_logits:
            counts = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=logits.shape[-1])
            assert (counts > 0).sum() >= 3 and len(set(counts.tolist())) > 1, (variant, counts)


def test_specs_read_each_feature(checkpoints):
    specs = {v: spec_from_dir(checkpoints[v][0]) for v in VARIANTS}
    assert all(s.family == "moe" and s.experts_per_tok == 2 and s.num_experts >= 4 for s in specs.values())
    assert specs["mixtral"].num_experts == 6 and specs["olmoe"].num_experts == 8
    assert specs["qwen2_moe"].shared_ffn_dim == 40 and specs["qwen2_moe"].qkv_bias
    assert [specs["qwen2_moe"].is_sparse(i) for i in range(3)] == [True, False, True]
    assert specs["qwen3_moe"].qk_norm and specs["qwen3_moe"].norm_topk_prob and not specs["qwen2_moe"].norm_topk_prob
    assert specs["olmoe"].qk_norm_whole and not specs["olmoe"].qk_norm
    layers = family_of(specs["qwen2_moe"]).build_layers(specs["qwen2_moe"])
    assert [la.name for la in layers if la.name.startswith(("moe", "mlp"))] == ["moe.0", "mlp.1", "moe.2"]
    experts = {w.expert for la in layers for w in la.weights if w.expert is not None}
    assert experts == set(range(5))


GRID = Policy(compress_weight=True).weight_compression()


def _grid_checkpoint(path: str, out) -> str:
    """The checkpoint with every weight the engine compresses replaced by its 4-bit grid image."""
    from safetensors.torch import load_file, save_file
    spec = spec_from_dir(path)
    family = family_of(spec)
    compressed = {f"model.{w.name}" for la in family.build_layers(spec) for w in la.weights if w.compressible is True}
    shutil.copytree(path, out)
    state = load_file(f"{path}/model.safetensors")
    assert compressed <= set(state) and any(".experts." in k for k in compressed)
    save_file({k: fake_quantize_weight(v, GRID).contiguous() if k in compressed else v for k, v in state.items()},
              f"{out}/model.safetensors", metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("placement", ["all-compute", "weights-3-tiers", "experts-disk"])
def test_compressed_weights_match_the_grid_checkpoint(checkpoints, variant, placement, tmp_path, int4_mode):
    """Weights already on the 4-bit grid are stored losslessly: a compressed run gives the tokens
    and logits of an uncompressed run of them (experts multiplied packed or dequantized); and
    differs from the original model (the guard)."""
    path, _, ref = checkpoints[variant]
    grid = _grid_checkpoint(path, tmp_path / "grid")
    plain = run_engine(grid, tmp_path / "a", gpu_batch_size=5)
    options = dict(PLACEMENTS[placement])
    options["compress_weight"] = True
    packed = run_engine(grid, tmp_path / "b", options.pop("percent"), **options)
    assert_matches(packed, plain)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(plain[1], ref[1]))


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("ranks", [1, 2])
def test_pipeline_ranks_match_transformers(checkpoints, ranks, tmp_path):
    runs = [{"percent": [100, 0, 100, 0, 100, 0], "policy": {"gpu_batch_size": 2}},
            {"percent": [0, 50, 0, 50, 0, 100], "policy": {"gpu_batch_size": 1, "num_gpu_batches": 2}}]
    for variant in ("qwen2_moe", "mixtral"):
        path, _, ref = checkpoints[variant]
        (tmp_path / variant).mkdir()
        for got in run_pipeline_job(path, runs, ranks, tmp_path / variant, NEW_TOKENS):
            assert torch.equal(torch.tensor(got), ref[0]), variant


def _one_line_error(path, tmp_path, *needles):
    code, _, stderr = run_cli("--model", path, "--prompt-len", 4, "--num-prompts", 1, "--gen-len", 2,
                              "--offload-dir", tmp_path / "off")
    assert code == 2, stderr
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error: "), stderr
    for needle in needles:
        assert needle in stderr, stderr


def test_missing_expert_tensor_is_one_line_error(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    path = shutil.copytree(checkpoints["mixtral"][0], tmp_path / "m")
    state = load_file(f"{path}/model.safetensors")
    missing = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    del state[missing]
    save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    _one_line_error(path, tmp_path, missing)


@pytest.mark.parametrize("field,value,needle", [("scoring_func", "sigmoid", "router scoring function 'sigmoid'"),
                                                ("topk_method", "noaux_tc", "router topk_method 'noaux_tc'"),
                                                ("clip_qkv", 8.0, "clip_qkv")])
def test_unsupported_router_or_variant_is_one_line_error(checkpoints, tmp_path, field, value, needle):
    path = shutil.copytree(checkpoints["olmoe"][0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, field: value}))
    _one_line_error(path, tmp_path, needle)
    with pytest.raises(FlexGenError, match=needle.split("'")[0]):
        spec_from_dir(str(path))


def test_builtin_moe_shapes():
    """Parameter counts of the built-in shapes, and FLOPs of the active weights only."""
    expected = {"mixtral-8x7b": 46.7e9, "mixtral-8x22b": 140.6e9, "qwen1.5-moe-a2.7b": 14.3e9,
                "qwen3-30b-a3b": 30.5e9, "qwen3-235b-a22b": 235.1e9, "olmoe-1b-7b": 6.92e9}
    for name, params in expected.items():
        spec = builtin_spec(name)
        assert weight_bytes(spec, 1) == pytest.approx(params, rel=0.01), name
    spec = builtin_spec("qwen3-30b-a3b")
    blocks, head = flops_per_token(spec, 0)
    embedding = spec.vocab_size * spec.hidden_size  # looked up, not multiplied; counted in the 3.3 B
    assert (blocks + head) / 2 + embedding == pytest.approx(3.3e9, rel=0.03)  # "A3B": 3.3 B active parameters


def _record_reads_and_routes(monkeypatch) -> list:
    """Events in order: ("step",) at each forward step, ("read", name, bytes) at each disk read
    of the weight store, ("route", experts) at each router call."""
    from flexgen_dist.models.moe import model as moe_model
    from flexgen_dist.runtime.executor import LocalExecutor
    from flexgen_dist.storage.store import TensorStore
    events, read, route, step = [], TensorStore.read, moe_model.route, LocalExecutor.forward_step

    def recording_read(self, name, alloc=None):
        events.append(("read", name, self.file_bytes(name)))
        return read(self, name, alloc)

    def recording_route(h, router, spec):
        top, experts = route(h, router, spec)
        events.append(("route", sorted(set(experts.reshape(-1).tolist()))))
        return top, experts

    def recording_step(self, *args):
        events.append(("step",))
        return step(self, *args)
    monkeypatch.setattr(TensorStore, "read", recording_read)
    monkeypatch.setattr(moe_model, "route", recording_route)
    monkeypatch.setattr(LocalExecutor, "forward_step", recording_step)
    return events


def assert_only_tokens_routed(model_module, path, ref, tmp_path, monkeypatch) -> None:
    """A left-padded prefill (one batch, one chunk) routes only its tokens (`base.over_tokens`):
    padding would choose experts that are then read and multiplied for nothing. Each decode step
    routes one token per sequence. Results still equal transformers'."""
    spec = spec_from_dir(path)
    sparse = sum(1 for layer in family_of(spec).build_layers(spec) if layer.top_k)
    routed, route = [], model_module.route

    def recording_route(h, *args):
        routed.append(h.shape[0])
        return route(h, *args)
    monkeypatch.setattr(model_module, "route", recording_route)
    policy = Policy.from_percent([100, 0, 100, 0, 100, 0], gpu_batch_size=len(PROMPTS), num_gpu_batches=1)
    engine = Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, dtype="float32", prefill_chunks=1)
    try:
        assert_matches(engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True), ref)
    finally:
        engine.close()
    assert max(map(len, PROMPTS)) * len(PROMPTS) > sum(map(len, PROMPTS))  # the batch is padded
    assert sparse and routed[:sparse] == [sum(map(len, PROMPTS))] * sparse
    assert routed[sparse:] == [len(PROMPTS)] * sparse * (NEW_TOKENS - 1)


def test_padding_is_not_routed_to_experts(checkpoints, tmp_path, monkeypatch):
    from flexgen_dist.models.moe import model as moe_model
    path, _, ref = checkpoints["qwen2_moe"]
    assert_only_tokens_routed(moe_model, path, ref, tmp_path, monkeypatch)


@pytest.mark.parametrize("overlap", [True, False])
def test_decode_at_batch_one_reads_only_routed_experts_from_disk(checkpoints, tmp_path, monkeypatch, overlap):
    """Weights on disk (read with O_DIRECT through the store), one sequence, no expert cache: each
    decode step reads from each MoE layer exactly the experts its token routes to (2 of 8), never
    the others (test_expert_cache: with the cache, those read before are not read again)."""
    path, _, ref = checkpoints["olmoe"]
    spec = spec_from_dir(path)
    policy = Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=1, overlap=overlap, expert_cache_gib=0)
    engine = Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, dtype="float32")
    events = _record_reads_and_routes(monkeypatch)
    try:
        ids = engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS)
    finally:
        engine.close()
    assert torch.equal(ids[0, -NEW_TOKENS:], ref[0][0, -NEW_TOKENS:])
    steps, current = [], None
    for event in events:
        if event[0] == "step":
            current = {"reads": [], "routes": []}
            steps.append(current)
        elif current is not None:
            current[event[0] + "s"].append(event[1:])
    assert len(steps) == NEW_TOKENS
    expert_bytes = 3 * spec.hidden_size * spec.moe_ffn_dim * 4  # gate, up, down in float32
    for step in steps[1:]:  # decode
        assert len(step["routes"]) == spec.num_layers
        for i, (routed,) in enumerate(step["routes"]):
            assert len(routed) == spec.experts_per_tok
            read = {name for name, _ in step["reads"] if name.startswith(f"layers.{i}.mlp.experts.")}
            assert read == {f"layers.{i}.mlp.experts.{e}.{p}_proj.weight" for e in routed for p in ("gate", "up", "down")}
        read_bytes = sum(size for name, size in step["reads"] if ".experts." in name)
        assert read_bytes == spec.num_layers * spec.experts_per_tok * expert_bytes  # of num_experts per layer


def test_block_plan_counts_a_layer_run_together_at_its_widest():
    """A MoE layer run over every batch at once holds its widest products (Qwen1.5-MoE's shared
    expert, 5632 wide) for all of a micro-batch group's tokens, besides a few hidden-state copies;
    the same for any number of pipeline micro-batches (one group runs at a time); nothing where
    each batch runs on its own."""
    from flexgen_dist.core.types import Tier
    from flexgen_dist.runtime.budget import TOGETHER_COPIES, block_plan
    spec = builtin_spec("qwen1.5-moe-a2.7b")
    layers = family_of(spec).build_layers(spec, 0, 1, with_embed=False, with_head=False)

    def entry(micro_batches, **policy):
        plan = block_plan(layers, Policy(gpu_batch_size=64, num_gpu_batches=8, **policy), torch.bfloat16,
                          micro_batches, 128, 128, spec.hidden_size, spec.vocab_size, spec.num_heads)
        return plan.bytes[Tier.COMPUTE].get("batches run together", 0)
    tokens = 64 * 8 * 128
    assert entry(1) == entry(4) == tokens * (TOGETHER_COPIES * spec.hidden_size + 3 * spec.shared_ffn_dim) * 2
    assert entry(1, act_gpu_percent=0, act_cpu_percent=100) == 0


def test_cpu_plan_counts_the_experts_kernels(checkpoints):
    """On a CPU the memory plan counts oneDNN's kernels for the experts' product shapes: 128 of the
    largest expert tensor, at most 3/8 GiB (Qwen3-30B-A3B's 3 MiB tensors reach it); none on a GPU
    or without routed experts."""
    from flexgen_dist.core.types import Tier
    from flexgen_dist.runtime.budget import EXPERT_KERNELS_MAX, weight_plan
    on_disk = Policy(w_gpu_percent=0, w_cpu_percent=0)
    kernels = {}
    for name in ("qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b"):
        spec = builtin_spec(name)
        layers = family_of(spec).build_layers(spec, 0, 1, with_embed=False, with_head=False)
        kernels[name] = weight_plan(layers, on_disk, torch.bfloat16, True).bytes[Tier.COMPUTE]["expert kernels"]
        assert "expert kernels" not in weight_plan(layers, on_disk, torch.bfloat16, False).bytes[Tier.COMPUTE]
    assert kernels["qwen3-30b-a3b"] == 128 * 2048 * 768 * 2 == EXPERT_KERNELS_MAX
    assert kernels["mixtral-8x7b"] == EXPERT_KERNELS_MAX
    assert kernels["olmoe-1b-7b"] == EXPERT_KERNELS_MAX  # 4 MiB tensors
    tiny = spec_from_dir(checkpoints["olmoe"][0])  # a test checkpoint's experts: in proportion
    layers = family_of(tiny).build_layers(tiny, 0, 1, with_embed=False, with_head=False)
    assert weight_plan(layers, on_disk, torch.float32, True).bytes[Tier.COMPUTE]["expert kernels"] == \
        128 * tiny.hidden_size * tiny.moe_ffn_dim * 4
    dense = builtin_spec("smollm2-135m")
    layers = family_of(dense).build_layers(dense, 0, 1)
    assert weight_plan(layers, on_disk, torch.bfloat16, True).bytes[Tier.COMPUTE].get("expert kernels", 0) == 0


@pytest.mark.parametrize("preset", [None, "7"])
def test_onednn_primitive_cache_is_held_unless_set(preset):
    """Importing the package holds oneDNN's primitive cache to 128 entries (a MoE fills the default
    1024 with memory no budget counts); a capacity the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    out = subprocess.run([sys.executable, "-c", "import os, flexgen_dist; "
                          "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == (preset or "128")


@pytest.mark.parametrize("act", ["compute", "host"])
def test_batches_run_together_through_moe_layers(checkpoints, tmp_path, monkeypatch, act):
    """Activations on the compute device: each MoE layer routes every batch's tokens in one call per
    step and holds at most the read-ahead window of its disk-homed experts at once (each read once
    per step, dropped after its use). Activations on the host: one call per batch, and a layer's
    experts are kept for the next batch. Tokens and logits equal transformers' both ways."""
    from flexgen_dist.runtime import executor
    path, _, ref = checkpoints["olmoe"]
    spec = spec_from_dir(path)
    monkeypatch.setattr(executor, "EXPERT_READ_AHEAD", 1)
    alive, most = [], [0]
    load = executor.LocalExecutor._load_expert

    def counting_load(self, home):
        t, moved = load(self, home)
        alive[:] = [r for r in alive if r() is not None] + [weakref.ref(t)]
        most[0] = max(most[0], len(alive))
        return t, moved
    monkeypatch.setattr(executor.LocalExecutor, "_load_expert", counting_load)
    events = _record_reads_and_routes(monkeypatch)
    percent = [0, 0, 100, 0, 100, 0] if act == "compute" else [0, 0, 100, 0, 0, 100]
    batches = len(PROMPTS)
    assert_matches(run_engine(path, tmp_path, percent, gpu_batch_size=1, num_gpu_batches=batches,
                              expert_cache_gib=0), ref)
    first = events.index(("step",))
    prefill = events[first + 1:events.index(("step",), first + 1)]
    routes = [e for e in prefill if e[0] == "route"]
    expert_reads = [e[1] for e in prefill if e[0] == "read" and ".experts." in e[1]]
    assert len(routes) == spec.num_layers * (1 if act == "compute" else batches)
    assert len(expert_reads) == len(set(expert_reads))  # each read once per step, whatever the batches
    window = (1 + 1) * 3  # the read-ahead and the expert being multiplied, 3 tensors each
    touched = max(len(e[1]) for e in routes)
    assert (most[0] <= window) if act == "compute" else (most[0] >= 3 * touched > window)


def test_a_step_failing_mid_layer_gives_back_its_experts(checkpoints, tmp_path, monkeypatch):
    """An error raised while a MoE layer multiplies its experts (reads still running ahead) ends
    the call with that error; the layer's reads are waited for and their bytes given back, the step's
    hidden states dropped, so the compute tier's count is where it was before, and the engine runs
    the next call as before."""
    from flexgen_dist.core.types import Tier
    from flexgen_dist.models.moe import model as moe_model
    path, _, ref = checkpoints["olmoe"]
    policy = Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=1, num_gpu_batches=len(PROMPTS),
                                 expert_cache_gib=0)
    engine = Engine.from_pretrained(path, policy=policy, offload_dir=tmp_path, dtype="float32")
    real, calls = moe_model.swiglu, [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected")
        return real(*args)
    try:
        before = engine.devices.usage[Tier.COMPUTE].current
        monkeypatch.setattr(moe_model, "swiglu", failing)
        with pytest.raises(RuntimeError, match="injected"):
            engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        assert engine.devices.usage[Tier.COMPUTE].current == before
        monkeypatch.setattr(moe_model, "swiglu", real)
        assert torch.equal(engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS), ref[0])
    finally:
        engine.close()


def test_read_ahead_gives_back_each_experts_bytes_once_used():
    """With read-ahead, an expert's moved bytes are held while its tensors are in use (until a tensor
    of another expert is taken), at most the window's loads run at once, and `release` returns what
    is still held, dropping loads never started: the compute tier's count ends where it began."""
    from concurrent.futures import Future
    from flexgen_dist.runtime.executor import LayerWeights
    started, given_back = [], []

    def load(homes):
        started.extend(homes)
        futures = [Future() for _ in homes]
        for f, home in zip(futures, homes):
            f.set_result((torch.zeros(1), 10))
        return futures
    keys = [f"experts.{e}.{p}" for e in range(4) for p in ("gate", "up", "down")]
    weights = LayerWeights({}, {k: k for k in keys}, load, {k: int(k.split(".")[1]) for k in keys},
                           read_ahead=3, release_bytes=given_back.append)
    weights.prefetch(keys)
    assert len(started) == 3
    for k in keys[:3]:
        weights[k]
    assert sum(given_back) == 0 and len(started) == 6  # expert 0 in hand, 3 loads ahead
    weights[keys[3]]
    assert sum(given_back) == 30  # expert 0 used up
    assert weights.release() == 10 + 30  # expert 1's first tensor in hand, the 3 loads ahead waited for
    assert len(started) == 7 and sum(given_back) + 40 == 7 * 10  # the rest never read


def test_plan_shows_where_the_experts_live(tmp_path):
    """The printed plan (a hand-written machine profile, see test_planner) says how many experts
    each MoE layer has, where they live and how many a block step touches."""
    from flexgen_dist.planning.optimizer import Model, plan
    from flexgen_dist.planning.report import describe
    from test_planner import WORK, options, rank
    spec = builtin_spec("olmoe-1b-7b")
    model, ranks = Model(spec, family_of(spec)), [rank(tmp_path, spec, 4)]
    text = describe(plan(model, ranks, WORK, 16, options()), ranks, model)
    line = next(line for line in text.splitlines() if "experts:" in line)
    assert "16 MoE layers x 64 experts of" in line and "8 per token" in line, text


def test_experts_are_homed_whole_by_their_own_percents():
    """Dense weights by the weights' percents; experts by the experts' percents, each expert's three
    tensors on one tier; unset expert percents follow the weights'."""
    from flexgen_dist.core.policy import weight_homes
    from flexgen_dist.core.types import Tier
    spec = builtin_spec("qwen1.5-moe-a2.7b")
    layers = family_of(spec).build_layers(spec, 0, 2)
    def size(w) -> int:
        return torch.Size(w.shape).numel()
    policy = Policy(w_gpu_percent=100, w_cpu_percent=0, experts_gpu_percent=25, experts_cpu_percent=50)
    homes = weight_homes(layers, policy, size)
    for layer in layers:
        dense = {homes[w.name] for w in layer.weights if w.expert is None}
        assert dense == {Tier.COMPUTE}
        tiers = {}
        for w in layer.weights:
            if w.expert is not None:
                tiers.setdefault(w.expert, set()).add(homes[w.name])
        if layer.top_k:
            assert all(len(t) == 1 for t in tiers.values())
            counts = {tier: sum(t == {tier} for t in tiers.values()) for tier in Tier}
            assert counts == {Tier.COMPUTE: 15, Tier.HOST: 30, Tier.DISK: 15}, counts
    same = weight_homes(layers, Policy(w_gpu_percent=0, w_cpu_percent=0), size)
    assert set(same.values()) == {Tier.DISK}


def test_builtin_specs_round_trip_through_hf_configs():
    """Every built-in MoE shape, written as a config.json, reads back as the same spec (what lets
    a benchmark hand transformers the very model the engine runs)."""
    from flexgen_dist.models import BUILTIN
    from flexgen_dist.models.moe.config import spec_from_config, to_hf_config
    moes = [s for s in BUILTIN.values() if s.family == "moe"]
    assert len(moes) == 6
    for spec in moes:
        assert spec_from_config(json.loads(json.dumps(to_hf_config(spec))), spec.name) == spec


def test_memory_plan_buffers_one_layer_of_routed_experts():
    """The memory precheck holds two layers' dense disk reads in buffers (the layer in use and the
    one prefetched) and, of one layer's experts (read when routed to, freed with the layer's use),
    the read-ahead window where the batches run together (activations on the compute device), all
    of them where each batch computes on its own; never two whole MoE layers."""
    from flexgen_dist.core.types import Tier
    from flexgen_dist.runtime.budget import EXPERT_READ_AHEAD, weight_plan
    spec = builtin_spec("qwen3-30b-a3b")
    layers = family_of(spec).build_layers(spec, 0, 2, with_embed=False, with_head=False)
    moe = next(la for la in layers if la.top_k)
    experts = sum(torch.Size(w.shape).numel() * 2 for w in moe.weights if w.expert is not None)
    one = spec.hidden_size * spec.moe_ffn_dim * 2  # each of an expert's three tensors
    dense = max(sum(torch.Size(w.shape).numel() * 2 for w in la.weights if w.expert is None) for la in layers)
    on_disk = Policy(w_gpu_percent=0, w_cpu_percent=0)
    per_batch = Policy(w_gpu_percent=0, w_cpu_percent=0, act_gpu_percent=0, act_cpu_percent=100)
    plan = weight_plan(layers, on_disk, torch.bfloat16, host_is_compute=True)
    assert plan.bytes[Tier.HOST]["routed experts read"] == (EXPERT_READ_AHEAD + 1) * 3 * one < experts
    assert weight_plan(layers, per_batch, torch.bfloat16, host_is_compute=True).bytes[Tier.HOST][
        "routed experts read"] == experts
    # on a GPU each use copies the experts over: the window of them in flight, or every one
    gpu = weight_plan(layers, on_disk, torch.bfloat16, host_is_compute=False).bytes[Tier.COMPUTE]
    assert gpu["weights in flight"] < 2 * (EXPERT_READ_AHEAD + 2) * 3 * one < experts
    gpu = weight_plan(layers, per_batch, torch.bfloat16, host_is_compute=False).bytes[Tier.COMPUTE]
    assert gpu["weights in flight"] >= 2 * experts
    assert plan.bytes[Tier.HOST]["disk read buffers"] == 2 * dense
