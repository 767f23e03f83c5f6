"""One timed generation run of one system on one Hugging Face checkpoint: the worker that
bench_peers.py starts inside a memory limit.

    python benchmark/peer_systems.py '{"system": "accelerate", "checkpoint": "...", "batch": 8, ...}'

prints one JSON line: prefill and decode time, throughput, peak RSS, bytes read from the disk.
Systems: "flexgen" (this project's Engine), "transformers" (its own generate, everything in
memory), "accelerate" (transformers + Accelerate big-model inference: device_map="auto" under
`max_memory`, the rest of the weights left on disk) and "llamacpp" (llama.cpp's
llama-batched-bench on a GGUF file of the checkpoint, memory-mapped as llama.cpp does by default;
its own prompts of the same length, its own warm-up). Every system gets the same random prompts
(seeded), a warm-up generate (8 prompt tokens, 2 new, as FlexGen's benchmark does), then the
page cache dropped (when allowed) right before the timed run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from flexgen_dist.system.limits import peak_rss_bytes

SYSTEMS = ("flexgen", "transformers", "accelerate", "llamacpp")


@dataclass
class RunSpec:
    system: str
    checkpoint: str
    batch: int  # sequences in the timed run
    prompt_len: int
    gen_len: int
    ngb: int = 1  # flexgen: the batch runs as ngb GPU batches of batch // ngb
    percent: list[float] = field(default_factory=lambda: [100, 0, 100, 0, 100, 0])  # flexgen
    compress_weight: bool = False  # flexgen
    compress_cache: bool = False  # flexgen
    experts_percent: list[float] | None = None  # flexgen, MoE: experts' (gpu, cpu) percents (default: as weights)
    expert_cache_gib: float | None = None  # flexgen, MoE: expert cache size (None: the engine sizes it; 0: off)
    dtype: str = "bfloat16"
    max_memory: dict | None = None  # accelerate: weights kept per device, e.g. {"cpu": "600MiB"} or {"0": "15GiB", "cpu": "200GiB"}
    gpu_memory_gib: float | None = None  # cap this process's CUDA memory, to emulate a smaller GPU
    offload_dir: str = "~/flexgen_bench/offload"
    drop_cache: bool = False
    prepare_only: bool = False  # flexgen: build the weight store and stop (outside the timed runs)
    gguf: str | None = None  # llamacpp: the GGUF file
    llamacpp_bin: str | None = None  # llamacpp: the folder holding llama-batched-bench
    threads: int = os.cpu_count() or 1  # llamacpp

    def validate(self) -> "RunSpec":
        if self.system not in SYSTEMS:
            raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {self.system!r}")
        if self.batch < 1 or self.ngb < 1 or self.batch % self.ngb:
            raise ValueError(f"batch {self.batch} must be a positive multiple of ngb {self.ngb}")
        if self.prompt_len < 1 or self.gen_len < 2:
            raise ValueError("prompt_len must be >= 1 and gen_len >= 2 (prefill and decode are timed apart)")
        if self.system == "llamacpp" and not (self.gguf and os.path.isfile(self.gguf)):
            raise ValueError(f"no GGUF file {self.gguf!r} (bench_llama.py gguf writes one)")
        if not os.path.isfile(os.path.join(self.checkpoint, "config.json")):
            raise ValueError(f"no Hugging Face checkpoint (config.json) in {self.checkpoint}")
        return self


def disk_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(re.search(r"^read_bytes: (\d+)", f.read(), re.M).group(1))


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only); False where not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def random_prompts(spec: RunSpec) -> torch.Tensor:
    with open(os.path.join(spec.checkpoint, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (spec.batch, spec.prompt_len), generator=gen)


def run_flexgen(spec: RunSpec, prompts: torch.Tensor) -> dict:
    from flexgen_dist import Engine, Policy
    experts = dict(zip(("experts_gpu_percent", "experts_cpu_percent"), spec.experts_percent or ()))
    policy = Policy.from_percent(spec.percent, gpu_batch_size=spec.batch // spec.ngb, num_gpu_batches=spec.ngb,
                                 compress_weight=spec.compress_weight, compress_cache=spec.compress_cache,
                                 expert_cache_gib=spec.expert_cache_gib, **experts)
    engine = Engine.from_pretrained(spec.checkpoint, policy=policy, offload_dir=spec.offload_dir, dtype=spec.dtype)
    if spec.prepare_only:
        engine.close()
        return {}
    engine.generate(prompts[:, :8].tolist(), max_new_tokens=2, ignore_eos=True)
    dropped = drop_page_cache() if spec.drop_cache else False
    read0 = disk_read_bytes()
    engine.generate(prompts.tolist(), max_new_tokens=spec.gen_len, ignore_eos=True)
    read = disk_read_bytes() - read0
    cache = engine.executor.expert_cache
    engine.close()
    s = engine.last_stats
    return {"prefill_s": s.prefill_time, "decode_s": s.decode_time, "disk_read_bytes": read,
            "page_cache_dropped": dropped, "expert_cache_gib": cache.capacity / 2**30,
            "expert_cache_hits": cache.hits, "expert_cache_misses": cache.misses}


class StepClock:
    """A logits processor that only notes when each token's logits arrive: the first call ends
    the prefill, the rest are decode steps."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def run_transformers(spec: RunSpec, prompts: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM, LogitsProcessorList
    dtype = getattr(torch, spec.dtype)
    if spec.system == "accelerate":
        offload = os.path.join(os.path.expanduser(spec.offload_dir), "accelerate")
        memory = {int(k) if str(k).isdigit() else k: v for k, v in (spec.max_memory or {}).items()} or None
        model = AutoModelForCausalLM.from_pretrained(spec.checkpoint, dtype=dtype, device_map="auto",
                                                     max_memory=memory, offload_folder=offload)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(spec.checkpoint, dtype=dtype).to(device)
    model.eval()
    kw = dict(do_sample=False, pad_token_id=1, eos_token_id=None)
    # Accelerate's hooks move activations between devices; the inputs start on the execution device
    prompts = prompts.to("cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        model.generate(prompts[:, :8], max_new_tokens=2, **kw)
        dropped = drop_page_cache() if spec.drop_cache else False
        clock, read0 = StepClock(), disk_read_bytes()
        t0 = time.perf_counter()
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=spec.gen_len,
                       min_new_tokens=spec.gen_len, logits_processor=LogitsProcessorList([clock]), **kw)
        end = time.perf_counter()
        read = disk_read_bytes() - read0
    if len(clock.times) != spec.gen_len:
        raise RuntimeError(f"expected {spec.gen_len} decode steps, saw {len(clock.times)}")
    placement = sorted(set(getattr(model, "hf_device_map", {"": "cpu"}).values()), key=str)
    return {"prefill_s": clock.times[0] - t0, "decode_s": end - clock.times[0], "disk_read_bytes": read,
            "page_cache_dropped": dropped, "placement": [str(p) for p in placement]}


