"""This project against the systems a user would pick instead, side by side on one machine.

    python benchmark/bench_peers.py run --preset cpu-quick      # measure, tabulate, plot, update RESULTS.md
    python benchmark/bench_peers.py report benchmark/results-peers-cpu-quick.jsonl   # tables + figures again
    python benchmark/bench_peers.py print --preset gpu-opt-30b  # commands and resources for a GPU machine
    python benchmark/bench_peers.py list

Every system reads the same Hugging Face checkpoint (seeded random weights written once), runs
the same random prompts, and runs inside the same memory limit (benchmark/with_memory_limit.sh:
a memory cgroup that counts the page cache, so weights "on disk" really come from the disk). The
page cache is dropped before each timed run of a disk-bound scenario (as root; said otherwise).
Each run is its own process; the batch is tuned per system by trying each listed batch, smallest
first, and stopping at the first that runs out of memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from peer_results import load_rows, peer_table, ratios, replace_section, runs_table, scenarios, workload_text  # noqa: E402
from peer_systems import RunSpec  # noqa: E402


@dataclass
class SystemPlan:
    label: str
    system: str  # flexgen | transformers | accelerate
    batches: list[str]  # "32" or, for flexgen, "GBSxNGB" such as "64x2"
    options: dict = field(default_factory=dict)  # extra RunSpec fields: percent, compress_*, max_memory


@dataclass
class Scenario:
    name: str
    model: str  # a built-in config name (its dummy checkpoint is written once) or a checkpoint directory
    prompt_len: int
    gen_len: int
    memory_limit: str  # for with_memory_limit.sh, e.g. "2G"
    disk_bound: bool  # drop the page cache before each timed run
    systems: list[SystemPlan]
    note: str = ""
    gpu_memory_gib: float | None = None  # CUDA memory each run may use (emulates a smaller GPU)


@dataclass
class Preset:
    name: str
    description: str
    scenarios: list[Scenario]
    gpu: bool = False  # needs CUDA; without one, `print` shows what to run
    resources: str = ""


def _fits_in_memory() -> list[SystemPlan]:
    return [SystemPlan("flexgen-dist", "flexgen", ["8", "32", "64x2"]),
            SystemPlan("transformers generate", "transformers", ["8", "32", "64"])]


PRESETS = {p.name: p for p in [
    Preset("cpu-quick", "2-core CPU: OPT-125m in memory, OPT-1.3b with most weights on disk (about 20 minutes)", [
        Scenario("in-memory", "opt-125m", 512, 32, "8G", False, _fits_in_memory(),
                 note="the model fits: the block schedule against transformers' own generate at its best batch"),
        Scenario("disk", "opt-1.3b", 32, 16, "2G", True, [
            SystemPlan("flexgen-dist", "flexgen", ["64", "96", "128"], {"percent": [20, 0, 100, 0, 100, 0]}),
            SystemPlan("flexgen-dist 4-bit", "flexgen", ["64x2", "96x2"],
                       {"percent": [20, 0, 100, 0, 100, 0], "compress_weight": True, "compress_cache": True}),
            SystemPlan("transformers + Accelerate", "accelerate", ["64", "96", "128"], {"max_memory": {"cpu": "600MiB"}}),
        ], note="2.63 GB of bf16 weights under a 2 GiB limit that also holds the runtime, the KV cache and "
                "the page cache: every step streams most weights from disk; each system keeps about 0.6 GB of "
                "weights resident (this project: 20 % of each layer, FlexGen's rule)"),
    ]),
    Preset("gpu-opt-6.7b", "one 16 GB GPU, 208 GB host memory (FlexGen's T4 setting)", [
        Scenario("opt-6.7b", "opt-6.7b", 512, 32, "208G", False, gpu_memory_gib=16, systems=[
            SystemPlan("flexgen-dist", "flexgen", ["2", "4", "8"], {"percent": [100, 0, 100, 0, 100, 0], "dtype": "float16"}),
            SystemPlan("transformers + Accelerate", "accelerate", ["1", "2", "4"],
                       {"max_memory": {"0": "15GiB", "cpu": "200GiB"}, "dtype": "float16"}),
        ])], gpu=True, resources="1 GPU with 16 GB, 208 GB RAM, 30 GB disk for the fp16 checkpoint"),
    Preset("gpu-opt-30b", "one 16 GB GPU, 208 GB host memory (FlexGen's T4 setting)", [
        Scenario("opt-30b", "opt-30b", 512, 32, "208G", False, gpu_memory_gib=16, systems=[
            SystemPlan("flexgen-dist", "flexgen", ["48x3", "64x2"], {"percent": [20, 80, 0, 100, 0, 100], "dtype": "float16"}),
            SystemPlan("flexgen-dist 4-bit", "flexgen", ["64x8"],
                       {"percent": [0, 100, 0, 100, 0, 100], "compress_cache": True, "dtype": "float16"}),
            SystemPlan("transformers + Accelerate", "accelerate", ["2", "4", "8"],
                       {"max_memory": {"0": "15GiB", "cpu": "200GiB"}, "dtype": "float16"}),
        ])], gpu=True, resources="1 GPU with 16 GB, 208 GB RAM, 70 GB disk for the fp16 checkpoint"),
    Preset("gpu-opt-175b", "one 16 GB GPU, 208 GB host memory, NVMe (FlexGen's T4 setting)", [
        Scenario("opt-175b", "opt-175b", 512, 32, "208G", True, gpu_memory_gib=16, systems=[
            SystemPlan("flexgen-dist", "flexgen", ["32x8"], {"percent": [0, 50, 0, 0, 0, 100], "dtype": "float16"}),
            SystemPlan("flexgen-dist 4-bit", "flexgen", ["48x3"],
                       {"percent": [0, 100, 0, 100, 0, 100], "compress_weight": True, "compress_cache": True,
                        "dtype": "float16"}),
            SystemPlan("transformers + Accelerate", "accelerate", ["1", "2"],
                       {"max_memory": {"0": "15GiB", "cpu": "150GiB"}, "dtype": "float16"}),
        ])], gpu=True, resources="1 GPU with 16 GB, 208 GB RAM, 1.5 TB NVMe (350 GB checkpoint + 350 GB store + KV cache)"),
]}


def parse_batch(text: str) -> tuple[int, int]:
    """"32" -> (32, 1); "64x2" -> (128, 2): total sequences and GPU batches per block."""
    gbs, _, ngb = text.partition("x")
    gbs, ngb = int(gbs), int(ngb or 1)
    if gbs < 1 or ngb < 1:
        raise ValueError(f"bad batch {text!r}")
    return gbs * ngb, ngb


def write_dummy_checkpoint(model: str, path: str, dtype: str = "bfloat16", seed: int = 0) -> str:
    """A Hugging Face OPT checkpoint of `model`'s shape with seeded random weights (std 0.02,
    layer norms at 1 and 0, as transformers initialises), written once in safetensors shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import OPTConfig, OPTForCausalLM

    from flexgen_dist.models import builtin_spec
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        return path
    spec = builtin_spec(model)
    if spec is None:
        raise ValueError(f"unknown model {model!r}")
    config = OPTConfig(hidden_size=spec.hidden_size, ffn_dim=spec.ffn_dim, num_hidden_layers=spec.num_layers,
                       num_attention_heads=spec.num_heads, word_embed_proj_dim=spec.embed_dim,
                       do_layer_norm_before=spec.do_layer_norm_before, vocab_size=spec.vocab_size,
                       max_position_embeddings=spec.max_positions, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                       dtype=dtype)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in OPTForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    gen, shard, shard_bytes, index, shard_id = torch.Generator().manual_seed(seed), {}, 0, {}, 0
    files = []

    def flush():
        nonlocal shard, shard_bytes, shard_id
        name = f"model-{shard_id:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        files.append(name)
        shard, shard_bytes, shard_id = {}, 0, shard_id + 1

    for key, shape in shapes.items():
        if key.endswith("layer_norm.weight"):
            t = torch.ones(shape)
        elif key.endswith(".bias") or len(shape) == 1:
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        shard[key] = t.to(getattr(torch, dtype))
        shard_bytes += shard[key].numel() * shard[key].element_size()
        if shard_bytes > 2 * 2**30:
            flush()
    if shard:
        flush()
    total = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    open(done, "w").close()
    return path


def machine_text() -> str:
    import psutil
    import torch
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    try:
        import accelerate
        acc = accelerate.__version__
    except ImportError:
        acc = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {acc}")


class Runner:
    """Runs one preset's measurements, each in its own limited process, and collects the rows."""

    def __init__(self, preset: Preset, work_dir: str, run_timeout: float, log=print):
        self.preset, self.work_dir, self.run_timeout, self.log = preset, os.path.expanduser(work_dir), run_timeout, log

    def checkpoint_path(self, model: str, dtype: str) -> str:
        if os.path.isdir(model):
            return model
        return os.path.join(self.work_dir, "checkpoints", f"{model}-dummy-{dtype}")

    def checkpoint(self, model: str, dtype: str) -> str:
        path = self.checkpoint_path(model, dtype)
        if path != model and not os.path.exists(os.path.join(path, ".complete")):
            self.log(f"writing a dummy {model} checkpoint to {path} (once)")
            write_dummy_checkpoint(model, path, dtype)
        return path

    def spec(self, scenario: Scenario, plan: SystemPlan, batch: str, write: bool = True, **extra) -> RunSpec:
        n, ngb = parse_batch(batch)
        options = dict(plan.options)
        dtype = options.pop("dtype", "bfloat16")
        checkpoint = (self.checkpoint if write else self.checkpoint_path)(scenario.model, dtype)
        fields = dict(system=plan.system, checkpoint=checkpoint, batch=n, ngb=ngb, prompt_len=scenario.prompt_len,
                      gen_len=scenario.gen_len, dtype=dtype, offload_dir=os.path.join(self.work_dir, "offload"),
                      drop_cache=scenario.disk_bound, gpu_memory_gib=scenario.gpu_memory_gib)
        return RunSpec(**{**fields, **options, **extra})

    def command(self, spec: RunSpec, limit: str) -> list[str]:
        return [os.path.join(HERE, "with_memory_limit.sh"), limit, "--", sys.executable,
                os.path.join(HERE, "peer_systems.py"), json.dumps(asdict(spec))]

    def measure(self, scenario: Scenario, plan: SystemPlan, batch: str) -> dict:
        spec = self.spec(scenario, plan, batch)
        row = {"preset": self.preset.name, "scenario": scenario.name, "model": scenario.model,
               "prompt_len": scenario.prompt_len, "gen_len": scenario.gen_len, "memory_limit": scenario.memory_limit,
               "disk_bound": scenario.disk_bound, "label": plan.label, "system": plan.system, "batch": spec.batch,
               "ngb": spec.ngb, "options": plan.options, "date": time.strftime("%Y-%m-%d")}
        with tempfile.NamedTemporaryFile("r", suffix=".json") as report:
            env = {**os.environ, "MEMLIMIT_REPORT": report.name}
            try:
                done = subprocess.run(self.command(spec, scenario.memory_limit), env=env, capture_output=True,
                                      text=True, timeout=self.run_timeout)
            except subprocess.TimeoutExpired:
                return {**row, "status": "timeout", "error": f"over {self.run_timeout:.0f} s"}
            limit = json.loads(report.read() or "{}")
        row.update(limit_enforced=limit.get("enforced"), cgroup_peak_bytes=limit.get("peak_bytes"))
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            result = json.loads(lines[-1])
            result.pop("spec", None)
            return {**row, "status": "ok", **result}
        if limit.get("oom_kills"):
            return {**row, "status": "oom", "error": f"over the {scenario.memory_limit} limit"}
        errors = [line for line in done.stderr.splitlines() if line.startswith("error")] or done.stderr.splitlines()[-1:]
        return {**row, "status": "error", "error": (errors[-1] if errors else f"exit status {done.returncode}")[:300]}

    def prepare(self, scenario: Scenario, plan: SystemPlan) -> None:
        """Build this project's weight store outside the limit and the timing (a one-time conversion)."""
        if plan.system == "flexgen":
            spec = self.spec(scenario, plan, plan.batches[0], prepare_only=True, drop_cache=False)
            done = subprocess.run(self.command(spec, "none"), capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"preparing {plan.label} failed: {done.stderr.strip().splitlines()[-1:]}")

    def run(self, only: list[str] | None = None) -> list[dict]:
        rows = []
        for scenario in self.preset.scenarios:
            if only and scenario.name not in only:
                continue
            for plan in scenario.systems:
                self.prepare(scenario, plan)
                for batch in sorted(plan.batches, key=lambda b: parse_batch(b)[0]):
                    row = self.measure(scenario, plan, batch)
                    rows.append(row)
                    self.log(progress_line(row))
                    if row["status"] == "oom":
                        break  # larger batches need more memory still
        return rows