def run_llamacpp(spec: RunSpec, prompts: torch.Tensor) -> dict:
    """llama-batched-bench: `batch` sequences of `prompt_len` tokens each (not shared), then
    `gen_len` tokens each. One killed by a signal (its AMX matmul crashes on some Xeons) runs
    again with --no-repack, and the row says so. Disk reads and peak RSS are its own (the
    kernel's counters of reaped children)."""
    import resource

    from llamacpp_results import parse_batched_bench
    ctx = max(2048, spec.batch * (spec.prompt_len + spec.gen_len))
    cmd = [os.path.join(os.path.expanduser(spec.llamacpp_bin or "."), "llama-batched-bench"), "-m", spec.gguf,
           "-c", str(ctx), "-npp", str(spec.prompt_len), "-ntg", str(spec.gen_len), "-npl", str(spec.batch),
           "-t", str(spec.threads), "-tb", str(spec.threads), "--output-format", "jsonl"]
    note = None
    for attempt in (cmd, cmd + ["--no-repack"]):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
        done = subprocess.run(attempt, capture_output=True, text=True, check=False)
        read = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - before) * 512
        item = parse_batched_bench(done.stdout).get(spec.batch)
        if item is not None or done.returncode >= 0:
            break
        note = f"--no-repack: the default run was killed by signal {-done.returncode}"
    if item is None:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"llama-batched-bench exit {done.returncode}: {tail[0]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"prefill_s": item["t_pp"], "decode_s": item["t_tg"], "disk_read_bytes": read, "peak_rss_bytes": rss,
            "command": attempt, **({"llamacpp_note": note} if note else {})}


def measure(spec: RunSpec) -> dict:
    spec.validate()
    if spec.gpu_memory_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.gpu_memory_gib * 2**30 / total))
    torch.manual_seed(0)
    prompts = random_prompts(spec)
    runner = {"flexgen": run_flexgen, "llamacpp": run_llamacpp}.get(spec.system, run_transformers)
    result = runner(spec, prompts)
    if spec.prepare_only:
        return {"prepared": True}
    latency = result["prefill_s"] + result["decode_s"]
    return {"peak_rss_bytes": peak_rss_bytes(), **result, "latency_s": latency,
            "throughput": spec.batch * spec.gen_len / latency}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        spec = RunSpec(**json.loads(argv[0]))
        row = measure(spec)
    except Exception as e:  # one line for the harness's table; the harness keeps the run going
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"spec": asdict(spec), **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