def progress_line(r: dict) -> str:
    head = f"[{r['scenario']}] {r['label']}, batch {r['batch']}:"
    if r["status"] != "ok":
        return f"{head} {r['status']} ({r.get('error', '')})"
    peak = r.get("cgroup_peak_bytes")
    peak_text = f", cgroup peak {peak / 2**30:.2f} GiB" if peak else ""
    return (f"{head} {r['throughput']:.2f} tok/s (prefill {r['prefill_s']:.1f} s, decode {r['decode_s']:.1f} s"
            f"{peak_text}, read {r.get('disk_read_bytes', 0) / 1e9:.1f} GB)")


def report_text(rows: list[dict], preset: Preset | None, command: str, figures: list[str], machine: str) -> str:
    out = [f"Machine: {machine}. Date: {rows[0].get('date', '?') if rows else '?'}.",
           f"Command: `{command}`", ""]
    for scenario in scenarios(rows):
        plan = next((s for s in preset.scenarios if s.name == scenario), None) if preset else None
        out += [f"#### {scenario}" + (f": {plan.note}" if plan and plan.note else ""), "",
                workload_text(rows, scenario), "", peer_table(rows, scenario), ""]
        for label, ratio in ratios(rows, scenario).items():
            out.append(f"- flexgen-dist's best is {ratio:.2f}× {label}'s best.")
        out += ["", "<details><summary>every run</summary>", "", runs_table(rows, scenario), "", "</details>", ""]
    for path in figures:
        rel = os.path.relpath(path, HERE)
        out.append(f"![{os.path.basename(path)}]({rel})")
    return "\n".join(out)


def write_report(rows: list[dict], preset_name: str, results_md: str | None, command: str) -> str:
    from plot import write_figures
    figures = write_figures(rows, os.path.join(HERE, "figures"), f"peers-{preset_name}")
    text = report_text(rows, PRESETS.get(preset_name), command, figures, machine_text())
    if results_md:
        with open(results_md) as f:
            old = f.read()
        with open(results_md, "w") as f:
            f.write(replace_section(old, preset_name, text))
    return text


def print_preset(preset: Preset, work_dir: str) -> None:
    runner = Runner(preset, work_dir, 0)
    me = os.path.relpath(__file__)
    print(f"# {preset.name}: {preset.description}")
    if preset.resources:
        print(f"# resources: {preset.resources}")
    print(f"# the whole preset on such a machine (writes the checkpoints, runs, tabulates, plots):\n"
          f"#   python {me} run --preset {preset.name} --work-dir {work_dir}\n# or one run at a time:")
    for scenario in preset.scenarios:
        print(f"\n# scenario {scenario.name}: {scenario.model}, prompt {scenario.prompt_len}, gen {scenario.gen_len}, "
              f"memory limit {scenario.memory_limit}")
        dtypes = dict.fromkeys(plan.options.get("dtype", "bfloat16") for plan in scenario.systems)
        for dtype in dtypes:
            print(shlex.join(["python", me, "checkpoint", scenario.model, "--dtype", dtype,
                              "--out", runner.checkpoint_path(scenario.model, dtype)]))
        for plan in scenario.systems:
            for batch in plan.batches:
                print(shlex.join(runner.command(runner.spec(scenario, plan, batch, write=False), scenario.memory_limit)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure a preset, then tabulate and plot it")
    run.add_argument("--preset", default="cpu-quick", choices=sorted(PRESETS))
    run.add_argument("--scenario", action="append", help="only this scenario (repeatable); the results file keeps the other scenarios' rows")
    run.add_argument("--work-dir", default="~/flexgen_bench", help="dummy checkpoints and weight stores")
    run.add_argument("--results", help="JSON lines to write (default benchmark/results-peers-PRESET.jsonl)")
    run.add_argument("--results-md", default=os.path.join(HERE, "RESULTS.md"),
                     help="update this file's section for the preset ('' to skip)")
    run.add_argument("--run-timeout", type=float, default=1800, help="seconds before one run is abandoned")
    rep = sub.add_parser("report", help="tables and figures from existing results")
    rep.add_argument("results")
    rep.add_argument("--results-md", default="", help="also update this file's section for the preset")
    show = sub.add_parser("print", help="the commands and resources of a preset, without running it")
    show.add_argument("--preset", required=True, choices=sorted(PRESETS))
    show.add_argument("--work-dir", default="~/flexgen_bench")
    ckpt = sub.add_parser("checkpoint", help="write a dummy Hugging Face checkpoint of a built-in model")
    ckpt.add_argument("model")
    ckpt.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ckpt.add_argument("--out", required=True)
    sub.add_parser("list", help="the presets")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            for preset in PRESETS.values():
                print(f"{preset.name:14} {preset.description}")
        elif args.command == "checkpoint":
            print(write_dummy_checkpoint(args.model, args.out, args.dtype))
        elif args.command == "print":
            print_preset(PRESETS[args.preset], args.work_dir)
        elif args.command == "report":
            rows = load_rows(args.results)
            if not rows:
                raise ValueError(f"{args.results} has no runs")
            preset = rows[0].get("preset", "peers")
            print(write_report(rows, preset, args.results_md or None, "python " + shlex.join(sys.argv)))
        else:
            return run_preset(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_preset(args) -> int:
    import torch
    preset = PRESETS[args.preset]
    if preset.gpu and not torch.cuda.is_available():
        print(f"error: preset {preset.name} needs a CUDA GPU; `bench_peers.py print --preset {preset.name}` "
              "shows its commands", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("note: not root, so the page cache cannot be dropped and no memory cgroup can be made; "
              "disk-bound numbers will say so", file=sys.stderr)
    results = args.results or os.path.join(HERE, f"results-peers-{preset.name}.jsonl")
    rows = Runner(preset, args.work_dir, args.run_timeout, log=lambda m: print(m, flush=True)).run(args.scenario)
    if args.scenario and os.path.exists(results):  # rerun some scenarios: keep the others' rows
        rows = [r for r in load_rows(results) if r["scenario"] not in args.scenario] + rows
        order = [s.name for s in preset.scenarios]
        rows.sort(key=lambda r: order.index(r["scenario"]) if r["scenario"] in order else len(order))
    with open(results, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {results}")
    print(write_report(rows, preset.name, args.results_md or None, "python " + shlex.join(sys.argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
